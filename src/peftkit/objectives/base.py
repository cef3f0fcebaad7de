"""The Objective interface: what a training stage gives the one training loop.

An objective says what rows it trains on (`data`: a kind from data.formats.KINDS), how many units a batch's loss
sums over, and computes that sum; the loop divides a step's summed loss by the step's total units, so gradient
accumulation equals one large batch for every objective. It never sees the loop: stepping, accumulation,
checkpoints and logs belong to the Trainer.

What a stage adds beyond a loss goes through narrow seams the loop calls for every objective:
- `check_config(cfg)`: the stage's own refusals of a config, when it is read;
- `bind(tokenizer, collate)`, `attach(model, reference)`: the run's tokenizer and collator (a stage that makes its
  own examples while it trains lays them out with them), the model being trained (a TunedModel) and a separate
  frozen reference model, if the run has one (preference stages compare with it);
- `step_batches`, `rollout`: a stage that generates (ppo, grpo) turns each step's prompts into scored samples and
  the optimizer updates to make on them;
- `annotate`: per-example fields computed once before training (kd's cached teacher top-k);
- `check_run`, `after_step`, `saves_model`: a stage that changes the model while it trains (progressive shrinking);
- `record` / `take_stats`: per-batch sums (rewards, accuracies) the loop logs beside the loss, averaged per unit;
- `eval_metrics`: what an evaluation reports besides its loss (perplexity);
- `parameters` / `state_dict` / `load_state_dict` / `save`: trainable tensors of the objective's own (a reward
  model's value head), optimized, checkpointed and saved with the adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..settings import Setting

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """A frozen model a stage compares with: where it comes from, and how to load it."""

    key: str  # the YAML key that names it, for messages
    name_or_path: str
    adapter: str | None = None
    quantization_bit: int | None = None
    same_values: bool = False  # cast to the trained weights' dtype (a DPO reference starts equal to the policy)

_REGISTRY: dict[str, type[Objective]] = {}


class Objective:
    """One training stage's loss. Subclasses set `name` (the config's `stage`) and implement `units` and `loss`."""

    name: ClassVar[str]
    data: ClassVar[str] = "sft"  # the kind of rows it trains on (data.formats.KINDS)
    # The YAML keys this stage reads (e.g. a preference loss's beta); config.py collects them into TrainConfig.
    yaml_keys: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self) -> None:
        self.stats: dict[str, list[Any]] = {}  # name -> [sum (tensor or float), count]
        self.model: nn.Module | None = None
        self.reference: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> Objective:
        """The objective with its settings read from a TrainConfig (by default, none)."""
        return cls()

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse settings of this stage that cannot work, when the config is read (nothing by default)."""

    def uses_reference(self, cfg: Any) -> bool:
        """Whether this run compares with a reference model (then the trainer provides one)."""
        return False

    def reference_model(self, cfg: Any, in_place: bool) -> ReferenceSpec | None:
        """The separate frozen model the run must load for this stage (a teacher, a reference), or None;
        `in_place`: the method trains the base weights themselves."""
        return None

    def check_vocabulary(self, size: int) -> None:
        """Refuse, before any work, settings that do not fit a vocabulary of `size` tokens (nothing by default)."""

    def bind(self, tokenizer: Any, collate: Callable[[list[dict]], Batch]) -> None:
        """Called by the Trainer before `attach`: the run's tokenizer (None when the caller gave none) and collator."""

    def attach(self, model: nn.Module, reference: nn.Module | None = None) -> None:
        """Called by the Trainer before training: the TunedModel being trained, and a frozen reference model when the
        run has a separate one (else a stage that needs one uses the model with its adapter disabled)."""
        self.model, self.reference = model, reference

    def annotate(self, rows: list[dict], collate: Callable[[list[dict]], Batch], batch_size: int) -> list[dict]:
        """Called by the Trainer once per split after `attach`, before training: the examples with per-example fields
        computed once for the whole run (kd's cached teacher top-k; tensor fields reach the batch through the
        collator). Unchanged by default."""
        return rows

    def check_run(self, total_steps: int, processes: int) -> None:
        """Refuse, before training, settings this run's length or number of processes cannot serve (nothing by
        default)."""

    def after_step(self, step: int, batches: Sequence[Batch]) -> list[nn.Parameter]:
        """Called after each optimizer step with its micro-batches: the parameters the stage removed from the model
        (progressive shrinking drops a layer), which the loop drops from the optimizer. None by default."""
        return []

    def step_batches(self, accumulation: int) -> int:
        """How many data micro-batches one step takes: `accumulation` (PPO's experience buffer takes a multiple)."""
        return accumulation

    def rollout(self, step: int, group: list[Batch], counted: list[bool]) -> list[tuple[list[Batch], list[bool]]]:
        """The optimizer updates step `step` makes from its data micro-batches, each a list of micro-batches (with
        whether each counts; see `optimizer_step`): one update on the data itself by default. The RL stages sample
        and score completions of the prompts here, and may update several times on them (ppo_epochs)."""
        return [(list(group), list(counted))]

    @property
    def saves_model(self) -> bool:
        """True when the stage changed the model's shape (layers removed): the result is then saved whole by `save`,
        adapters merged, instead of as an adapter of a base it no longer fits."""
        return False

    def units(self, batch: Batch) -> int:
        """How many units (label tokens, pairs, ...) this batch's loss sums over."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of the per-unit losses of `batch` (a scalar tensor with its graph)."""
        raise NotImplementedError

    # --- metrics ---
    def record(self, name: str, total: torch.Tensor | float, count: int | float) -> None:
        """Add a batch's sum of `name` over `count` items (detached; read on the host only when logged)."""
        entry = self.stats.setdefault(name, [0.0, 0])
        value = total.detach().float() if isinstance(total, torch.Tensor) else float(total)
        entry[0] = entry[0] + value
        entry[1] += count

    def take_stats(self) -> dict[str, tuple[float, float]]:
        """The recorded (sum, count) pairs since the last call, and start afresh."""
        out = {k: (float(v[0]), float(v[1])) for k, v in self.stats.items()}
        self.stats = {}
        return out

    def finish_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """The logged metrics from the recorded means (a stage may add ones derived from them)."""
        return means

    def eval_metrics(self, loss: float) -> dict[str, float]:
        """An evaluation's metrics besides eval_loss and the recorded stats, from its mean loss."""
        return {}

    def results(self) -> dict[str, Any]:
        """What the stage adds to train_results.json (a teacher's forward time, ...)."""
        return {}

    # --- the objective's own trainable tensors ---
    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"stage '{self.name}' has no tensors of its own to load ({', '.join(state)}).")

    def save(self, output_dir: Path) -> None:
        """Write the objective's own tensors beside the saved adapter (nothing by default)."""


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available as `stage: <cls.name>`."""
    _REGISTRY[cls.name] = cls
    return cls


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The objective class for `stage: name`; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"stage '{name}' is not available; available stages: {', '.join(available_objectives())}.")
    return _REGISTRY[name]


def get_objective(name: str, cfg: Any = None) -> Objective:
    """The objective of `stage: name`, with its settings from `cfg` when given."""
    cls = objective_class(name)
    return cls.from_config(cfg) if cfg is not None else cls()
