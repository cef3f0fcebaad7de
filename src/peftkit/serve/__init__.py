"""Chat and serving: one generation engine shared by `peftkit chat`, predict and the API."""

from .chat import ChatEngine, Completion, GenerationParams

__all__ = ["ChatEngine", "Completion", "GenerationParams"]
