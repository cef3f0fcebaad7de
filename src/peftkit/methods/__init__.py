"""Fine-tuning methods, one module each; importing this package registers them all."""

from .adalora import AdaLoraConfig
from .adapter import AdapterConfig
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
from .bitfit import BitFitConfig
from .freeze import FreezeConfig
from .full import FullConfig
from .ia3 import Ia3Config
from .lora import LoraConfig
from .lora_drop import LoraDropConfig
from .prefix import PrefixTuningConfig, PTuningV2Config
from .prompt import PromptTuningConfig, PTuningConfig
from .ssf import SsfConfig

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterLayer",
    "BitFitConfig",
    "FreezeConfig",
    "FullConfig",
    "Ia3Config",
    "LoraConfig",
    "LoraDropConfig",
    "Method",
    "MethodConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SsfConfig",
    "available_methods",
    "find_targets",
    "get_method",
    "method_for_config",
    "method_keys",
    "trainable_report",
]
