"""Merge an adapter into its base model and write a plain transformers folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConfigError, PeftkitError
from ..io import peft_format
from ..io.atomic import atomic_dir
from ..io.outputs import check_not_a_file, check_overwritable, protected_place, record_outputs
from ..methods import method_for_config
from ..models import load_model_and_tokenizer, parse_dtype
from ..tuned import TunedModel, not_mergeable_message


def check_export_dir(export_dir: str | os.PathLike, overwrite: bool, sources: dict[str, str | None]) -> Path:
    """An export replaces its folder whole: only an empty one, or with `overwrite` an earlier peftkit output, and
    never a folder holding what the export reads (`sources`: the model and adapter paths by their keys)."""
    out = check_not_a_file(export_dir, "export_dir")
    place = protected_place(out)
    if place:  # the export becomes this folder, replacing it whole
        raise ConfigError(f"export_dir '{out}' is {place}; an export is written as a folder of its own. Choose a new "
                          "folder (e.g. export_dir=exported).")
    for key, source in sources.items():
        if (source and Path(source).exists()
                and out.resolve() in (Path(source).resolve(), *Path(source).resolve().parents)):
            raise ConfigError(f"export_dir '{out}' holds {key} '{source}', which this export reads and would replace; "
                              "choose another export_dir.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"export_dir '{out}' is not empty; choose another folder or set overwrite_output_dir: "
                              "true to replace an earlier export.")
        check_overwritable(out, "export_dir")
    return out


@contextlib.contextmanager
def writing_export(out: Path) -> Iterator[Path]:
    """A temporary folder that becomes `out` when the block succeeds, with a marker naming every file written, so a
    later overwrite_output_dir recognises the folder as peftkit's."""
    with atomic_dir(out) as tmp:
        yield tmp
        record_outputs(tmp, [p.name for p in tmp.iterdir()])


def merge_device(export_device: str) -> torch.device:
    """LLaMA-Factory's `export_device`: cpu, or auto (the GPU when there is one)."""
    if export_device not in ("cpu", "auto"):
        raise ConfigError(f"export_device '{export_device}' is not one of: cpu, auto.")
    return torch.device("cuda" if export_device == "auto" and torch.cuda.is_available() else "cpu")


def load_merged(model_name_or_path: str, adapter_dir: str | None, *, trust_remote_code: bool = False,
                progress: bool = True, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The base model in float32 with the adapter merged in (rounding happens once, at the export dtype), and its
    tokenizer. An adapter that cannot merge is refused before any time is spent loading the model.

    `device` "auto" merges on the GPU when there is one (the float32 model must fit in its memory); the merged model
    is handed back on the CPU either way, where every writer reads it.
    """

    on = merge_device(device)
    if adapter_dir:
        method_cls = method_for_config(peft_format.read_config(adapter_dir))
        if not method_cls.mergeable:
            raise PeftkitError(not_mergeable_message(method_cls))
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, dtype="float32",
                                                trust_remote_code=trust_remote_code)
    if adapter_dir:
        tuned = TunedModel.load(model, adapter_dir)
        try:
            tuned.to(on)
        except torch.cuda.OutOfMemoryError:
            raise PeftkitError(f"The float32 model does not fit in the memory of {torch.cuda.get_device_name(on)} "
                               "for the merge; set export_device: cpu.") from None
        model = tuned.merge_and_unload(progress=progress).to("cpu")
    check_config_holds(model)
    return model, tokenizer


def export_merged(
    model_name_or_path: str,
    adapter_dir: str | None,
    export_dir: str | os.PathLike,
    *,
    export_size: int = 5,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    device: str = "cpu",
    legacy_format: bool = False,
) -> Path:
    """Write base + merged adapter to `export_dir` (safetensors sharded at `export_size` GB, tokenizer, generation
    config), through a temporary folder so an interrupted export leaves nothing half-written. `legacy_format` also
    writes the weights as PyTorch .bin files, for tools that predate safetensors."""

    out = check_export_dir(export_dir, overwrite, {"model_name_or_path": model_name_or_path,
                                                   "adapter_name_or_path": adapter_dir})
    model, tokenizer = load_merged(model_name_or_path, adapter_dir, trust_remote_code=trust_remote_code,
                                   progress=progress, device=device)
    if dtype not in (None, "auto"):  # "auto" keeps the float32 the merge was done in
        model = model.to(parse_dtype(dtype))
    with writing_export(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=f"{export_size}GB")
        tokenizer.save_pretrained(tmp)
        if legacy_format:
            write_bin_copies(tmp)
    return out


def write_bin_copies(folder: Path) -> list[Path]:
    """Beside each safetensors weight file in `folder`, the same tensors as a PyTorch .bin file under transformers'
    legacy names (model.safetensors -> pytorch_model.bin, shards and index alike), so the folder loads in tools
    that read only .bin. transformers 5 no longer writes them (`safe_serialization` is gone)."""
    from safetensors.torch import load_file

    written = []
    for shard in sorted(folder.glob("model*.safetensors")):
        target = folder / _legacy_name(shard.name)
        torch.save(load_file(shard), target)
        written.append(target)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: _legacy_name(v) for k, v in data["weight_map"].items()}
        target = folder / "pytorch_model.bin.index.json"
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        written.append(target)
    return written


def _legacy_name(safetensors_name: str) -> str:
    return "pytorch_model" + safetensors_name.removeprefix("model").removesuffix(".safetensors") + ".bin"


def quantized_training_note(bits: int) -> str:
    """What export says about merging an adapter trained on a quantized base (QLoRA)."""
    return (f"note: this adapter was trained against {bits}-bit quantized base weights (QLoRA). It was merged into "
            "the full-precision base, so the exported model equals base + adapter in full precision, not the "
            f"{bits}-bit model it was trained with; its outputs differ from training-time ones by the quantization "
            "error (usually slightly). Evaluate the export before deploying it.")


def check_config_holds(model: torch.nn.Module) -> None:
    """Refuse an export that transformers (or llama.cpp) would load without some merged tensor.

    Merging can create tensors the architecture's config does not build (SSF or BitFit give Llama's bias-free linears
    a bias); `from_pretrained` would silently drop them and the exported model would differ from the trained one.
    The config is instantiated on the meta device, which costs no memory, and its tensors are compared.
    """
    with torch.device("meta"):
        skeleton = type(model)._from_config(model.config)
    lost = sorted(set(model.state_dict()) - set(skeleton.state_dict()))
    if lost:
        raise PeftkitError(
            f"The merged model has {len(lost)} tensors (e.g. '{lost[0]}') that {type(model).__name__}'s config does "
            "not build, so transformers would drop them on load and the export would not match the trained model. "
            "Serve the adapter unmerged (peftkit chat --adapter), or train it on modules that already have those "
            "tensors (e.g. SSF or BitFit only on layers that have a bias)."
        )
