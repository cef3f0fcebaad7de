"""Export: merged model folders (and later GGUF and Ollama)."""

from .merge import export_merged

__all__ = ["export_merged"]
