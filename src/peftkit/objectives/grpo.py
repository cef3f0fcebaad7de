"""`stage: grpo`: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, eq. 3) on rewards a program
computes, with TRL's names so published recipes transfer.

Each step samples `num_generations` completions per prompt from the current policy (rollout.py) and scores them with
the weighted sum of `reward_funcs` (rewards.py). A completion's advantage is its reward minus its group's mean,
divided by the group's standard deviation + 1e-4 (`scale_rewards: group`; `batch`: the whole step's; `none`: not
divided), the same for each of its tokens. With pi the policy's token log-prob, pi_old the sampling policy's (equal
to pi, detached, unless `num_iterations` > 1 reuses the samples) and r = exp(pi - pi_old), each token's loss is

    -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta (exp(ref - pi) - (ref - pi) - 1)

the last term being the k3 estimate of KL(pi || ref) (Schulman 2020), left out (no reference forward) at beta 0.
`loss_type` reduces it as TRL does: `grpo`, each completion's token mean, averaged; `bnpo`, the mean over the
micro-batch's tokens; `dr_grpo` (Liu et al. 2025), the token sum over completions x max_new_tokens; `dapo` (Yu et
al. 2025), the token sum over the whole step's tokens. The loop's units make accumulation exact for each.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..settings import Setting
from .base import Batch, Objective, ReferenceSpec, register
from .reference import REF_MODEL, REF_MODEL_ADAPTERS, separate_reference
from .rewards import DEFAULT_FORMAT, call_reward, load_rewards
from .rollout import (
    COLUMNS,
    PROMPT_IDS,
    Rollout,
    Sampler,
    column_lists,
    frozen_token_logps,
    on_device_of,
    reference_token_logps,
)
from .sequences import TokenOutputs, sequence_count, token_outputs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Each reward minus its group's mean (groups are `group` consecutive samples of one prompt), divided by the
    group's (or the batch's) unbiased standard deviation + 1e-4 unless `scale` is none (TRL's `scale_rewards`)."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    std = grouped.std(dim=1).repeat_interleave(group) if scale == "group" else rewards.std().expand_as(rewards)
    return centred / (std + 1e-4)


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      ref_logps: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss, per-token clipped indicator, per-token k3 KL or None), all per label token (flat)."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    kl = None
    if ref_logps is not None and beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
    return losses, clipped.float(), kl


def reduce_loss(loss_type: str, losses: torch.Tensor, sequence: torch.Tensor, sequences: int,
                max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """(the loss sum the loop divides by the step's units, this micro-batch's units) for `loss_type`: the step's
    loss is then TRL's for that type (see the module's doc)."""
    if loss_type == "grpo":  # mean over each completion's tokens, then over completions
        sums = losses.new_zeros(sequences).index_add(0, sequence, losses)
        lengths = losses.new_zeros(sequences).index_add(0, sequence, torch.ones_like(losses))
        return (sums / lengths.clamp(min=1)).sum(), sequences
    if loss_type == "bnpo":  # the micro-batch's token mean; micro-batches averaged
        return losses.sum() / max(losses.numel(), 1), 1
    if loss_type == "dr_grpo":
        return losses.sum(), sequences * max_new_tokens
    if loss_type == "dapo":
        return losses.sum(), losses.numel()
    raise ValueError(f"loss_type '{loss_type}' is unknown; choose from {', '.join(LOSS_TYPES)}.")


@register
class Grpo(Objective):
    """`stage: grpo`: the group-relative clipped objective over sampled completions (see the module's doc)."""

    name = "grpo"
    data = "prompts"
    yaml_keys: ClassVar[tuple[Setting, ...]] = (
        REF_MODEL, REF_MODEL_ADAPTERS,
        Setting("num_generations", int, 8, "GRPO: completions sampled per prompt (a group); at least 2.", "rlhf"),
        Setting("reward_funcs", list, [], "GRPO: reward functions, summed with reward_weights: built-in accuracy, "
                "format, length, or dotted paths to Python functions (prompts, completions, **columns) -> floats.",
                "rlhf"),
        Setting("reward_weights", list | None, None, "GRPO: one weight per reward function. Empty: 1 each.", "rlhf"),
        Setting("reward_format_pattern", str, DEFAULT_FORMAT, "GRPO's `format` reward: the regex a whole "
                "completion must match.", "rlhf"),
        Setting("reward_length_budget", int, 256, "GRPO's `length` reward: completions longer than this many "
                "tokens are penalised (-1 at twice it).", "rlhf"),
        Setting("grpo_beta", float, 0.0, "GRPO: weight of the KL penalty to the reference model (0: no reference "
                "forward at all).", "rlhf"),
        Setting("grpo_epsilon", float, 0.2, "GRPO: the ratio clip range's lower side (and upper, unless "
                "grpo_epsilon_high is set).", "rlhf"),
        Setting("grpo_epsilon_high", float | None, None, "GRPO: the clip range's upper side (DAPO's clip-higher). "
                "Empty: grpo_epsilon.", "rlhf"),
        Setting("loss_type", str, "dapo", "GRPO: how token losses are averaged, as TRL names them: grpo, bnpo, "
                "dr_grpo, dapo.", "rlhf", LOSS_TYPES),
        Setting("scale_rewards", str, "group", "GRPO: divide advantages by the group's reward std (group), the "
                "step's (batch), or not (none: Dr. GRPO).", "rlhf", SCALE_REWARDS),
        Setting("num_iterations", int, 1, "GRPO: policy updates per batch of samples (TRL's mu).", "rlhf"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.group = cfg.num_generations
        self.beta, self.loss_type = cfg.grpo_beta, cfg.loss_type
        self.epsilon_low = cfg.grpo_epsilon
        self.epsilon_high = cfg.grpo_epsilon if cfg.grpo_epsilon_high is None else cfg.grpo_epsilon_high
        self.rewards = load_rewards(cfg.reward_funcs, cfg.reward_weights, cfg.reward_format_pattern,
                                    cfg.reward_length_budget)
        self.sampler = Sampler(cfg)

    @classmethod
    def from_config(cls, cfg: Any) -> Grpo:
        return cls(cfg)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (GRPO compares each completion with the others of "
                              f"its group), got {cfg.num_generations}.")
        if cfg.num_iterations < 1:
            raise ConfigError(f"num_iterations must be at least 1, got {cfg.num_iterations}.")
        if cfg.grpo_beta < 0:
            raise ConfigError(f"grpo_beta must be at least 0, got {cfg.grpo_beta}.")
        high = cfg.grpo_epsilon if cfg.grpo_epsilon_high is None else cfg.grpo_epsilon_high
        if not (0 < cfg.grpo_epsilon < 1 and high > 0):
            raise ConfigError(f"grpo_epsilon must be in (0, 1) and grpo_epsilon_high above 0, got "
                              f"{cfg.grpo_epsilon} and {cfg.grpo_epsilon_high}.")

    # --- what the run loads ---
    def uses_reference(self, cfg: Any = None) -> bool:
        return self.beta != 0

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        return separate_reference(cfg, in_place) if self.uses_reference() else None

    def bind(self, tokenizer: Any, collate: Any) -> None:
        self.sampler.bind(tokenizer, collate.sequences)

    def annotate(self, rows: list[dict], collate: Any, batch_size: int) -> list[dict]:
        """Every reward function called once on the first rows, with empty completions, before any training: a
        function that returns the wrong length or a non-number (or needs a column the data lacks) is a one-line
        error now, not after the first rollout."""
        probe = collate(list(rows[:2]))
        n = len(probe[PROMPT_IDS])
        columns = column_lists(probe[COLUMNS])
        prompts = self.sampler.prompt_texts(probe[PROMPT_IDS])
        for reward in self.rewards:
            call_reward(reward, prompts, [""] * n, [[] for _ in range(n)], columns)
        return rows

    # --- the step: sample, score, then update ---
    def rollout(self, step: int, group: list[Batch], counted: list[bool]) -> list[tuple[list[Batch], list[bool]]]:
        """Sample `num_generations` completions per prompt of the step (all in one decode batch), score them, and
        lay each micro-batch's groups out as one training micro-batch with its advantages (and the old and
        reference log-probs where the loss needs them); `num_iterations` updates on them."""
        prompts = [p for batch in group for p in batch[PROMPT_IDS] for _ in range(self.group)]
        columns = [c for batch in group for c in batch[COLUMNS] for _ in range(self.group)]
        rollout = self.sampler.generate(self.model, prompts, columns, step)
        rewards = self._rewards(rollout)
        advantages = group_advantages(rewards, self.group, self.cfg.scale_rewards)
        self._record_rollout(rollout, rewards)
        batches, start = [], 0
        for batch in group:
            n = len(batch[PROMPT_IDS]) * self.group
            seq = self.sampler.sequences(prompts[start:start + n], rollout.completions[start:start + n])
            seq["advantages"] = advantages[start:start + n].clone()
            seq = on_device_of(seq, self.model)
            if self.cfg.num_iterations > 1:  # samples reused: keep the sampling policy's log-probs for the ratio
                seq["old_logps"] = frozen_token_logps(self.model, seq)
            if self.uses_reference():
                seq["ref_logps"] = reference_token_logps(self.model, self.reference, seq)
            batches.append(seq)
            start += n
        return [(batches, list(counted)) for _ in range(self.cfg.num_iterations)]

    def _rewards(self, rollout: Rollout) -> torch.Tensor:
        """The weighted sum of the reward functions (NaN: no opinion, left out of the sum); each one's mean logged."""
        prompts = self.sampler.prompt_texts(rollout.prompts)
        columns = column_lists(rollout.columns)
        total = torch.zeros(len(rollout.texts), dtype=torch.float64)
        for reward in self.rewards:
            try:
                scores = torch.tensor(call_reward(reward, prompts, rollout.texts, rollout.completions, columns),
                                      dtype=torch.float64)
            except ConfigError:
                raise
            except Exception as e:
                e.add_note(f"peftkit: reward function '{reward.name}' raised during a rollout; the run stops here, "
                           "its last checkpoint is intact (resume_from_checkpoint: true continues from it).")
                raise
            seen = ~torch.isnan(scores)
            if seen.any():
                self.record(f"rewards/{reward.name}", scores[seen].sum().item(), int(seen.sum()))
            total += torch.nan_to_num(scores, nan=0.0) * reward.weight
        return total.float()

    def _record_rollout(self, rollout: Rollout, rewards: torch.Tensor) -> None:
        n = len(rewards)
        grouped = rewards.view(-1, self.group)
        self.record("reward", rewards.sum().item(), n)
        self.record("reward_std", grouped.std(dim=1).sum().item(), grouped.shape[0])
        self.record("frac_reward_zero_std", (grouped.std(dim=1) < 1e-6).float().sum().item(), grouped.shape[0])
        self.record("completions/mean_length", rollout.tokens, n)
        self.record("completions/clipped_ratio", sum(not f for f in rollout.finished), n)
        self.record("rollout_tokens_per_second", rollout.tokens, rollout.seconds)

    # --- the loss of one training micro-batch ---
    def units(self, batch: Batch) -> float:
        if PROMPT_IDS in batch:  # an evaluation batch: prompts
            return len(batch[PROMPT_IDS])
        n = sequence_count(batch)
        return {"grpo": n, "bnpo": 1, "dr_grpo": n * self.cfg.max_new_tokens,
                "dapo": int((batch["labels"] != IGNORE_INDEX).sum())}[self.loss_type]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if PROMPT_IDS in batch:
            return self.evaluate_prompts(batch)
        tokens: TokenOutputs = token_outputs(model, batch, entropy=True)
        old = batch.get("old_logps")
        old = tokens.logps.detach() if old is None else old
        advantages = batch["advantages"][tokens.sequence]
        losses, clipped, kl = grpo_token_losses(tokens.logps, old, advantages, batch.get("ref_logps"), self.beta,
                                                self.epsilon_low, self.epsilon_high)
        total, _ = reduce_loss(self.loss_type, losses, tokens.sequence, tokens.count, self.cfg.max_new_tokens)
        n = tokens.logps.numel()
        self.record("clip_ratio", clipped.sum(), n)
        if tokens.entropy is not None:
            self.record("entropy", tokens.entropy.sum(), n)
        if kl is not None:
            self.record("kl", kl.detach().sum(), n)
        return total

    @torch.no_grad()
    def evaluate_prompts(self, batch: Batch) -> torch.Tensor:
        """An evaluation batch: one greedy completion per prompt, scored; the loss is minus the rewards' sum (so
        eval_loss is the negative mean reward, lower is better), and eval_reward, eval_rewards/<name> are logged."""
        rollout = self.sampler.generate(self.model, batch[PROMPT_IDS], batch[COLUMNS], 0, sample=False)
        rewards = self._rewards(rollout)
        self.record("reward", rewards.sum().item(), len(rewards))
        self.record("completions/mean_length", rollout.tokens, len(rewards))
        return -rewards.sum()

    def results(self) -> dict[str, Any]:
        return self.sampler.results()

