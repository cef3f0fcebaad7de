"""The training loop: readable top to bottom; it knows methods only through their hooks and the training stage only
through its objective.

One optimizer step = `gradient_accumulation_steps` micro-batches. The loss of a step is the objective's loss summed
over all its micro-batches divided by their total units (label tokens for a token loss), so accumulation gives exactly
the gradient of one big batch however the units fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import ConfigError, TrainingInterrupted
from ..fused_ops import fused_layers
from ..io import peft_format
from ..io.atomic import remove_stale_temporaries, write_text
from ..io.outputs import record_outputs
from ..io.run_config import read_train_config, write_train_config
from ..methods.base import TrainingContext
from ..objectives import Batch, Objective, get_objective, token_loss_sum
from ..quantization import model_bytes
from ..tuned import TunedModel
from ..varlen import attention_for
from .checkpoint import (
    PREFIX,
    TrainerState,
    check_resume,
    load_best_state,
    load_objective_state,
    load_trained,
    load_training_state,
    prepare_output_dir,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .compile import compiled_layers, decoder_layers
from .distributed import (
    Ranks,
    backward,
    full_parameters,
    load_whole_optimizer_state,
    no_sync,
    save_engine_state,
    shard_of,
    update,
    whole_optimizer_state,
    wrap,
)
from .schedules import get_scheduler

LOG_NAME = "trainer_log.jsonl"
OBJECTIVE_KEY = "objective/"  # prefix of the stage's own tensors in the best state kept for load_best_model_at_end


__all__ = ["Trainer", "optimizer_step", "real_tokens", "token_loss_sum"]  # token_loss_sum: re-exported


def optimizer_step(model: torch.nn.Module, objective: Objective, group: Sequence[Batch],
                   optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], max_grad_norm: float,
                   extra_loss: Callable[[], torch.Tensor | None] = lambda: None,
                   after_step: Callable[[], None] = lambda: None, ranks: Ranks = Ranks(),
                   counted: Sequence[bool] | None = None) -> tuple[float, int]:
    """One optimizer step over the micro-batches in `group`: forward and backward of each (the loss divided by the
    step's units), gradient clipping on the global norm, the optimizer's step, `after_step` (gradients still in place),
    zero_grad.

    With several ranks, the units are summed over all of them and the loss scaled by their number (DDP and FSDP average
    gradients), so N ranks with batch b give the gradient of one process with batch N x b. A batch not `counted` (a
    rank with no rows left in an epoch's last batch runs one of another rank's, so the collectives still meet) adds
    nothing. The Trainer and a method's own short training (a selection phase before the run) both step through here.
    Returns the step's summed loss and units over all ranks. The batch's attention stays set over backward too:
    gradient checkpointing recomputes attention there.
    """
    counted = [True] * len(group) if counted is None else counted
    units = ranks.sum([sum(objective.units(b) for b, c in zip(group, counted) if c)])[0]
    scale = ranks.world_size / max(units, 1)
    total = torch.zeros(())  # summed on the loss's device, read once per step: no host sync per micro-batch
    for i, (batch, weight) in enumerate(zip(group, counted)):
        with attention_for(model, batch), fused_layers(model), no_sync(model, last=i == len(group) - 1):
            loss_sum = objective.loss(model, batch) * float(weight)
            loss = loss_sum * scale
            extra = extra_loss()
            if extra is not None:
                loss = loss + extra / len(group)
            backward(model, loss, i == len(group) - 1, ranks)
        total = total.to(loss_sum.device) + loss_sum.detach().float()
    update(model, optimizer, params, max_grad_norm, ranks)
    after_step()
    optimizer.zero_grad(set_to_none=True)
    return ranks.sum([total.item()])[0], int(units)


class Trainer:
    """Fine-tunes the active adapter of a TunedModel on tokenized examples with an objective (default:
    `cfg.stage`'s)."""

    def __init__(
        self,
        cfg: TrainConfig,
        tuned: TunedModel,
        train_data: list[dict],
        collator: Callable[[list[dict]], dict[str, torch.Tensor]],
        eval_data: list[dict] | dict[str, list[dict]] | None = None,
        base_model_name: str | None = None,
        tokenizer: Any = None,
        objective: Objective | None = None,
        ranks: Ranks = Ranks(),
        reference: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.ranks = ranks
        self.objective = objective or get_objective(cfg.stage)
        self.tuned = tuned
        self.method = tuned.method
        if cfg.torch_compile:
            decoder_layers(tuned.model)  # a model without known decoder layers stops here, before any work
        self.train_data = train_data
        # one set (its metrics are eval_loss, ...), or several by name (eval_<name>_loss, ..., and their mean eval_loss)
        self.eval_sets: dict[str, list[dict]] = (
            dict(eval_data) if isinstance(eval_data, dict) else {"": eval_data} if eval_data else {})
        self.collator = collator
        self.base_model_name = base_model_name
        self.tokenizer = tokenizer
        self.device = next(tuned.model.parameters()).device
        self.output_dir = Path(cfg.output_dir)
        self.state = TrainerState()

        bs, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        self.global_batch = bs * ranks.world_size  # the rows of one micro-batch over all ranks
        self.batches_per_epoch = math.ceil(len(train_data) / self.global_batch)
        self.step_batches = self.objective.step_batches(ga)  # data micro-batches per step (an experience buffer: more)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.step_batches)
        if cfg.max_steps and cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        self.objective.bind(tokenizer, collator)
        self.objective.attach(tuned, reference)  # before the method's prepare hook, which may train with it
        # the stage's refusals (a schedule the run cannot serve, a reward function that returns no numbers) before
        # an earlier run in output_dir is cleared
        self.objective.check_run(self.total_steps, ranks.world_size)
        self._annotate_data()
        # The output folder is settled before any training (a method's selection phase writes there too).
        if ranks.is_main:
            prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, cfg.resume_from_checkpoint)
            remove_stale_temporaries(self.output_dir)  # what a killed run left half-written
        ranks.barrier()
        self._entries_before = {p.name for p in self.output_dir.iterdir()} if self.output_dir.is_dir() else set()
        self.method.prepare(self._context())
        try:
            self.resume_from = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
        except ConfigError:  # no checkpoint to resume (yet): train() says so, a method's prepare hook may not care
            self.resume_from = None
        if self.resume_from is not None:  # the trained tensors go in before FSDP shards them
            self.state = read_state(self.resume_from)
            check_resume(self.resume_from, self.state, self.total_steps, read_train_config(self.resume_from),
                         cfg.to_dict(), cfg.resume_allow_changes)
            # the stage's state first: it may change the model's shape (layers a shrinking run had removed)
            self.objective.load_state_dict(load_objective_state(self.resume_from))
            load_trained(self.resume_from, self.method)

        def make_optimizer() -> torch.optim.Optimizer:  # over the parameters as the engine holds them (FSDP's shards)
            own = [p for _, p in self.objective.parameters()]  # a stage's own tensors (a value head) learn alongside
            groups = self.method.param_groups(cfg.learning_rate) + ([{"params": own}] if own else [])
            return self._make_optimizer(groups)

        # what forward runs (tuned, or DDP's or DeepSpeed's engine over it) and the optimizer stepping it
        self.model, self.optimizer = wrap(tuned, ranks, make_optimizer, cfg)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
            scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
        )
        self._best_state: dict[str, torch.Tensor] | None = None
        if self.resume_from is not None:
            load_training_state(self.resume_from, self.optimizer, self.scheduler,
                                lambda state: load_whole_optimizer_state(self.model, self.optimizer, state, self.ranks,
                                                                         self.resume_from))
            self._best_state = load_best_state(self.resume_from)
            self._position_from(self.state)
        else:
            self.state.run_id = uuid.uuid4().hex
        self._eval_seconds = 0.0  # time spent evaluating during train(), left out of tokens/s
        self._rollout_seconds = 0.0  # time an RL stage spent sampling and scoring, also left out: logged on its own

    def _annotate_data(self) -> None:
        """The stage's once-per-run fields on every example (a teacher's cached top-k): the first rank computes and
        caches them, then the others read that cache."""
        def annotate() -> None:
            size = self.cfg.per_device_eval_batch_size
            self.train_data = self.objective.annotate(self.train_data, self.collator, size)
            self.eval_sets = {name: self.objective.annotate(rows, self.collator, size)
                              for name, rows in self.eval_sets.items()}

        if self.ranks.is_main:
            annotate()
        self.ranks.barrier()
        if not self.ranks.is_main:
            annotate()

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        cfg = self.cfg
        # Fused: one kernel for all the tensors (4x faster than the loop over the quickstart's 420 trainable tensors
        # on a CPU: ~1% of its step), the same steps to the last bit or two (docs/performance.md, "Fused AdamW").
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                 fused=True if cfg.optim == "adamw_torch_fused" else None)

    def _context(self) -> TrainingContext:
        """What a method's `prepare` hook may use of this run (never the Trainer itself)."""
        cfg = self.cfg

        def batches(indices: Sequence[int]) -> Iterator[Batch]:
            bs = cfg.per_device_train_batch_size
            for i in range(0, len(indices), bs):
                yield self._to_device(self.collator([self.train_data[j] for j in indices[i:i + bs]]))

        def step(optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch]) -> tuple[float, int]:
            params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
            with self._step_context():
                return optimizer_step(self.tuned, self.objective, micro_batches, optimizer, params,
                                      cfg.max_grad_norm)

        return TrainingContext(
            total_steps=self.total_steps, train_size=len(self.train_data), batch_size=cfg.per_device_train_batch_size,
            accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed, device=self.device,
            output_dir=self.output_dir, resuming=bool(cfg.resume_from_checkpoint), batches=batches,
            loss=self.objective.loss, make_optimizer=self._make_optimizer, step=step)

    def _step_context(self) -> contextlib.AbstractContextManager[None]:
        """Around each optimizer step: the compiled decoder layers with torch_compile, nothing otherwise."""
        return compiled_layers(self.tuned.model) if self.cfg.torch_compile else contextlib.nullcontext()

    # --- data order: a fixed permutation per epoch, so a resumed run sees the same batches ---
    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return torch.randperm(len(self.train_data), generator=g).tolist()

    def _micro_batches(self) -> Iterator[tuple[int, int, Batch, bool]]:
        """Yield (epoch, rows of the epoch consumed after it, this rank's batch, counted) from the saved position
        onwards, forever (the step count stops us). Each global micro-batch is the next `global_batch` rows of the
        epoch's order, split between the ranks; a rank left without rows runs another's, not counted."""
        epoch, row, n = self.state.epoch, self.state.rows_in_epoch or 0, len(self.train_data)
        while True:
            order = self._epoch_order(epoch)
            while row < n:
                rows = order[row:row + self.global_batch]
                mine = shard_of(rows, self.ranks)
                row += len(rows)
                yield epoch, row, self.collator([self.train_data[j] for j in mine or rows[:1]]), bool(mine)
            epoch, row = epoch + 1, 0

    def _position_from(self, state: TrainerState) -> None:
        """Where a resumed run continues: the saved example position in the epoch, whatever the number of ranks."""
        if state.rows_in_epoch is None:  # a checkpoint from before positions were kept in rows: one process
            state.rows_in_epoch = min(state.batch_in_epoch * self.cfg.per_device_train_batch_size, len(self.train_data))
        if state.world_size != self.ranks.world_size and self.ranks.is_main:
            print(f"peftkit: resuming a {state.world_size}-process checkpoint on {self.ranks.world_size} processes: "
                  f"continuing at example {state.rows_in_epoch} of epoch {state.epoch}, {self.global_batch} rows per "
                  "micro-batch from here.", file=sys.stderr, flush=True)
        state.world_size = self.ranks.world_size
        state.batch_in_epoch = math.ceil(state.rows_in_epoch / self.global_batch)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the model's device (an RL stage's prompt batch holds lists, left as they are)."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # --- the loop ---
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.resume_from is None:
            resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)  # a resume without a checkpoint stops here
        self.state.world_size = self.ranks.world_size
        if cfg.gradient_checkpointing:
            model = self.tuned.model
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / LOG_NAME
        # A resumed run's log restarts from the checkpoint's copy, so steps redone after a kill appear once.
        if self.ranks.is_main:
            write_text(log_path, "".join(json.dumps(e) + "\n" for e in self.state.log_history))
        self.tuned.train()
        with _stop_on_signal(several=self.ranks.enabled) as stop:
            return self._train_loop(log_path, stop)

    def _train_loop(self, log_path: Path, stop: "_StopRequest") -> dict[str, Any]:
        cfg = self.cfg
        batches = self._micro_batches()
        window_loss = window_tokens = 0.0
        start_time, start_tokens = time.perf_counter(), self.state.tokens_seen
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="train", unit="step",
                   dynamic_ncols=True, disable=not self.ranks.is_main)
        # fixed once the method is prepared
        params = [p for _, p in self.method.trainable_parameters()] + [p for _, p in self.objective.parameters()]
        while self.state.global_step < self.total_steps:
            group, counted = [], []
            for _ in range(self.step_batches):
                epoch, row, batch, mine = next(batches)
                group.append(self._to_device(batch))
                counted.append(mine)
                self.state.epoch, self.state.rows_in_epoch = epoch, row
                self.state.batch_in_epoch = math.ceil(row / self.global_batch)
                if row == len(self.train_data):  # an epoch's last partial group still makes a step
                    self.state.epoch, self.state.rows_in_epoch, self.state.batch_in_epoch = epoch + 1, 0, 0
                    break
            lr = self.scheduler.get_last_lr()[0]

            def after_step() -> None:
                self.scheduler.step()
                self.state.global_step += 1
                self.method.on_step_end(self.state.global_step)  # gradients still in place for the method to read

            # a stage that generates turns the step's prompts into samples here, and may update several times
            rollout_start = time.perf_counter()
            updates = self.objective.rollout(self.state.global_step, group, counted)
            self._rollout_seconds += time.perf_counter() - rollout_start
            step_loss, n_tokens = 0.0, 0
            for i, (batches_i, counted_i) in enumerate(updates):
                last = i == len(updates) - 1
                with self._step_context():
                    loss_i, units_i = optimizer_step(self.model, self.objective, batches_i, self.optimizer, params,
                                                     cfg.max_grad_norm, self.method.loss_term,
                                                     after_step if last else lambda: None, self.ranks, counted_i)
                step_loss, n_tokens = step_loss + loss_i, n_tokens + units_i
            removed = self.objective.after_step(self.state.global_step, updates[-1][0])
            if removed:
                params = self._drop_parameters(removed, params)
            # tokens trained on (every update's: a stage may pass over its samples several times) over all ranks; and a
            # stop asked on any rank (a signal, Ctrl-C) stops them all after this step
            trained = sum(real_tokens(b) for batches_i, counted_i in updates for b, c in zip(batches_i, counted_i) if c)
            tokens, stopping = self.ranks.sum([trained, float(stop.signal is not None)])
            self.state.tokens_seen += int(tokens)
            window_loss += step_loss
            window_tokens += n_tokens

            step = self.state.global_step
            # training speed: evaluations and an RL stage's sampling excluded (it logs rollout_tokens_per_second)
            elapsed = time.perf_counter() - start_time - self._eval_seconds - self._rollout_seconds
            tok_s = (self.state.tokens_seen - start_tokens) / max(elapsed, 1e-9)
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == self.total_steps:
                loss = window_loss / max(window_tokens, 1)
                self._log(log_path, {"step": step, "epoch": round(self._epoch_float(), 4), "loss": round(loss, 6),
                                     **self._stage_metrics(), "learning_rate": lr,
                                     "tokens_per_second": round(tok_s, 1)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                window_loss = window_tokens = 0.0
            if self._should_eval(step):
                self._evaluate_and_track(log_path)
            if stopping and step < self.total_steps:  # Ctrl-C: keep the work, then stop
                bar.close()
                path = self._save_checkpoint(only_model=False)
                why = stop.signal or "a signal to another rank"
                raise TrainingInterrupted(f"Interrupted ({why}) after step {step} of {self.total_steps}; "
                                          f"saved {path}.", str(path))
            if self._should_save(step):
                self._save_checkpoint()
        bar.close()
        if self.eval_sets and cfg.eval_strategy != "no" and not any(
            e.get("step") == self.state.global_step and "eval_loss" in e for e in self.state.log_history
        ):
            self._evaluate_and_track(log_path)
        if cfg.load_best_model_at_end and self._best_state is not None:
            with torch.no_grad():
                for key, t in self.method.state_dict().items():
                    t.copy_(self._best_state[key])
            own = {k.removeprefix(OBJECTIVE_KEY): t for k, t in self._best_state.items() if k.startswith(OBJECTIVE_KEY)}
            if own:
                self.objective.load_state_dict(own)
        return self._finish(time.perf_counter() - start_time, self.state.tokens_seen - start_tokens)

    def _drop_parameters(self, removed: list[torch.nn.Parameter], params: list[torch.nn.Parameter]
                         ) -> list[torch.nn.Parameter]:
        """Forget parameters the stage removed from the model: in the optimizer's groups and state, and in `params`."""
        gone = {id(p) for p in removed}
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in removed:
            self.optimizer.state.pop(p, None)
        return [p for p in params if id(p) not in gone]

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / max(self.batches_per_epoch, 1)

    def _should_eval(self, step: int) -> bool:
        if not self.eval_sets or self.cfg.eval_strategy == "no":
            return False
        if self.cfg.eval_strategy == "epoch":
            return self.state.batch_in_epoch == 0
        return bool(self.cfg.eval_steps) and step % self.cfg.eval_steps == 0

    def _should_save(self, step: int) -> bool:
        """A checkpoint every `save_steps` steps, or at each epoch's end; the final step saves the result instead."""
        if step >= self.total_steps:
            return False
        if self.cfg.save_strategy == "epoch":
            return self.state.batch_in_epoch == 0
        return self.cfg.save_strategy == "steps" and bool(self.cfg.save_steps) and step % self.cfg.save_steps == 0

    def _log(self, path: Path, entry: dict[str, Any]) -> None:
        self.state.log_history.append(entry)  # on every rank: checkpoints carry it
        if self.ranks.is_main:
            with path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _stage_metrics(self, prefix: str = "") -> dict[str, float]:
        """The objective's recorded metrics since they were last taken, averaged over all ranks' items."""
        stats = self.objective.take_stats()
        names = sorted(stats)
        sums = self.ranks.sum([x for name in names for x in stats[name]])
        means = {name: sums[2 * i] / sums[2 * i + 1] for i, name in enumerate(names) if sums[2 * i + 1]}
        return {prefix + k: round(v, 6) for k, v in self.objective.finish_metrics(means).items()}

    def evaluate(self) -> dict[str, float]:
        """eval_loss, the objective's mean loss over the eval set, and the stage's metrics on it
        (eval_rewards/accuracies, eval_perplexity, ...). Several sets are evaluated apart, as transformers names dict
        eval sets (eval_<name>_loss, ...); eval_loss and the other eval_ metrics are then the sets' unweighted means."""
        if set(self.eval_sets) == {""}:
            return self._evaluate_set(self.eval_sets[""])
        per_set = {name: self._evaluate_set(rows) for name, rows in self.eval_sets.items()}
        metrics = {f"eval_{name}_{key.removeprefix('eval_')}": v for name, m in per_set.items() for key, v in m.items()}
        shared = set.intersection(*(set(m) for m in per_set.values()))
        for key in sorted(shared):
            metrics[key] = sum(m[key] for m in per_set.values()) / len(per_set)
        return metrics

    @torch.no_grad()
    def _evaluate_set(self, rows: list[dict]) -> dict[str, float]:
        """One set's metrics: each rank evaluates its share of the rows; the sums are added up."""
        self.tuned.eval()
        training_stats, self.objective.stats = self.objective.stats, {}  # the training window's, kept for its log
        total, count = 0.0, 0
        step = self.cfg.per_device_eval_batch_size * self.ranks.world_size
        for i in tqdm(range(0, len(rows), step), desc="eval", leave=False, dynamic_ncols=True,
                      disable=not self.ranks.is_main):
            chunk = list(range(i, min(i + step, len(rows))))
            mine = shard_of(chunk, self.ranks)
            batch = self._to_device(self.collator([rows[j] for j in mine or chunk[:1]]))
            loss = self.objective.loss(self.model, batch).item()  # every rank runs a batch: FSDP gathers layers
            if mine:
                total += loss
                count += self.objective.units(batch)
        total, count = self.ranks.sum([total, count])
        self.tuned.train()
        loss = total / max(count, 1)
        metrics = {"eval_loss": loss, **self._stage_metrics("eval_"),
                   **{f"eval_{k}": v for k, v in self.objective.eval_metrics(loss).items()}}
        self.objective.stats = training_stats
        return metrics

    def _evaluate_and_track(self, log_path: Path) -> None:
        start = time.perf_counter()
        metrics = self.evaluate()
        self._eval_seconds += time.perf_counter() - start
        self._log(log_path, {"step": self.state.global_step, "epoch": round(self._epoch_float(), 4),
                             **{k: round(v, 6) for k, v in metrics.items()}})
        name = self.cfg.metric_for_best_model
        if name not in metrics:
            raise ConfigError(f"metric_for_best_model '{name}' is not among the evaluation's metrics: "
                              f"{', '.join(metrics)}.")
        value, best = metrics[name], self.state.best_metric
        greater = self.cfg.greater_is_better
        greater = not name.endswith("loss") if greater is None else greater
        if best is None or (value > best if greater else value < best):
            self.state.best_metric, self.state.best_step = value, self.state.global_step
            self._best_state = {k: t.detach().clone() for k, t in self.method.state_dict().items()}
            self._best_state.update({OBJECTIVE_KEY + k: t.detach().clone()
                                     for k, t in self.objective.state_dict().items()})

    def _save_checkpoint(self, only_model: bool | None = None) -> Path:
        """Rank 0 writes the checkpoint (FSDP's shards gathered first, by every rank); the others wait for it."""
        if only_model is None:
            only_model = self.cfg.save_only_model
        optimizer_state = None if only_model else whole_optimizer_state(self.model, self.optimizer, self.ranks)
        path = self.output_dir / f"{PREFIX}{self.state.global_step}"
        engine_state = None if only_model else save_engine_state(self.model, self.output_dir, path.name, self.ranks)
        with full_parameters(self.model, self.ranks):
            if self.ranks.is_main:
                path = save_checkpoint(self.output_dir, self.state, self.method, optimizer_state, self.scheduler,
                                       self.cfg.to_dict(), self.base_model_name, self.cfg.save_total_limit,
                                       best_state=self._best_state if self.cfg.load_best_model_at_end else None,
                                       objective_state=self.objective.state_dict(), engine_state=engine_state)
        self.ranks.barrier()
        return path

    def _finish(self, runtime: float, tokens: int) -> dict[str, Any]:
        """Rank 0 saves the result (FSDP's shards gathered first, by every rank) and the run's records."""
        peaks = self.ranks.gather(round(peak_memory_mb(self.device), 1))  # before the gathering below adds to them
        with full_parameters(self.model, self.ranks):
            if self.ranks.is_main:
                results = self._save_result(runtime, tokens, peaks)
        self.ranks.barrier()
        return results if self.ranks.is_main else {}

    def _save_result(self, runtime: float, tokens: int, peaks: list[float]) -> dict[str, Any]:
        from .plot import plot_loss, plot_metric  # deferred: matplotlib loads only when plot_loss is set

        trainable, total = self.tuned.parameter_counts()  # before saving, which may merge the adapter away
        if not self.objective.saves_model:
            peft_format.save_method(self.method, self.output_dir, self.base_model_name)
        self.objective.save(self.output_dir)  # a stage's own tensors beside the adapter (a value head), or the model
        # The run's settings beside the adapter: export reads quantization_bit from it (the note on quantized training).
        write_train_config(self.output_dir, self.cfg.to_dict())
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.output_dir)
        train_losses = [e["loss"] for e in self.state.log_history if "loss" in e]
        evaluations = [e for e in self.state.log_history if "eval_loss" in e]
        last_eval = {k: v for k, v in evaluations[-1].items() if k.startswith("eval_")} if evaluations else {}
        results = {
            "train_runtime": round(runtime, 3),  # wall time, evaluations included (as transformers reports it)
            "eval_runtime": round(self._eval_seconds, 3),
            "train_tokens_per_second": round(tokens / max(runtime - self._eval_seconds - self._rollout_seconds, 1e-9),
                                             2),
            "train_steps": self.state.global_step,
            "train_loss": train_losses[-1] if train_losses else None,
            "peak_memory_mb": peaks[0],
            **({"peak_memory_mb_per_rank": peaks} if len(peaks) > 1 else {}),
            "model_memory_mb": round(model_bytes(self.tuned.model) / 2**20, 1),  # weights alone, adapter included
            "trainable_params": trainable,
            "all_params": total,
            "best_eval_loss": self.state.best_metric,
            "best_step": self.state.best_step,
            **last_eval,  # the final evaluation: eval_loss, and each set's eval_<name>_loss when there are several
            **self.objective.results(),
        }
        write_text(self.output_dir / "train_results.json", json.dumps(results, indent=2) + "\n")
        if self.cfg.plot_loss:
            sets = [name for name in self.eval_sets if name]
            plot_loss(self.state.log_history, self.output_dir / "training_loss.png", sets)
            for name in ("rewards/accuracies", "reward", "kl"):  # the preference and RL stages' curves
                plot_metric(self.state.log_history, name, self.output_dir / f"training_{name.replace('/', '_')}.png",
                            sets)
        # What this run wrote (tokenizer files, model shards vary by model): overwrite_output_dir may replace them.
        record_outputs(self.output_dir, {p.name for p in self.output_dir.iterdir()} - self._entries_before)
        remove_stale_temporaries(self.output_dir)
        return results


class _StopRequest:
    signal: str | None = None  # the name of the first signal received
    at: float = 0.0  # when (time.monotonic)


@contextlib.contextmanager
def _stop_on_signal(several: bool = False) -> Iterator[_StopRequest]:
    """The first SIGINT/SIGTERM asks the loop to finish its step, checkpoint and stop; a second stops at once. With
    `several` processes, a signal within seconds of the first is torchrun passing the same Ctrl-C on, not a second.

    Only the main thread may install signal handlers; elsewhere (a UI's worker thread) signals keep their meaning.
    """
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum: int, frame: Any) -> None:
        if stop.signal is not None and several and time.monotonic() - stop.at < 5.0:
            return
        if stop.signal is not None:
            for s, handler in previous.items():
                signal.signal(s, handler)
            raise KeyboardInterrupt
        stop.signal, stop.at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{stop.signal}: finishing this step, then saving a checkpoint (send it again to stop at once).",
              file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, handle)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in a batch (or a forward's keyword arguments). A packed batch carries a 4-D mask whose
    diagonal marks them: 0 in an additive float mask, True in a boolean one."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch["input_ids"].numel()
    if mask.dim() == 4:
        diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        return int((diag if mask.dtype == torch.bool else diag == 0).sum())
    return int(mask.sum())


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
