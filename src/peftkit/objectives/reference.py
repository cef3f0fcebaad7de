"""What the preference stages (dpo, kto) share: their YAML keys and the reference model's log-probabilities.

The reference is the model before this stage. For adapter methods it is the base model with the adapter disabled
(TRL's and LLaMA-Factory's choice: no second copy of the weights); for full/freeze, or when `ref_model` is set, a
separate frozen model that the run loads.

Reference log-probs are computed on the fly, in the same step as the policy's, with no gradient (not precomputed once
per example): it costs one forward without backward per step (about a quarter of a step's compute) but needs no pass
over the data before training, no storage, and stays exact for any data order, resume point or number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..fused_ops import like_the_step
from ..settings import Setting
from .base import Batch, ReferenceSpec
from .sequences import sequence_logps

PREF_BETA = Setting("pref_beta", float, 0.1, "Preference stages: the temperature beta of the loss (DPO's beta).",
                    "rlhf")
PREF_FTX = Setting("pref_ftx", float, 0.0, "Preference stages: weight of an SFT loss on the chosen answer.", "rlhf")
REF_MODEL = Setting("ref_model", str | None, None,
                    "Preference stages: a separate reference model (alias, folder or hub id). Empty: the model "
                    "before training (adapter methods: the base with the adapter disabled).", "rlhf")
REF_MODEL_ADAPTERS = Setting("ref_model_adapters", str | None, None,
                             "Preference stages: an adapter folder applied to ref_model.", "rlhf")
REFERENCE_SETTINGS = (PREF_BETA, PREF_FTX, REF_MODEL, REF_MODEL_ADAPTERS)


def separate_reference(cfg: Any, in_place: bool) -> ReferenceSpec | None:
    """The separate reference model of a preference run: `ref_model` (with `ref_model_adapters`), or the base model
    again when the method trains the base weights themselves; None: the adapter-disabled model serves."""
    if cfg.ref_model or in_place:
        return ReferenceSpec("ref_model", cfg.ref_model or cfg.model_name_or_path, cfg.ref_model_adapters,
                             same_values=True)
    return None


@contextlib.contextmanager
def reference_of(policy: nn.Module | None, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference model to run inside the block: `reference` when the run has one, else `policy` (a TunedModel)
    with its adapter disabled (no second copy of the weights)."""
    if reference is not None:
        yield reference
    elif policy is None:
        raise RuntimeError("The objective was not attached to a model; the Trainer calls attach() before training.")
    else:
        with policy.disable_adapter():
            yield policy


def reference_logps(policy: nn.Module | None, reference: nn.Module | None, batch: Batch
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the reference model (see `reference_of`), detached.

    Grad mode is left as the caller has it: nothing in the reference requires gradients, so no graph is recorded,
    and the forward takes the same kernels as the policy's in the same step (varlen picks its attention by grad
    mode, and the fused norms and MLPs while the step runs them: fused_ops.like_the_step), so before the first update
    the policy's and the reference's log-probs agree to the last bit.
    """
    with reference_of(policy, reference) as model, like_the_step(model):
        logps, counts = sequence_logps(model, batch)
    return logps.detach(), counts
