"""Export: merged transformers folders, GGUF files for llama.cpp, Ollama Modelfiles, GGUF LoRA adapters."""

from .gguf import write_gguf
from .gguf_lora import write_gguf_lora
from .merge import export_merged, load_merged, quantized_training_note
from .run import ExportResult, run_export

__all__ = ["ExportResult", "export_merged", "load_merged", "quantized_training_note", "run_export", "write_gguf",
           "write_gguf_lora"]
