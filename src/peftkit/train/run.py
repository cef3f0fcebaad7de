"""`peftkit train`: config -> model + method -> data -> trainer -> saved adapter."""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any

import numpy as np
import torch

from ..data import build_dataset, check_packing_support, collator_for
from ..data.dataset import same_vocabulary
from ..data.sources import resolve_datasets, split_names
from ..errors import ConfigError
from ..io.outputs import lock_output
from ..methods import get_method
from ..models import base_model_id, load_model_and_tokenizer, load_tokenizer
from ..objectives import Objective, get_objective
from ..precision import base_dtype
from ..quantization import QuantizationConfig
from ..tuned import TunedModel
from ..varlen import supports_padding_free
from . import distributed
from .checkpoint import check_output_dir
from .distributed import Ranks, check_engine
from .trainer import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_sft(cfg: Any) -> dict[str, Any]:
    """Train the configured method on the configured data; returns the train results (also in train_results.json;
    empty on every rank but the first of a multi-process run). The output_dir is locked for the run: a second run into
    it is refused while this one lives."""
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, cfg.resume_from_checkpoint)  # before minutes of loading
    check_engine(cfg, get_method(cfg.finetuning_type), cfg.quantization() is not None)
    objective = get_objective(cfg.stage, cfg)
    for names in (cfg.dataset, cfg.eval_dataset):  # a dataset the stage cannot train on: refused before any work
        if split_names(names):
            resolve_datasets(names, cfg.dataset_dir, objective.data, cfg.stage)
    check_reference(cfg, objective)
    ranks = distributed.start(cfg)
    if cfg.fsdp and not ranks.enabled:
        warnings.warn("fsdp shards over several processes, and this is one: it trains as usual. Launch with "
                      "--nproc-per-node N (or torchrun) to shard.", UserWarning, stacklevel=2)
    try:
        with lock_output(cfg.output_dir) if ranks.is_main else contextlib.nullcontext():
            return _train(cfg, ranks, objective)
    finally:
        distributed.stop()


def check_reference(cfg: Any, objective: Objective) -> None:
    """A separate reference or teacher must read the same token ids as the model trained (the ids of a probe string
    and the vocabulary size), and a top-k must fit its vocabulary: refused before any work."""
    spec = objective.reference_model(cfg, get_method(cfg.finetuning_type).in_place)
    if spec is None:
        return
    mine = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if spec.name_or_path != cfg.model_name_or_path:
        theirs = load_tokenizer(spec.name_or_path, trust_remote_code=cfg.trust_remote_code)
        if not same_vocabulary(mine, theirs):
            raise ConfigError(f"{spec.key} '{spec.name_or_path}' has another tokenizer ({len(theirs)} tokens) than "
                              f"model_name_or_path '{cfg.model_name_or_path}' ({len(mine)} tokens); stage "
                              f"'{cfg.stage}' compares them token by token. Use a model of the same family.")
    objective.check_vocabulary(len(mine))


def load_reference(cfg: Any, objective: Objective, in_place: bool, dtype: torch.dtype, weights_dtype: torch.dtype,
                   device: str) -> torch.nn.Module | None:
    """The frozen model the stage compares with, when it needs one the trained model cannot give (a teacher; a DPO
    reference for full/freeze or from `ref_model`); None otherwise (adapter methods' references are the model with its
    adapter disabled). A reference that must start equal to the trained weights is loaded in the run's dtype, then
    cast as they are (full fine-tuning keeps them in float32); a teacher runs in the fastest dtype the device has
    (measured as for the base weights, or fp16 when asked), whatever the student trains in."""
    spec = objective.reference_model(cfg, in_place)
    if spec is None:
        return None
    quantization = (QuantizationConfig(spec.quantization_bit, cfg.quantization_type, cfg.double_quantization)
                    if spec.quantization_bit else None)
    if not spec.same_values:
        dtype = base_dtype(None, cfg.fp16, device)
    model, _ = load_model_and_tokenizer(spec.name_or_path, dtype=dtype, quantization=quantization,
                                        trust_remote_code=cfg.trust_remote_code)
    if quantization is None:
        model.to(device)
        if spec.same_values:
            for p in model.parameters():  # parameters only: buffers (rotary frequencies) keep their loaded dtype
                p.data = p.data.to(weights_dtype)
    reference: torch.nn.Module = model
    if spec.adapter:
        reference = TunedModel.load(model, spec.adapter)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def _train(cfg: Any, ranks: Ranks, objective: Objective) -> dict[str, Any]:
    if ranks.is_main:
        for note in cfg.ignored_settings():
            warnings.warn(note, UserWarning, stacklevel=2)
    seed_everything(cfg.seed)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    # one dtype for every rank: rank 0's choice (on a CPU it is measured; ranks measuring alone could disagree)
    choice = str(base_dtype(cfg.bf16, cfg.fp16, device)).removeprefix("torch.") if ranks.is_main else None
    dtype = getattr(torch, ranks.gather(choice)[0])
    quantization = cfg.quantization()
    model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, dtype=dtype, quantization=quantization,
                                                trust_remote_code=cfg.trust_remote_code)
    if quantization is None:  # a quantized model is loaded onto its device (bitsandbytes quantizes it there)
        model.to(device)
    train_data, eval_data = build_dataset(
        tokenizer,
        cfg.dataset,
        cfg.dataset_dir,
        kind=objective.data,
        stage=cfg.stage,
        template=cfg.template,
        cutoff_len=cfg.cutoff_len,
        max_samples=cfg.max_samples,
        val_size=cfg.val_size,
        eval_dataset=cfg.eval_dataset,
        train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history,
        enable_thinking=cfg.enable_thinking,
        packing=cfg.packing,
        seed=cfg.seed,
        mix_strategy=cfg.mix_strategy,
        interleave_probs=cfg.interleave_probs,
        overwrite_cache=cfg.overwrite_cache,
    )
    ranks.same_everywhere("configs", cfg.to_dict())
    ranks.same_everywhere("datasets", [train_data, eval_data])
    seed_everything(cfg.seed)  # adapter init must not depend on what data loading drew
    if cfg.adapter_name_or_path:
        tuned = TunedModel.load(model, cfg.adapter_name_or_path, trainable=True)
    else:
        tuned = TunedModel(model, cfg.method_config())
    if ranks.is_main:
        print(tuned.trainable_report())
    reference = load_reference(cfg, objective, tuned.method.in_place, dtype, next(tuned.model.parameters()).dtype,
                               device)
    padding_free = (cfg.padding_free and supports_padding_free(model)
                    and (reference is None or supports_padding_free(reference)))
    if cfg.padding_free and not padding_free:
        warnings.warn(f"padding_free: {type(model).__name__}'s attention cannot run padding-free here; "
                      "batches are padded instead.", stacklevel=2)
    if cfg.packing and not padding_free:
        check_packing_support(model)
    collator = collator_for(objective.data, tokenizer.pad_token_id, mask_dtype=model.dtype, padding_free=padding_free)
    trainer = Trainer(cfg, tuned, train_data, collator, eval_data, base_model_name=base_model_id(model),
                      tokenizer=tokenizer, objective=objective, ranks=ranks, reference=reference)
    kind = "model" if objective.saves_model else tuned.method.output_kind  # saving may merge the adapter away
    results = trainer.train()
    if ranks.is_main:
        print(f"Saved the {kind} to {cfg.output_dir} ({results['train_runtime']:.0f} s, "
              f"{results['train_tokens_per_second']:.0f} tokens/s)")
    return results
