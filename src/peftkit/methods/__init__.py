"""Fine-tuning methods, one module each; importing this package registers them all."""

from . import lora  # noqa: F401  (registers "lora")
from .base import (
    AdapterLayer,
    Method,
    MethodConfig,
    available_methods,
    find_targets,
    get_method,
    method_for_config,
    method_keys,
    trainable_report,
)
from .lora import LoraConfig

__all__ = [
    "AdapterLayer",
    "LoraConfig",
    "Method",
    "MethodConfig",
    "available_methods",
    "find_targets",
    "get_method",
    "method_for_config",
    "method_keys",
    "trainable_report",
]
