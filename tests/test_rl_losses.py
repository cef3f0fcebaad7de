"""GRPO's and PPO's losses, advantages and controllers against references written from TRL's code and the papers'
equations, on fixed log-probs, advantages and masks (<= 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peftkit.objectives.grpo import LOSS_TYPES, group_advantages, grpo_token_losses, reduce_loss
from peftkit.objectives.ppo import AdaptiveKL, RunningMoments, gae, masked_whiten, ppo_token_losses


def fixed_batch(rows: int = 6, width: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """[rows, width] log-probs of a policy, its sampling policy and a reference, advantages and a completion mask
    (each row a different length, at least 1)."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = logps + torch.randn(rows, width, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).double()
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "mask": mask, "advantages": advantages}


def trl_grpo_loss(b: dict[str, torch.Tensor], loss_type: str, beta: float, eps_low: float, eps_high: float,
                  max_completion_length: int, num_items_in_batch: float, accumulation: int) -> torch.Tensor:
    """TRL 1.16's GRPOTrainer._compute_loss for one micro-batch, as written there (padded [B, T] with a mask)."""
    per_token_logps, mask = b["logps"], b["mask"]
    advantages = b["advantages"].unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - b["old"])
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_kl = torch.exp(b["ref"] - per_token_logps) - (b["ref"] - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    return (per_token_loss * mask).sum() / num_items_in_batch  # dapo: the whole step's tokens (one process)


def flat(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded batch as peftkit lays it out: label tokens only, sequence by sequence, with their sequence."""
    keep = b["mask"].bool()
    sequence = torch.arange(len(keep))[:, None].expand_as(keep)[keep]
    return {"logps": b["logps"][keep], "old": b["old"][keep], "ref": b["ref"][keep], "sequence": sequence,
            "advantages": b["advantages"][sequence], "count": len(keep)}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_of_an_accumulated_step_equals_trl(loss_type, beta) -> None:
    """Two micro-batches of one step: peftkit's sum / units over the step equals TRL's accumulated loss."""
    batches = [fixed_batch(seed=1), fixed_batch(seed=2)]
    eps_low, eps_high, max_len = 0.2, 0.28, 7
    items = sum(float(b["mask"].sum()) for b in batches)
    expected = sum(trl_grpo_loss(b, loss_type, beta, eps_low, eps_high, max_len, items, len(batches))
                   for b in batches)
    total, units = 0.0, 0.0
    for b in batches:
        f = flat(b)
        losses, _, _ = grpo_token_losses(f["logps"], f["old"], f["advantages"], f["ref"], beta, eps_low, eps_high)
        loss_sum, n = reduce_loss(loss_type, losses, f["sequence"], f["count"], max_len)
        total, units = total + loss_sum, units + n
    assert abs(float(total / units) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))


def test_grpo_clip_indicator_and_no_reference_at_beta_zero() -> None:
    f = flat(fixed_batch(seed=3))
    _, clipped, kl = grpo_token_losses(f["logps"], f["old"], f["advantages"], f["ref"], 0.0, 0.2, 0.2)
    ratio = torch.exp(f["logps"] - f["old"])
    want = ((ratio < 0.8) & (f["advantages"] < 0)) | ((ratio > 1.2) & (f["advantages"] > 0))
    assert kl is None and torch.equal(clipped.bool(), want) and 0 < int(want.sum()) < len(want)


def test_group_advantages_equal_trl() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0])
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = grouped.std(1).repeat_interleave(4)  # unbiased, as TRL's nanstd
    assert torch.allclose(group_advantages(rewards, 4, "group"), (rewards - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, "batch"), (rewards - mean) / (rewards.std() + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, "none"), rewards - mean, atol=1e-6)
    assert torch.equal(group_advantages(rewards, 4)[4:8], torch.zeros(4))  # a group that agrees teaches nothing


def test_gae_equals_the_recursion_per_sequence() -> None:
    """GAE (Schulman et al. 2016, eq. 16) written as the plain recursion over each sequence's own tokens."""
    b = fixed_batch(rows=5, width=6, seed=4)
    rewards, values, mask = b["logps"], b["ref"], b["mask"]
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i in range(len(mask)):
        n = int(mask[i].sum())
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        a, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t]
            running = delta + gamma * lam * running
            a[t] = running
        assert np.allclose(advantages[i, :n].numpy(), a, atol=1e-6)
        assert np.allclose(returns[i, :n].numpy(), np.array(a) + np.array(v), atol=1e-6)


def test_ppo_losses_equal_trl() -> None:
    """TRL's (legacy) PPOTrainer.loss: masked means of the clipped policy and value losses and clip fractions."""
    b = fixed_batch(rows=5, width=6, seed=5)
    g = torch.Generator().manual_seed(6)
    adv = torch.randn(b["mask"].shape, generator=g, dtype=torch.float64)
    old_values = torch.randn(b["mask"].shape, generator=g, dtype=torch.float64)
    values = old_values + torch.randn(b["mask"].shape, generator=g, dtype=torch.float64) * 0.4
    returns = torch.randn(b["mask"].shape, generator=g, dtype=torch.float64)
    mask, clip, clip_v = b["mask"], 0.2, 0.2

    def mm(x):
        return (x * mask).sum() / mask.sum()

    vpredclipped = torch.max(torch.min(values, old_values + clip_v), old_values - clip_v)
    vf1, vf2 = (values - returns) ** 2, (vpredclipped - returns) ** 2
    ratio = torch.exp(b["logps"] - b["old"])
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    want = {"policy": mm(torch.max(pg1, pg2)), "value": 0.5 * mm(torch.max(vf1, vf2)),
            "clipfrac": mm(torch.gt(pg2, pg1).double()), "value_clipfrac": mm(torch.gt(vf2, vf1).double())}
    keep = mask.bool()
    parts = ppo_token_losses(b["logps"][keep], b["old"][keep], adv[keep], values[keep], old_values[keep],
                             returns[keep], clip, clip_v)
    for name, value in want.items():
        got = parts[name].sum() / keep.sum()
        assert abs(float(got) - float(value)) <= 1e-6, name
    assert 0 < float(want["clipfrac"]) < 1 and 0 < float(want["value_clipfrac"]) < 1  # both sides exercised


def test_masked_whiten_equals_trl() -> None:
    b = fixed_batch(seed=7)
    x, mask = b["logps"], b["mask"]
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    assert torch.allclose(masked_whiten(x, mask), (x - mean) * torch.rsqrt(var + 1e-8), atol=1e-9)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), (x - mean) * torch.rsqrt(var + 1e-8) + mean,
                          atol=1e-9)


def test_adaptive_kl_controller_steers_towards_the_target() -> None:
    kl = AdaptiveKL(0.2, target=6.0, horizon=100)
    kl.update(12.0, 10)  # twice the target: the error clips at +0.2
    assert math.isclose(kl.value, 0.2 * (1 + 0.2 * 10 / 100))
    kl.update(3.0, 10)  # half: -0.2
    assert math.isclose(kl.value, 0.2 * 1.02 * 0.98)
    kl.update(6.6, 50)  # +10 %
    assert math.isclose(kl.value, 0.2 * 1.02 * 0.98 * (1 + 0.1 * 0.5))
    fixed = AdaptiveKL(0.05, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_running_moments_equal_all_scores_seen() -> None:
    g = torch.Generator().manual_seed(8)
    moments, seen = RunningMoments(), []
    for n in (4, 7, 3):
        xs = torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1
        moments.update(xs)
        seen += xs.tolist()
    assert math.isclose(moments.mean, float(np.mean(seen)), abs_tol=1e-9)
    assert math.isclose(moments.std, float(np.std(seen, ddof=1)), abs_tol=1e-9)
