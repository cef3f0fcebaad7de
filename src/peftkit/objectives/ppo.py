"""`stage: ppo`: RLHF's third step (Ouyang et al. 2022), proximal policy optimisation against a reward model, with
LLaMA-Factory's keys and TRL's (legacy PPOTrainer's) equations and defaults, which LLaMA-Factory trains with.

One step: sample one completion per prompt for `ppo_buffer_size` x accumulation micro-batches of prompts; score each
with the reward model (scorer.py; `ppo_score_norm` normalises scores by their running mean and std); per token, the
reward is -kl_coef (pi_old - ref) plus, on the last token, the score; `ppo_whiten_rewards` whitens those. A value
head on the policy's hidden states (saved beside the adapter as value_head.safetensors) gives V; GAE
(Schulman et al. 2016, eq. 16; gamma `ppo_gamma`, lambda `ppo_lam`) gives advantages, whitened over the step, and
returns A + V. Then `ppo_epochs` passes over the samples, shuffled, `ppo_buffer_size` optimizer updates each, of

    max(-A r, -A clip(r, 1 - c, 1 + c)) + vf_coef 0.5 max((V - R)^2, (clip(V, V_old - c_v, V_old + c_v) - R)^2)

per token (r = exp(pi - pi_old)), averaged over the update's tokens. The KL coefficient follows the adaptive
controller of Ziegler et al. 2019 towards `ppo_target` (None: fixed at `ppo_init_kl_coef`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.templates import IGNORE_INDEX
from ..errors import ConfigError
from ..settings import Setting
from .base import Batch, Objective, ReferenceSpec, register
from .reference import REF_MODEL, REF_MODEL_ADAPTERS, separate_reference
from .rm import head_parameters, load_head_state, model_hidden_size, new_value_head, save_value_head
from .rollout import COLUMNS, PROMPT_IDS, Sampler, on_device_of, per_sequence, reference_token_logps
from .scorer import Scorer, load_scorer
from .sequences import token_outputs

_PPO = "rlhf"


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries (variance Bessel-corrected), TRL's whitening;
    without `shift_mean` the mean is added back."""
    mean = masked_mean(values, mask)
    centred = values - mean
    var = masked_mean(centred**2, mask)
    count = mask.sum()
    var = var * count / (count - 1) if count > 1 else var
    whitened = centred * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [samples, tokens] by generalised advantage estimation over right-padded responses:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; returns A + V. Advantages are not
    whitened here."""
    values, rewards = values * mask, rewards * mask
    last = torch.zeros_like(values[:, 0])
    out = []
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def ppo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
                     old_values: torch.Tensor, returns: torch.Tensor, cliprange: float, cliprange_value: float
                     ) -> dict[str, torch.Tensor]:
    """Per token: the clipped policy loss, the clipped value loss (with its 0.5), and whether each was clipped."""
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (clipped_values - returns) ** 2
    return {"policy": torch.max(pg1, pg2), "value": 0.5 * torch.max(vf1, vf2),
            "clipfrac": (pg2 > pg1).float(), "value_clipfrac": (vf2 > vf1).float(), "ratio": ratio}


class AdaptiveKL:
    """The KL coefficient: fixed, or adapted towards `target` (Ziegler et al. 2019, as TRL): after each step,
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) x samples / horizon."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, samples: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * samples / self.horizon


class RunningMoments:
    """The running mean and (unbiased) std of all scores so far (Chan et al.'s parallel update, as TRL)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        batch_mean, batch_var, n = xs.mean().item(), xs.var(unbiased=False).item(), xs.numel()
        delta = batch_mean - self.mean
        total = self.count + n
        old_sum = self.var * self.count + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = (old_sum + batch_var * n) / total
        self.count = total


@register
class Ppo(Objective):
    """`stage: ppo`: clipped policy and value losses over sampled, reward-model-scored completions."""

    name = "ppo"
    data = "prompts"
    yaml_keys: ClassVar[tuple[Setting, ...]] = (
        REF_MODEL, REF_MODEL_ADAPTERS,
        Setting("reward_model", str | None, None, "PPO: the reward model: a stage rm output folder (lora), a model "
                "folder with a value head (full), or a URL (api).", _PPO),
        Setting("reward_model_adapters", str | None, None, "PPO: an adapter folder applied to a full reward_model.",
                _PPO),
        Setting("reward_model_type", str, "lora", "PPO: lora (an rm adapter on the policy's own base), full (a "
                "separate model) or api (a reward server).", _PPO, ("lora", "full", "api")),
        Setting("ppo_epochs", int, 4, "PPO: passes over each step's samples.", _PPO),
        Setting("ppo_buffer_size", int, 1, "PPO: optimizer updates per pass; a step samples this many times "
                "per_device_train_batch_size x gradient_accumulation_steps prompts.", _PPO),
        Setting("ppo_score_norm", bool, False, "PPO: normalise scores by their running mean and std.", _PPO),
        Setting("ppo_whiten_rewards", bool, False, "PPO: whiten the per-token rewards before GAE.", _PPO),
        Setting("ppo_target", float | None, 6.0, "PPO: the KL the adaptive controller steers to. Empty: a fixed "
                "coefficient.", _PPO),
        Setting("ppo_init_kl_coef", float, 0.2, "PPO: the KL penalty's starting coefficient.", _PPO),
        Setting("ppo_horizon", int, 10000, "PPO: the adaptive KL controller's horizon, in samples.", _PPO),
        Setting("ppo_cliprange", float, 0.2, "PPO: the policy ratio's clip range.", _PPO),
        Setting("ppo_cliprange_value", float, 0.2, "PPO: the value prediction's clip range.", _PPO),
        Setting("ppo_vf_coef", float, 0.1, "PPO: the value loss's weight.", _PPO),
        Setting("ppo_gamma", float, 1.0, "PPO: GAE's discount.", _PPO),
        Setting("ppo_lam", float, 0.95, "PPO: GAE's lambda.", _PPO),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.sampler = Sampler(cfg)
        self.kl = AdaptiveKL(cfg.ppo_init_kl_coef, cfg.ppo_target, cfg.ppo_horizon)
        self.moments = RunningMoments()
        self.head: nn.Linear | None = None
        self.scorer: Scorer | None = None
        self.tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> Ppo:
        return cls(cfg)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if not cfg.reward_model:
            raise ConfigError("stage ppo needs reward_model: a stage rm output folder (reward_model_type: lora or "
                              "full) or a reward server's URL (reward_model_type: api).")
        if cfg.reward_model_type == "api" and not str(cfg.reward_model).startswith(("http://", "https://")):
            raise ConfigError(f"reward_model_type: api needs reward_model to be an http(s) URL, got "
                              f"'{cfg.reward_model}'.")
        for key in ("ppo_epochs", "ppo_buffer_size", "ppo_horizon"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}.")
        if cfg.ppo_target is not None and cfg.ppo_target <= 0:
            raise ConfigError(f"ppo_target must be greater than 0 (or empty for a fixed KL coefficient), got "
                              f"{cfg.ppo_target}.")

    def uses_reference(self, cfg: Any = None) -> bool:
        return True

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        return separate_reference(cfg, in_place)

    def bind(self, tokenizer: Any, collate: Any) -> None:
        self.tokenizer = tokenizer
        self.sampler.bind(tokenizer, collate.sequences)

    def attach(self, model: nn.Module, reference: nn.Module | None = None) -> None:
        super().attach(model, reference)
        if self.head is None:
            self.head = new_value_head(model_hidden_size(model), next(model.parameters()).device, zero=True)
        if self.scorer is None:
            self.scorer = load_scorer(self.cfg, model, self.tokenizer)

    def step_batches(self, accumulation: int) -> int:
        return accumulation * self.cfg.ppo_buffer_size

    # --- the step ---
    def rollout(self, step: int, group: list[Batch], counted: list[bool]) -> list[tuple[list[Batch], list[bool]]]:
        cfg = self.cfg
        prompts = [p for batch in group for p in batch[PROMPT_IDS]]
        columns = [c for batch in group for c in batch[COLUMNS]]
        sizes = [len(batch[PROMPT_IDS]) for batch in group]
        rollout = self.sampler.generate(self.model, prompts, columns, step)
        texts = [p + c for p, c in zip(self.sampler.prompt_texts(prompts), rollout.texts)]
        fields: dict[str, list[torch.Tensor]] = {"old_logps": [], "old_values": [], "ref_logps": [], "entropy": []}
        raw_scores, start = [], 0
        with torch.no_grad():
            for n in sizes:  # the old policy, the values, the reference and the scores, a micro-batch at a time
                batch = on_device_of(self.sampler.sequences(prompts[start:start + n],
                                                            rollout.completions[start:start + n]), self.model)
                out = token_outputs(self.model, batch, self.head, entropy=True)
                ref = reference_token_logps(self.model, self.reference, batch)
                for name, values in (("old_logps", out.logps), ("old_values", out.values), ("ref_logps", ref),
                                     ("entropy", out.entropy)):
                    fields[name] += per_sequence(values.detach().float(), out.sequence, out.count)
                raw_scores.append(self.scorer(batch, texts[start:start + n]).to(out.logps.device))
                start += n
        raw = torch.cat(raw_scores).float()
        score = raw
        if cfg.ppo_score_norm:
            self.moments.update(raw)
            score = (raw - self.moments.mean) / (self.moments.std + torch.finfo(torch.float32).eps)
        advantages, returns, kl = self._advantages(fields, score)
        self._record(rollout, raw, kl, fields)
        self.kl.update(kl.mean().item(), len(prompts))
        return self._updates(step, sizes, prompts, rollout.completions, fields, advantages, returns, counted)

    def _advantages(self, fields: dict[str, list[torch.Tensor]], score: torch.Tensor
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Per-token rewards (KL penalty, the score on the last token), GAE, whitened advantages, returns; and each
        sample's KL (summed over its tokens)."""
        old, ref, values = (_right_padded(fields[k]) for k in ("old_logps", "ref_logps", "old_values"))
        mask = _right_padded([torch.ones_like(t) for t in fields["old_logps"]])
        kl = (old - ref) * mask
        rewards = -self.kl.value * kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(last)), last] += score.to(rewards.device)
        if self.cfg.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, self.cfg.ppo_gamma, self.cfg.ppo_lam)
        advantages = masked_whiten(advantages, mask)
        lengths = mask.sum(1).long().tolist()
        return ([a[:n] for a, n in zip(advantages, lengths)], [r[:n] for r, n in zip(returns, lengths)],
                kl.sum(1))

    def _updates(self, step: int, sizes: list[int], prompts: list[list[int]], completions: list[list[int]],
                 fields: dict[str, list[torch.Tensor]], advantages: list[torch.Tensor], returns: list[torch.Tensor],
                 counted: list[bool]) -> list[tuple[list[Batch], list[bool]]]:
        """`ppo_epochs` passes, each over the samples in a seeded shuffled order (kept in order when a rank runs a
        batch it does not count, so the uncounted stays one micro-batch), cut into micro-batches of the data's
        sizes, `accumulation` per update."""
        ga = -(-len(sizes) // self.cfg.ppo_buffer_size)  # an epoch's last, shorter step still makes its updates
        updates = []
        for epoch in range(self.cfg.ppo_epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + step * 101 + epoch)
            order = torch.randperm(len(prompts), generator=g).tolist() if all(counted) else list(range(len(prompts)))
            batches, start = [], 0
            for n in sizes:
                chosen = order[start:start + n]
                batch = self.sampler.sequences([prompts[i] for i in chosen], [completions[i] for i in chosen])
                for name in ("old_logps", "old_values"):
                    batch[name] = torch.cat([fields[name][i] for i in chosen])
                batch["advantages"] = torch.cat([advantages[i] for i in chosen])
                batch["returns"] = torch.cat([returns[i] for i in chosen])
                batches.append(on_device_of(batch, self.model))
                start += n
            for k in range(0, len(batches), ga):
                updates.append((batches[k:k + ga], counted[k:k + ga]))
        return updates

    def _record(self, rollout: Any, raw: torch.Tensor, kl: torch.Tensor, fields: dict[str, list[torch.Tensor]]
                ) -> None:
        n = len(raw)
        self.record("reward", raw.sum().item(), n)
        self.record("kl", kl.sum().item(), n)
        self.record("kl_coef", self.kl.value * n, n)
        entropy = torch.cat(fields["entropy"])
        self.record("entropy", entropy.sum().item(), entropy.numel())
        self.record("response_length", rollout.tokens, n)
        self.record("rollout_tokens_per_second", rollout.tokens, rollout.seconds)

    # --- the loss of one update micro-batch ---
    def units(self, batch: Batch) -> float:
        if PROMPT_IDS in batch:
            return len(batch[PROMPT_IDS])
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if PROMPT_IDS in batch:
            return self.evaluate_prompts(batch)
        out = token_outputs(model, batch, self.head)
        parts = ppo_token_losses(out.logps, batch["old_logps"], batch["advantages"], out.values, batch["old_values"],
                                 batch["returns"], self.cfg.ppo_cliprange, self.cfg.ppo_cliprange_value)
        n = out.logps.numel()
        self.record("policy_loss", parts["policy"].detach().sum(), n)
        self.record("value_loss", parts["value"].detach().sum(), n)
        self.record("clipfrac", parts["clipfrac"].sum(), n)
        self.record("value_clipfrac", parts["value_clipfrac"].sum(), n)
        self.record("approxkl", 0.5 * ((out.logps.detach() - batch["old_logps"]) ** 2).sum(), n)
        return (parts["policy"] + self.cfg.ppo_vf_coef * parts["value"]).sum()

    @torch.no_grad()
    def evaluate_prompts(self, batch: Batch) -> torch.Tensor:
        """An evaluation batch: one greedy completion per prompt, scored by the reward model; the loss is minus the
        scores' sum (eval_loss: the negative mean score), and eval_reward is logged."""
        rollout = self.sampler.generate(self.model, batch[PROMPT_IDS], batch[COLUMNS], 0, sample=False)
        texts = [p + c for p, c in zip(self.sampler.prompt_texts(rollout.prompts), rollout.texts)]
        seq = on_device_of(self.sampler.sequences(rollout.prompts, rollout.completions), self.model)
        raw = self.scorer(seq, texts).float()
        self.record("reward", raw.sum().item(), len(raw))
        self.record("response_length", rollout.tokens, len(raw))
        return -raw.sum()

    # --- the value head and the controllers: checkpointed, saved ---
    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        return head_parameters(self.head)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: p.detach() for k, p in head_parameters(self.head)}
        state["ppo.kl_coef"] = torch.tensor(self.kl.value, dtype=torch.float64)
        state["ppo.score_moments"] = torch.tensor([self.moments.mean, self.moments.var, self.moments.count],
                                                  dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_head_state(self.head, state, self.name)
        self.kl.value = float(state["ppo.kl_coef"])
        self.moments.mean, self.moments.var, self.moments.count = state["ppo.score_moments"].tolist()

    def save(self, output_dir: Path) -> None:
        save_value_head(self.head, output_dir)

    def results(self) -> dict[str, Any]:
        return {**self.sampler.results(), "kl_coef": self.kl.value}


def _right_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
