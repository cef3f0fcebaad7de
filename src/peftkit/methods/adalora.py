"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023).

Each target linear layer W gets an update in SVD form (Eq. 3): y = W x + s * P diag(λ) Q x, with Q = lora_A [r, in],
λ = lora_E [r, 1] and P = lora_B [out, r]. During training the total rank falls from init_r * n to target_r * n
(n adapted layers) on a cubic schedule (Sec. 3.3); every deltaT steps the triplets (P_i, λ_i, Q_i) of lowest importance
get λ_i = 0. The importance of a weight is its smoothed sensitivity |w * dL/dw| times the smoothed uncertainty of that
sensitivity (Eq. 7-10); a triplet's is its λ's plus the mean of its P column's and its Q row's (Eq. 11). From step
total_step - tfinal on, the last mask is fixed. A regulariser keeps P and Q near orthonormal (Eq. 4).

The numbers are PEFT 0.21.2's (tuners/adalora), so masks, adapters and logits agree with it:
  - s = lora_alpha / (ranknum + 1e-5) with ranknum = init_r, also after pruning;
  - the regulariser is the mean over the 2n matrices of ||QQᵀ - I||_F and ||PᵀP - I||_F, not squared as in Eq. 4;
  - importance is updated after the optimizer step, from the new weights and the step's (clipped) gradients;
  - pruned triplets keep their P and Q rows in memory with λ = 0 (Adam may revive them until the mask is final);
    saving keeps only the triplets of `rank_pattern`, exactly as PEFT's `save_pretrained`.
`total_step` is the trainer's step count (`prepare`); a different value given by the user is replaced, with a warning.
Resuming from a checkpoint restores the weights and the rank pattern but starts the importance averages afresh.
With `load_best_model_at_end` the best step's weights are restored but the saved triplets are the final pattern's.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AdapterLoadError, ConfigError
from ..settings import Setting
from .base import (
    LINEAR_TYPES,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_TARGET,
    LinearAdapterLayer,
    Method,
    MethodConfig,
    TrainingContext,
    check_lora_scaling,
    find_targets,
    register,
)
from .lora import UNSUPPORTED_PEFT_KEYS

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5
# PEFT's AdaLoraConfig fields that are ours too; rank_pattern has its own form in the file
_PEFT_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "lora_alpha", "lora_dropout", "fan_in_fan_out", "target_modules", "layers_to_transform",
                "layers_pattern", "modules_to_save", "task_type")
_TRIPLET_DIMS = (("lora_A", 0), ("lora_E", 0), ("lora_B", 1))  # tensor, and the dimension that indexes triplets


def _check_int(value: Any, key: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"AdaLoRA {key} must be an integer >= {minimum}, got {value!r}.")


@dataclasses.dataclass
class AdaLoraConfig(MethodConfig):
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # set by the trainer (`prepare`)
    # module path -> which of its init_r triplets are kept; set by the allocation, read when loading
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8  # PEFT's default; from YAML, TrainConfig's default (2 x lora_rank) applies
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False

    method = "adalora"
    yaml_keys = (
        Setting("init_r", int, 12, "AdaLoRA: the starting rank of every module."),
        Setting("target_r", int, 8, "AdaLoRA: the average rank left when the budget schedule ends."),
        Setting("tinit", int, 0, "AdaLoRA: warm-up steps before pruning starts."),
        Setting("tfinal", int, 0, "AdaLoRA: steps at the end that keep the final budget fixed."),
        Setting("deltaT", int, 1, "AdaLoRA: steps between two budget allocations."),
        Setting("adalora_beta1", float, 0.85, "AdaLoRA: EMA factor of the sensitivity.", field="beta1"),
        Setting("adalora_beta2", float, 0.85, "AdaLoRA: EMA factor of the uncertainty.", field="beta2"),
        Setting("orth_reg_weight", float, 0.5, "AdaLoRA: weight of the orthogonality regulariser."),
        LORA_ALPHA, LORA_DROPOUT, LORA_TARGET,
    )

    def __post_init__(self) -> None:
        _check_int(self.init_r, "init_r", 1)
        _check_int(self.target_r, "target_r", 1)
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRA target_r ({self.target_r}) is larger than init_r ({self.init_r}): the rank "
                              "budget can only shrink. Set init_r >= target_r (e.g. init_r = 1.5 x target_r).")
        _check_int(self.tinit, "tinit", 0)
        _check_int(self.tfinal, "tfinal", 0)
        _check_int(self.deltaT, "deltaT", 1)
        for key, beta in (("adalora_beta1", self.beta1), ("adalora_beta2", self.beta2)):
            if not 0 < beta < 1:
                raise ConfigError(f"AdaLoRA {key} (an EMA factor) must be in (0, 1), got {beta!r}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")
        check_lora_scaling(self.lora_alpha, self.lora_dropout)
        if self.total_step is not None:
            _check_int(self.total_step, "total_step", 1)
            check_schedule(self, self.total_step)
        for path, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or len(mask) != self.init_r:
                raise ConfigError(f"AdaLoRA rank_pattern['{path}'] must list init_r={self.init_r} booleans, got "
                                  f"{mask!r}.")

    # --- PEFT's ADALORA format: our tensor names are PEFT's (no ".weight": PEFT keeps them in ParameterDicts) ---
    peft_type = "ADALORA"

    def to_peft(self) -> dict[str, Any]:
        pattern = self.rank_pattern
        return {
            **{k: getattr(self, k) for k in _PEFT_FIELDS},
            "alpha_pattern": {},
            "bias": "none",
            "init_lora_weights": self.init_lora_weights,
            "loftq_config": {},
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "r": 8,  # LoraConfig's default, unused by AdaLoRA (PEFT warns when it is anything else)
            "rank_pattern": None if pattern is None else {f"{p}.lora_E": list(mask) for p, mask in pattern.items()},
            "use_dora": False,
            "use_rslora": False,
        }

    @classmethod
    def from_peft(cls, raw: dict[str, Any], where: str) -> AdaLoraConfig:
        unsupported = {**{k: v for k, v in UNSUPPORTED_PEFT_KEYS.items() if k != "rank_pattern"}, "bias": "none"}
        for key, neutral in unsupported.items():
            if raw.get(key, neutral) not in (neutral, None, {}, False):
                raise AdapterLoadError(f"{where} uses PEFT's '{key}' ({raw[key]!r}), which peftkit's AdaLoRA does not "
                                       "support.")
        values = {k: raw[k] for k in _PEFT_FIELDS if raw.get(k) is not None}
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
        if raw.get("rank_pattern"):  # {"<module>.lora_E": [bool] * init_r}; older files may keep the adapter name
            values["rank_pattern"] = {k.rsplit(".lora_E", 1)[0]: [bool(b) for b in mask]
                                      for k, mask in raw["rank_pattern"].items()}
        try:
            return AdaLoraConfig(**values)
        except ConfigError as e:
            raise AdapterLoadError(f"{where} holds an AdaLoRA config peftkit cannot use: {e}") from e


def check_schedule(cfg: AdaLoraConfig, total_step: int) -> None:
    """The budget must have at least one step to fall in: tinit < total_step - tfinal (as PEFT requires)."""
    if cfg.tinit >= total_step - cfg.tfinal:
        raise ConfigError(
            f"AdaLoRA tinit={cfg.tinit} and tfinal={cfg.tfinal} leave no step for rank allocation in {total_step} "
            f"training steps (it runs from step tinit to total steps - tfinal). Lower tinit or tfinal, or train longer "
            "(max_steps / num_train_epochs)."
        )


class AdaLoraLinear(LinearAdapterLayer):
    """The SVD-form update on nn.Linear or GPT-2's Conv1D (weight stored [in, out])."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()  # Q, right singular vectors [r, in]
        self.lora_E = nn.ParameterDict()  # λ, singular values [r, 1]
        self.lora_B = nn.ParameterDict()  # P, left singular vectors [out, r]
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, cfg: AdaLoraConfig, rank: int) -> None:
        device = self.base_layer.weight.device
        A = torch.randn(rank, self.in_features, device=device)
        E = torch.randn(rank, 1, device=device)
        B = torch.randn(self.out_features, rank, device=device)
        if cfg.init_lora_weights:  # PEFT's init: λ = 0 so training starts from the base model
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_E[name] = nn.Parameter(E)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.lora_alpha / (cfg.init_r + RANKNUM_EPS)

    def rank(self, name: str) -> int:
        return self.lora_E[name].shape[0]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[name], "lora_E": self.lora_E[name], "lora_B": self.lora_B[name]}

    def delete_adapter(self, name: str) -> None:
        for holder in (self.lora_A, self.lora_E, self.lora_B, self.lora_dropout):
            if name in holder:
                del holder[name]
        self.scaling.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * P diag(λ) Q in [out, in] layout and fp32."""
        return (self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name])).float() * self.scaling[name]

    def merge(self, name: str) -> None:
        if self.merged_adapters:
            self.unmerge()
        self._set_base_weight(self._base_weight().float() + self.delta_weight(name))
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        for name in self.merged_adapters:
            self._set_base_weight(self._base_weight().float() - self.delta_weight(name))
        self.merged_adapters = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.use_adapter:
            return result
        name = self.active_adapter
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(A.dtype))
        return result + (F.linear(F.linear(h, A * E), B) * self.scaling[name]).to(result.dtype)


class RankAllocator:
    """Importance scores (Eq. 7-11) and the cubic budget schedule (Sec. 3.3) of one adapter, as PEFT's RankAllocator."""

    def __init__(self, layers: list[tuple[str, AdaLoraLinear]], adapter_name: str, cfg: AdaLoraConfig) -> None:
        self.layers = layers
        self.name = adapter_name
        self.cfg = cfg
        self.init_budget = sum(layer.rank(adapter_name) for _, layer in layers)
        self.target_budget = cfg.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def _tensors(self) -> list[tuple[tuple[str, str], nn.Parameter]]:
        return [((path, role), t) for path, layer in self.layers for role, t in layer.adapter_state(self.name).items()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's |w * grad| into the smoothed sensitivity (beta1) and its uncertainty (beta2)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, p in self._tensors():
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            sens = b1 * self.sensitivity.get(key, torch.zeros_like(p)) + (1 - b1) * ipt
            self.uncertainty[key] = b2 * self.uncertainty.get(key, torch.zeros_like(p)) + (1 - b2) * (ipt - sens).abs()
            self.sensitivity[key] = sens

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to mask now): init_budget until tinit, then a cubic fall to
        target_budget at total_step - tfinal, masking every deltaT steps."""
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    def _score(self, key: tuple[str, str]) -> torch.Tensor:
        return self.sensitivity[key] * self.uncertainty[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Eq. 11: λ_i's score + mean score of Q's row i + mean score of P's column i, per module."""
        out = {}
        for path, _ in self.layers:
            q_row = self._score((path, "lora_A")).mean(dim=1)
            p_col = self._score((path, "lora_B")).mean(dim=0)
            out[path] = self._score((path, "lora_E")).view(-1) + (q_row + p_col)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the λ of all but the `budget` most important triplets; returns the kept triplets per module."""
        scores = self.triplet_scores()
        n_pruned = self.init_budget - budget
        # PEFT's torch.kthvalue fails for k = 0 (nothing to prune yet); we keep every triplet then.
        threshold = torch.kthvalue(torch.cat(list(scores.values())), n_pruned).values.item() if n_pruned > 0 else None
        pattern = {}
        for path, layer in self.layers:
            score = scores[path]
            keep = ~(score <= threshold) if threshold is not None else torch.ones_like(score, dtype=torch.bool)
            layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[path] = keep.tolist()
        return pattern


@register
class AdaLora(Method):
    """SVD-form low-rank adapters whose ranks are reallocated by importance during training."""

    name = "adalora"
    config_class = AdaLoraConfig
    config: AdaLoraConfig

    def __init__(self, model: nn.Module, config: MethodConfig, adapter_name: str) -> None:
        super().__init__(model, config, adapter_name)
        self.allocator: RankAllocator | None = None
        self.fixed_ranks: bool | None = None  # decided at the first step: True when the ranks were already allocated
        self.initial_ranks: dict[str, int] = {}
        self.final_ranks: dict[str, int] | None = None  # per module, once the final mask is fixed

    def attach(self) -> None:
        cfg = self.config
        paths = find_targets(self.model, cfg.target_modules, layers_to_transform=cfg.layers_to_transform,
                             layers_pattern=cfg.layers_pattern, types=LINEAR_TYPES, exclude=cfg.modules_to_save)
        if cfg.target_modules is None:  # record what the architecture default resolved to, as PEFT does
            cfg.target_modules = sorted({p.rsplit(".", 1)[-1] for p in paths})
        pattern = cfg.rank_pattern or {}
        stray = sorted(set(pattern) - set(paths))
        if stray:
            raise ConfigError(f"AdaLoRA rank_pattern names '{stray[0]}', which target_modules does not adapt.")
        for path in paths:
            module = self.wrap(path, AdaLoraLinear)
            if module.fan_in_fan_out:
                cfg.fan_in_fan_out = True
            # A loaded adapter's pruned triplets are absent from its file: build only the kept ones.
            module.add(self.adapter_name, cfg, sum(map(bool, pattern[path])) if path in pattern else cfg.init_r)
        self.attach_modules_to_save()
        self.initial_ranks = self.ranks()

    def adalora_layers(self) -> list[tuple[str, AdaLoraLinear]]:
        return [(p, layer) for p, layer in self.layers() if isinstance(layer, AdaLoraLinear)]

    def ranks(self) -> dict[str, int]:
        """Current rank of every adapted module: its kept triplets."""
        pattern = self.config.rank_pattern or {}
        return {p: sum(map(bool, pattern[p])) if p in pattern else layer.rank(self.adapter_name)
                for p, layer in self.adalora_layers()}

    # --- training hooks ---
    def prepare(self, context: TrainingContext) -> None:
        """Take total_step from the run and check the schedule before the first step."""
        cfg = self.config
        total = int(context.total_steps)
        if cfg.total_step is not None and cfg.total_step != total:
            warnings.warn(f"AdaLoRA total_step={cfg.total_step} differs from the {total} steps this run trains; "
                          f"the budget schedule uses {total}.", UserWarning, stacklevel=2)
        check_schedule(cfg, total)
        cfg.total_step = total
        self._start()

    def _start(self) -> None:
        """Reallocate ranks in this run, unless the adapter's were already allocated (a loaded or trained adapter)."""
        cfg = self.config
        self.fixed_ranks = cfg.rank_pattern is not None
        if self.fixed_ranks:
            warnings.warn("This AdaLoRA adapter's ranks were already allocated (it has a rank_pattern); training "
                          "continues at those ranks without reallocating them.", UserWarning, stacklevel=3)
            return
        if cfg.total_step is None:
            raise ConfigError("AdaLoRA's budget schedule needs total_step: train with peftkit's Trainer (it sets "
                              "total_step to its number of steps), or set AdaLoraConfig(total_step=...).")
        self.allocator = RankAllocator(self.adalora_layers(), self.adapter_name, cfg)

    def loss_term(self) -> torch.Tensor | None:
        """orth_reg_weight x mean over matrices of ||QQᵀ - I||_F and ||PᵀP - I||_F (PEFT's form of Eq. 4)."""
        weight = self.config.orth_reg_weight
        layers = self.adalora_layers()
        if weight == 0 or not layers:
            return None
        terms = []
        for _, layer in layers:
            Q, P = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            for cov in (Q @ Q.T, P.T @ P):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.norm(cov - eye) if cov.numel() else cov.new_zeros(()))
        return weight * torch.stack(terms).mean()

    def on_step_end(self, step: int) -> None:
        """Update importance and mask to the step's budget; at total_step - tfinal fix the final mask."""
        cfg = self.config
        if self.fixed_ranks is None:  # a training loop of the user's own, which did not call prepare()
            self._start()
        if self.fixed_ranks:
            self._apply_pattern()
            return
        final = cfg.total_step - cfg.tfinal
        if step < final:
            self.allocator.update()
            budget, mask_now = self.allocator.budget(step)
            if mask_now:
                cfg.rank_pattern = self.allocator.mask_to_budget(budget)
        elif step == final:
            if not self.allocator.sensitivity:  # allocation started at its last step (PEFT fails here)
                self.allocator.update()
            cfg.rank_pattern = self.allocator.mask_to_budget(self.allocator.budget(step)[0])
            self.allocator.reset()
            self.final_ranks = self.ranks()
            tqdm.write(self._rank_line("AdaLoRA final ranks"))
        else:
            self._apply_pattern()

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        """Keep pruned triplets at λ = 0 after the optimizer step (Adam's momentum would revive them)."""
        pattern = self.config.rank_pattern or {}
        for path, layer in self.adalora_layers():
            E = layer.lora_E[self.adapter_name]
            if path in pattern and E.shape[0] == len(pattern[path]):
                keep = torch.tensor(pattern[path], dtype=torch.bool, device=E.device)
                E.masked_fill_(~keep.view(-1, 1), 0.0)

    # --- saving and loading: PEFT's files hold only the triplets rank_pattern keeps ---
    def export_state(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets, as PEFT's get_peft_model_state_dict saves them (a layer already built at its pruned
        size, i.e. loaded, is written as it is)."""
        state = dict(super().export_state())
        for path, mask in (self.config.rank_pattern or {}).items():
            keep = torch.tensor(mask, dtype=torch.bool)
            for name, dim in _TRIPLET_DIMS:
                t = state.get(f"{path}.{name}")
                if t is not None and t.shape[dim] == len(mask):
                    state[f"{path}.{name}"] = t[keep.to(t.device)] if dim == 0 else t[:, keep.to(t.device)]
        return state

    def adapt_loaded_state(self, state: dict[str, torch.Tensor],
                           file_config: Callable[[], MethodConfig]) -> dict[str, torch.Tensor]:
        """Put a pruned file's triplets back in place when the layers are at full rank (resuming a run from a
        checkpoint): pruned triplets come back as zeros, and the file's rank pattern becomes the method's."""
        # `.ranknum`: written by some PEFT releases; always init_r, which the config already gives
        state = {k: t for k, t in state.items() if not k.endswith(".ranknum")}
        pattern = getattr(file_config(), "rank_pattern", None)
        if not pattern:
            return state
        live = self.state_dict()
        for path, mask in pattern.items():
            keep = torch.tensor(mask, dtype=torch.bool)
            for name, dim in _TRIPLET_DIMS:
                key = f"{path}.{name}"
                pruned = key in state and state[key].shape[dim] == int(keep.sum()) != len(mask)
                if pruned and key in live and live[key].shape[dim] == len(mask):
                    full = torch.zeros(live[key].shape, dtype=state[key].dtype)
                    if dim == 0:
                        full[keep] = state[key]
                    else:
                        full[:, keep] = state[key]
                    state[key] = full
        self.config.rank_pattern = pattern
        return state

    # --- reporting ---
    def _rank_line(self, title: str) -> str:
        ranks = self.ranks()
        listed = ", ".join(f"{p}={r}" for p, r in ranks.items())
        return (f"{title}: {sum(ranks.values())} in all (started at {sum(self.initial_ranks.values())}, target "
                f"{self.config.target_r * len(ranks)}): {listed}")

    def notes(self) -> list[str]:
        cfg = self.config
        if cfg.rank_pattern is None:
            n = len(self.initial_ranks)
            return [f"AdaLoRA: {n} modules at rank {cfg.init_r} ({cfg.init_r * n} in all), to be pruned to "
                    f"{cfg.target_r * n} (target_r x modules) by step total_step - tfinal"]
        return [self._rank_line("AdaLoRA ranks")]
