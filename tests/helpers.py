"""Training helpers shared by the trainer and method tests: a config namespace, learnable data, a short run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch
from conftest import VOCAB

from peftkit.data import SFTCollator
from peftkit.train import Trainer


def make_cfg(tmp_path, **overrides) -> SimpleNamespace:
    """The trainer's settings without TrainConfig's model/data checks (the trainer only reads these)."""
    cfg = dict(
        stage="sft", output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, num_train_epochs=2.0, max_steps=-1, lr_scheduler_type="linear", lr_scheduler_kwargs={},
        warmup_ratio=0.0, warmup_steps=0, max_grad_norm=1.0, logging_steps=1, eval_steps=None, eval_strategy="no",
        save_steps=500, save_strategy="steps", save_total_limit=None, seed=7, gradient_checkpointing=False,
        resume_from_checkpoint=None, load_best_model_at_end=False, plot_loss=False,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """Variable-length random prompts with an easily learnt answer (fixed tokens), loss on the answer only."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        answer = [5, 6, 7, 8, prompt[0]]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def run(cfg, data, tuned, eval_data=None, padding_free: bool = False) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, tuned, data, SFTCollator(pad_token_id=0, padding_free=padding_free), eval_data)
    return trainer, trainer.train()


def read_log(cfg) -> list[dict]:
    path = f"{cfg.output_dir}/trainer_log.jsonl"
    return [json.loads(line) for line in open(path) if line.strip()]


def train_losses(tuned, tmp_path, steps: int = 30, lr: float = 1e-2, **overrides) -> list[float]:
    """Train `tuned`'s active adapter for `steps` steps on `synthetic_examples`; the logged loss of every step."""
    cfg = make_cfg(tmp_path, max_steps=steps, learning_rate=lr, **overrides)
    run(cfg, synthetic_examples(16), tuned)
    return [e["loss"] for e in read_log(cfg) if "loss" in e]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters that differ from `before` (parameters new since then count as changed)."""
    return {n for n, p in model.named_parameters() if n not in before or not torch.equal(p, before[n])}


def rounding_tolerance(reference: torch.Tensor, dtype: torch.dtype = torch.float32, terms: int = 64,
                       depth: int = 6) -> float:
    """How far two mathematically equal computations of `reference` may differ by rounding alone: `dtype`'s epsilon,
    growing with the square root of the longest sum (`terms`) and with the chained matmuls (`depth`), relative to the
    values' size. A bound from the arithmetic, not from one CPU's summation order; a real bug is orders larger."""
    eps = torch.finfo(dtype).eps
    return 8 * eps * math.sqrt(terms) * depth * max(1.0, reference.abs().max().item())
