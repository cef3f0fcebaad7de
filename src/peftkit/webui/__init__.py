"""`peftkit webui`: train, watch, evaluate, chat and export from a browser (gradio). Forms come from the config
schema, and every run is the `peftkit` command a person would type, started as a subprocess."""

from .app import build, launch

__all__ = ["build", "launch"]
