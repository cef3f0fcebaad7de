"""`stage: kd`: knowledge distillation (Hinton et al. 2015): the student imitates a teacher's next-token
distributions at every label position, mixed with the ordinary next-token loss:

    loss per label token = kd_alpha * T^2 * D(p_teacher^T, p_student^T) + (1 - kd_alpha) * cross-entropy(label)

with p^T = softmax(logits / T) (`kd_temperature`; T^2 keeps the gradient's scale as T changes) and D by `kd_loss`:
- forward_kl: KL(p_t || p_s), the student covers every mode of the teacher (Hinton's);
- reverse_kl: KL(p_s || p_t), mode-seeking (MiniLLM);
- jsd: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with `kd_jsd_beta` = b:
  b KL(p_t || m) + (1 - b) KL(p_s || m), m = b p_t + (1 - b) p_s.
`kd_top_k` > 0 distils on the teacher's k most likely tokens only: both distributions renormalised over those k ids
(k = the vocabulary size gives the full loss). The data is SFT conversations (labels on the answers) or plain text
(every token), whichever the datasets are. The teacher runs without gradients, only at label positions, in the
fastest dtype the device has (measured, as for the base weights); it must share the student's vocabulary (checked
before any work). With `kd_cache_teacher` its top-k is computed once per example instead (teacher_cache.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..io.model_folder import save_model_folder
from ..settings import Setting
from ..varlen import attention_for
from . import teacher_cache
from .base import Batch, Objective, ReferenceSpec, register
from .sequences import model_inputs
from .sft import label_tokens
from .shrink import SHRINK_SETTINGS, Shrinker

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "forward_kl",
                      temperature: float = 1.0, jsd_beta: float = 0.5, top_k: int = 0) -> torch.Tensor:
    """The divergence of each row [rows] (float32) between teacher and student logits [rows, vocab], at temperature T
    and scaled by T^2; on the teacher's top-k ids only when `top_k` > 0."""
    if 0 < top_k < teacher.shape[-1]:
        teacher, ids = teacher.float().topk(top_k, dim=-1)
        student = student.gather(-1, ids)
    return divergence(student, teacher, kind, temperature, jsd_beta)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, jsd_beta: float
               ) -> torch.Tensor:
    """`kd_loss` per row between two sets of logits (or log-probs) over the same ids, both renormalised at T."""
    if kind not in KD_LOSSES:
        raise ValueError(f"kd_loss '{kind}' is unknown; choose from {', '.join(KD_LOSSES)}.")
    log_s = F.log_softmax(student.float() / temperature, -1)
    log_t = F.log_softmax(teacher.float() / temperature, -1)
    if kind == "forward_kl":
        rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        rows = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        b = jsd_beta
        log_m = torch.logsumexp(torch.stack([log_t + math.log(b), log_s + math.log(1 - b)]), dim=0)
        rows = (b * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - b) * (log_s.exp() * (log_s - log_m)).sum(-1))
    return rows * temperature ** 2


@register
class Kd(Objective):
    """`stage: kd`: distillation and next-token loss, summed over label tokens (the unit, as for SFT)."""

    name = "kd"
    data = "sft"
    yaml_keys: ClassVar[tuple[Setting, ...]] = (
        Setting("teacher_model_name_or_path", str | None, None, "kd: the teacher model (alias, folder or hub id); it "
                "must share the student's vocabulary.", "rlhf"),
        Setting("teacher_adapter_name_or_path", str | None, None, "kd: an adapter folder applied to the teacher.",
                "rlhf"),
        Setting("teacher_quantization_bit", int | None, None, "kd: load the teacher's linear layers in 4 or 8 bits.",
                "rlhf"),
        Setting("kd_temperature", float, 1.0, "kd: the softmax temperature T of both distributions.", "rlhf"),
        Setting("kd_alpha", float, 0.5, "kd: the weight of the distillation term; 1 - kd_alpha weighs the "
                "ordinary next-token loss.", "rlhf"),
        Setting("kd_loss", str, "forward_kl", "kd: the divergence: forward_kl, reverse_kl or jsd.", "rlhf", KD_LOSSES),
        Setting("kd_jsd_beta", float, 0.5, "kd: the mixing weight beta of kd_loss: jsd.", "rlhf"),
        Setting("kd_top_k", int, 0, "kd: distil on the teacher's top-k tokens only (renormalised); 0: the whole "
                "vocabulary.", "rlhf"),
        Setting("kd_cache_teacher", bool, False, "kd: compute the teacher's top-k log-probs (kd_top_k > 0) once per "
                "example, before training, and keep them in the dataset cache: no epoch or rerun runs the teacher "
                "again (stored in float16).", "rlhf"),
        *SHRINK_SETTINGS,
    )

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, jsd_beta: float = 0.5,
                 top_k: int = 0, data: str = "sft", cache: dict[str, Any] | None = None,
                 shrinker: Shrinker | None = None) -> None:
        super().__init__()
        if kind not in KD_LOSSES:
            raise ValueError(f"kd_loss '{kind}' is unknown; choose from {', '.join(KD_LOSSES)}.")
        self.kind, self.temperature, self.alpha, self.jsd_beta, self.top_k = kind, temperature, alpha, jsd_beta, top_k
        self.data = data  # type: ignore[misc]  # per run: conversations or plain text, as the datasets are
        # kd_cache_teacher: the teacher's identity for the cache key (teacher, adapter, quantization_bit) and the
        # folder; None: the teacher runs at every step
        self.cache = cache
        self.shrinker = shrinker  # progressive shrinking (shrink.py), or None
        self.teacher_seconds = 0.0
        self.teacher_forwards = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Kd:
        from ..data.sources import dataset_kind

        data = dataset_kind(cfg.dataset, cfg.dataset_dir) if cfg.dataset else "sft"
        cache = None
        if cfg.kd_cache_teacher:
            from ..data.dataset import default_cache_dir

            cache = {"teacher": cfg.teacher_model_name_or_path, "adapter": cfg.teacher_adapter_name_or_path,
                     "quantization_bit": cfg.teacher_quantization_bit, "folder": default_cache_dir()}
        shrinker = None
        if cfg.shrink_target_layers is not None:
            shrinker = Shrinker(cfg.shrink_target_layers, cfg.shrink_steps, cfg.shrink_every, cfg.shrink_criterion)
        return cls(cfg.kd_loss, cfg.kd_temperature, cfg.kd_alpha, cfg.kd_jsd_beta, cfg.kd_top_k,
                   "text" if data == "text" else "sft", cache, shrinker)

    def uses_reference(self, cfg: Any = None) -> bool:
        return True

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        # a shrinking student starts as a copy of its teacher: by default the model itself, whole, kept apart
        return ReferenceSpec("teacher_model_name_or_path", cfg.teacher_model_name_or_path or cfg.model_name_or_path,
                             cfg.teacher_adapter_name_or_path, cfg.teacher_quantization_bit)

    @property
    def saves_model(self) -> bool:  # type: ignore[override]
        return self.shrinker is not None

    def attach(self, model: nn.Module, reference: nn.Module | None = None) -> None:
        super().attach(model, reference)
        if self.shrinker is not None:
            self.shrinker.bind(model.model)

    def check_run(self, total_steps: int, processes: int) -> None:
        if self.shrinker is None:
            return
        if processes > 1:
            raise ConfigError("Progressive shrinking removes layers during training, which DDP and FSDP cannot "
                              "follow: run it in one process.")
        self.shrinker.check_run(total_steps)

    def after_step(self, step: int, batches: Sequence[Batch]) -> list[nn.Parameter]:
        if self.shrinker is None:
            return []
        return self.shrinker.step(step, self.model.model, self.model, batches)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.shrinker is None:
            return {}
        return {"shrink_removed": torch.tensor(self.shrinker.removed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.shrinker is None or "shrink_removed" not in state:
            return super().load_state_dict(state)
        self.shrinker.replay(self.model.model, state["shrink_removed"].tolist())

    def save(self, output_dir: Path) -> None:
        """A shrunk student is saved whole: a transformers model folder with its remaining layers, any adapter merged
        (the base it would apply to no longer exists)."""
        if self.shrinker is not None:
            save_model_folder(self.model.merge_and_unload(verify=False), output_dir)

    def check_vocabulary(self, size: int) -> None:
        if self.top_k > size:
            raise ConfigError(f"kd_top_k={self.top_k} is more than the vocabulary's {size} tokens; use at most "
                              f"{size} (or 0 for the whole vocabulary).")

    def units(self, batch: Batch) -> int:
        return label_tokens(batch)

    def results(self) -> dict[str, Any]:
        # the teacher's forwards (training, evaluation and filling the cache) and their time
        out: dict[str, Any] = {"teacher_seconds": round(self.teacher_seconds, 3),
                               "teacher_forwards": self.teacher_forwards}
        if self.shrinker is not None:  # the original indices of the removed layers, in the order they went
            out["shrink_removed_layers"] = list(self.shrinker.removed)
        return out

    def annotate(self, rows: list[dict], collate: Callable[[list[dict]], Batch], batch_size: int) -> list[dict]:
        """kd_cache_teacher: each example gets its teacher top-k, from the cache or computed now (teacher_cache.py)."""
        if self.cache is None or not rows:
            return rows
        if self.reference is None:
            raise RuntimeError("kd_cache_teacher needs the teacher attached first (Objective.attach).")
        dtype = next(self.reference.parameters()).dtype
        counts = teacher_cache.label_counts(rows, collate)
        key = teacher_cache.cache_key(self.cache["teacher"], self.cache["adapter"], self.cache["quantization_bit"],
                                      dtype, self.top_k, rows, counts)
        path = Path(self.cache["folder"]) / f"teacher-{key}.safetensors"
        return teacher_cache.annotate(rows, collate, self._teacher_topk, path, counts, batch_size)

    def _teacher_logits(self, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at the kept positions: no gradient, timed and counted."""
        start = time.perf_counter()
        with torch.no_grad(), attention_for(self.reference, batch):
            logits = self.reference(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits
        self.teacher_seconds += time.perf_counter() - start
        self.teacher_forwards += 1
        return logits

    def _teacher_topk(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k ids and log-probs (full softmax, T = 1) at a batch's label positions, in order."""
        device = next(self.reference.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch["labels"][:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        logits = self._teacher_logits(batch, keep)[targets[:, keep] != IGNORE_INDEX]
        logps, ids = F.log_softmax(logits.float(), -1).topk(self.top_k, dim=-1)
        return ids, logps

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("stage kd needs its teacher: the Trainer attaches it (teacher_model_name_or_path).")
        targets = batch["labels"][:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        with attention_for(model, batch):
            student = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits
        targets = targets[:, keep]
        counted = targets != IGNORE_INDEX
        student = student[counted]
        if teacher_cache.IDS in batch:  # cached: the teacher's top-k log-probs, renormalised over its k ids
            kd = divergence(student.gather(-1, batch[teacher_cache.IDS].long()), batch[teacher_cache.LOGPS],
                            self.kind, self.temperature, self.jsd_beta).sum()
        else:
            teacher = self._teacher_logits(batch, keep)[counted]
            kd = distillation_loss(student, teacher, self.kind, self.temperature, self.jsd_beta, self.top_k).sum()
        ce = F.cross_entropy(student.float(), targets[counted], reduction="sum")
        n = int(counted.sum())
        self.record("kd_loss", kd.detach(), n)
        self.record("ce_loss", ce.detach(), n)
        return self.alpha * kd + (1 - self.alpha) * ce
