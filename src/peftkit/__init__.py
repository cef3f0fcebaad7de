"""peftkit: fine-tune large language models with LoRA and friends; adapters in Hugging Face PEFT's format.

    import peftkit
    model, tokenizer = peftkit.load_model_and_tokenizer("smollm2-135m")
    tuned = peftkit.TunedModel(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    tuned.print_trainable_parameters()
    tuned.save("out/adapter")
"""

from . import methods  # registers every method
from .errors import AdapterLoadError, ConfigError, ModelLoadError, PeftkitError
from .evaluate.reward import RewardModel
from .methods import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    FreezeConfig,
    FullConfig,
    Ia3Config,
    LoraConfig,
    LoraDropConfig,
    MethodConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    SsfConfig,
    available_methods,
    get_method,
)
from .models import load_model, load_model_and_tokenizer, load_tokenizer
from .tuned import TunedModel

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterLoadError",
    "BitFitConfig",
    "ConfigError",
    "FreezeConfig",
    "FullConfig",
    "Ia3Config",
    "LoraConfig",
    "LoraDropConfig",
    "MethodConfig",
    "ModelLoadError",
    "PTuningConfig",
    "PTuningV2Config",
    "PeftkitError",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "RewardModel",
    "SsfConfig",
    "TunedModel",
    "available_methods",
    "get_method",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "methods",
]
