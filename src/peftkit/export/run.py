"""`peftkit export`: one entry point for every export format, so the CLI only parses and prints."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data.templates import get_template
from ..errors import ConfigError
from ..io.run_config import read_train_config
from ..models import load_tokenizer, resolve_model_path
from ..quantization import trained_quantization
from .gguf import write_gguf
from .gguf_lora import write_gguf_lora
from .gguf_vocab import adds_token
from .merge import check_export_dir, export_merged, load_merged, quantized_training_note, writing_export
from .ollama import ollama_create_command, ollama_parameters, ollama_template, write_modelfile


@dataclass
class ExportResult:
    path: Path  # the folder written
    files: list[Path] = field(default_factory=list)  # the main files in it (GGUF, Modelfile)
    notes: list[str] = field(default_factory=list)  # what the user should read or run next


def run_export(cfg: TrainConfig, *, progress: bool = True) -> ExportResult:
    """Write `cfg.export_dir` in `cfg.export_format`: hf, gguf, ollama (gguf + Modelfile) or gguf_lora."""

    if not cfg.export_dir:
        raise ConfigError("export needs export_dir (e.g. `peftkit export cfg.yaml export_dir=out/merged`).")
    _check_unsupported(cfg)
    notes = []
    merges = cfg.adapter_name_or_path and cfg.export_format != "gguf_lora"  # gguf_lora converts the adapter alone
    if merges and cfg.export_device == "auto" and not torch.cuda.is_available():
        notes.append("note: export_device: auto found no GPU; the merge ran on the CPU.")
    if cfg.export_legacy_format and cfg.export_format != "hf":
        notes.append(f"note: export_legacy_format writes .bin files for export_format: hf only; export_format: "
                     f"{cfg.export_format} wrote none.")
    if cfg.adapter_name_or_path:  # a QLoRA adapter is exported against the full-precision base, never the 4-bit one
        trained = trained_quantization(cfg.adapter_name_or_path)
        bits = trained.bits if trained else cfg.quantization_bit
        if bits:
            notes.append(quantized_training_note(bits))
    fmt = cfg.export_format
    template_name = cfg.template or read_train_config(cfg.adapter_name_or_path).get("template")
    if fmt == "hf":
        out = export_merged(cfg.model_name_or_path, cfg.adapter_name_or_path, cfg.export_dir,
                            export_size=cfg.export_size, dtype=cfg.infer_dtype, overwrite=cfg.overwrite_output_dir,
                            trust_remote_code=cfg.trust_remote_code, progress=progress, device=cfg.export_device,
                            legacy_format=cfg.export_legacy_format)
        if template_name:  # the tokenizer as exported, read back only when there is a template to compare

            _note_template_mismatch(template_name, load_tokenizer(str(out)), notes)
        return ExportResult(out, [out], notes)
    out = check_export_dir(cfg.export_dir, cfg.overwrite_output_dir,
                           {"model_name_or_path": cfg.model_name_or_path,
                            "adapter_name_or_path": cfg.adapter_name_or_path})
    if fmt == "gguf_lora":
        return _export_gguf_lora(cfg, out, notes, progress)
    model, tokenizer = load_merged(cfg.model_name_or_path, cfg.adapter_name_or_path,
                                   trust_remote_code=cfg.trust_remote_code, progress=progress, device=cfg.export_device)

    gguf_name = f"model-{cfg.export_gguf_type}.gguf"
    template = _ollama_template(template_name, tokenizer) if fmt == "ollama" else None  # fails before the write
    _note_template_mismatch(template_name, tokenizer, notes)
    with writing_export(out) as tmp:
        write_gguf(model, tokenizer, tmp / gguf_name, gguf_type=cfg.export_gguf_type, model_name=out.name,
                   progress=progress)
        if template is not None:
            write_modelfile(tmp, gguf_name, template, system=cfg.ollama_system, parameters=ollama_parameters(cfg))
    result = ExportResult(out, [out / gguf_name], notes)
    if template is not None:
        result.files.append(out / "Modelfile")
        name = re.sub(r"[^a-z0-9._-]+", "-", out.name.lower()).strip("-._") or "model"  # what Ollama accepts
        if template.tools:
            result.notes.append(f"The Modelfile offers tools to Ollama, in the {template.tools} tool-call format the "
                                "model was trained with.")
        result.notes.append(f"Create the Ollama model with:\n  {ollama_create_command(out / 'Modelfile', name)}")
    return result


def _check_unsupported(cfg: TrainConfig) -> None:
    """LLaMA-Factory's export keys that peftkit cannot honour: refused before any loading, naming what to do."""
    if cfg.export_quantization_bit is not None or cfg.export_quantization_dataset:
        bits = cfg.export_quantization_bit
        asked = f"export_quantization_bit: {bits}" if bits is not None else "export_quantization_dataset"
        gguf_type = "q8_0" if bits == 8 else "q4_0"
        raise ConfigError(
            f"{asked} (GPTQ quantization with a calibration dataset) is not supported. For a quantized model use "
            f"export_format: gguf with export_gguf_type: {gguf_type} (q4_0 or q8_0; no calibration data needed), or "
            "remove export_quantization_bit and export_quantization_dataset to export in full precision.")
    if cfg.export_hub_model_id:
        raise ConfigError(
            f"export_hub_model_id: {cfg.export_hub_model_id} asks to upload the export, but peftkit does not upload "
            "(it works offline). Remove export_hub_model_id, export, then upload export_dir yourself, e.g. "
            f"`huggingface-cli upload {cfg.export_hub_model_id} {cfg.export_dir}`.")


def _export_gguf_lora(cfg: TrainConfig, out: Path, notes: list[str], progress: bool) -> ExportResult:
    from transformers import AutoConfig

    if not cfg.adapter_name_or_path:
        raise ConfigError("export_format: gguf_lora exports an adapter: set adapter_name_or_path.")
    base_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path),
                                             trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    name = f"adapter-{cfg.export_gguf_type}.gguf"
    with writing_export(out) as tmp:
        write_gguf_lora(base_config, cfg.adapter_name_or_path, tmp / name, gguf_type=cfg.export_gguf_type,
                        progress=progress)
    notes.append(f"Apply it to a GGUF of the same base model (export it with export_format: gguf and no adapter), "
                 f"e.g. llama-cli -m base.gguf --lora {out / name}")
    return ExportResult(out, [out / name], notes)


_PROBE = [{"role": "user", "content": "Hi"}]


def _note_template_mismatch(template_name: str | None, tokenizer: Any, notes: list[str]) -> None:
    """The exported files carry the tokenizer's own chat template; say so when training used another one."""

    if not template_name:
        return
    ours = get_template(template_name, tokenizer).render(_PROBE, tokenizer, add_generation_prompt=True)
    try:
        theirs = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # no chat template, or one that cannot render this
        theirs = None
    if ours != theirs:
        notes.append(f"note: the adapter was trained with template '{template_name}', but the exported tokenizer "
                     "carries its own chat template, which formats prompts differently. Format prompts as "
                     f"'{template_name}' does (the Ollama Modelfile's TEMPLATE does), or set the tokenizer's "
                     "chat_template before training.")


def _ollama_template(template_name: str | None, tokenizer: Any) -> Any:
    """The Modelfile TEMPLATE, translated from the template the model was trained with."""

    # llama.cpp adds BOS itself only when the GGUF says so; only then may the Go template leave it out.
    bos = tokenizer.bos_token if adds_token(tokenizer, tokenizer.bos_token_id, at_start=True) else None
    # The template training used (a built-in one, or the tokenizer's own): tool calls rendered as in training too.
    template = get_template(template_name, tokenizer)
    return ollama_template(
        lambda m, g, tools=None: template.render(m, tokenizer, tools=tools, add_generation_prompt=g), bos_token=bos)
