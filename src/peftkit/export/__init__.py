"""Export: merged model folders (and later GGUF and Ollama)."""

from .merge import export_merged, quantized_training_note

__all__ = ["export_merged", "quantized_training_note"]
