"""Training on several processes: DDP (every rank holds the model, gradients all-reduced) or FSDP (parameters, gradients
and optimizer state sharded), launched by torchrun or `accelerate launch`, one machine or many.

torch.distributed is used directly: on CPU (gloo) accelerate neither detects torchrun's processes nor adds anything to
DDP or FSDP2 (`fully_shard`), and the loop needs only a handful of collectives (sums of losses and token counts, a stop
flag, barriers). Nothing here communicates by any other means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import deepspeed_stage
from ..errors import ConfigError

# The methods FSDP runs here: checked to train exactly as one process does (the others train with DDP).
FSDP_METHODS = ("full", "freeze", "lora")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Which process this is. One process (the default) is rank 0 of 1, and every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    engine: str = "none"  # none (one process), ddp or fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def same_everywhere(self, what: str, value: Any) -> None:
        """Refuse to start when ranks disagree on `value` (their configs or their data differ)."""
        if not self.enabled:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.gather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ConfigError(f"The ranks' {what} differ (rank {differ[0]} vs rank 0): every process must run the "
                              "same config on the same data. Launch them from one command, with the same files.")


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    """Whether torchrun or `accelerate launch` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def engine_of(cfg: Any) -> str:
    """The engine the config asks for: fsdp with `fsdp: full_shard` (or shard_grad_op), ddp otherwise."""
    fsdp = cfg.fsdp if isinstance(cfg.fsdp, str) else " ".join(cfg.fsdp or [])
    return "fsdp" if any(w in fsdp.split() for w in ("full_shard", "shard_grad_op", "hybrid_shard")) else "ddp"


def physical_cores() -> int:
    """Cores this process may run on, hyperthread siblings counted once: two threads on one core's siblings only
    contend for its matrix units."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return len(cores)


def set_cpu_threads(processes_here: int) -> None:
    """One intra-op thread per physical core, shared among the processes on this machine; $OMP_NUM_THREADS wins."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, physical_cores() // processes_here))


def start(cfg: Any) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); one process returns `Ranks()` untouched."""
    cuda = torch.cuda.is_available()
    if not launched():
        if not cuda:
            set_cpu_threads(1)
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # respects CUDA_VISIBLE_DEVICES
    else:  # ranks on one machine share its cores instead of each taking all of them
        set_cpu_threads(local_world)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, local_world, engine_of(cfg))
    if ranks.is_main:
        where = f"{torch.cuda.device_count()} GPUs visible" if cuda else f"{torch.get_num_threads()} threads per rank"
        print(f"peftkit: {ranks.engine.upper()} on {ranks.world_size} processes ({dist.get_backend()}; {where}).",
              file=sys.stderr, flush=True)
    return ranks


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_engine(cfg: Any, method: Any, quantized: bool) -> None:
    """Refuse, before any work, what an engine cannot run: DeepSpeed without a GPU (FSDP is the CPU path), FSDP with a
    method whose layers it cannot shard, or a quantized base."""
    if cfg.deepspeed:
        stage = deepspeed_stage(cfg.deepspeed)
        if not torch.cuda.is_available():
            raise ConfigError(f"deepspeed ({cfg.deepspeed}: ZeRO stage {stage}) needs a GPU. On a CPU, shard with "
                              "fsdp: full_shard instead (torch's FSDP), or remove the deepspeed key for DDP.")
        raise ConfigError(f"deepspeed ({cfg.deepspeed}: ZeRO stage {stage}) is not supported yet; use fsdp: "
                          "full_shard (torch's FSDP: ZeRO-3's sharding), or remove the deepspeed key for DDP.")
    if engine_of(cfg) == "fsdp":
        if method.name not in FSDP_METHODS:
            raise ConfigError(f"fsdp runs finetuning_type {', '.join(FSDP_METHODS)} (checked to train as one process "
                              f"does), not '{method.name}'; remove the fsdp key to train it with DDP.")
        if quantized:
            raise ConfigError("fsdp cannot shard a quantized base (quantization_bit); remove the fsdp key to train "
                              "QLoRA with DDP.")
        if cfg.load_best_model_at_end:
            raise ConfigError("load_best_model_at_end is not supported with fsdp (the best weights would have to be "
                              "kept whole on every rank); remove one of them.")


def wrap(model: nn.Module, ranks: Ranks, find_unused_parameters: bool = False) -> nn.Module:
    """The model as the engine runs it: DDP's wrapper, or the same model with its decoder layers and then the whole
    model sharded in place by FSDP2. One process gets the model unchanged."""
    if not ranks.enabled:
        return model
    if ranks.engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device,
                                               find_unused_parameters=find_unused_parameters)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (the longest ModuleList of the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
    """DDP: skip the all-reduce on the micro-batches before a step's last (the last one reduces them all)."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_parameters(model: nn.Module, ranks: Ranks) -> Iterator[None]:
    """Under FSDP, every parameter whole on every rank for the duration (to save them); else nothing to do."""
    if ranks.engine != "fsdp" or not ranks.enabled:
        yield
        return
    sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def whole_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks) -> dict[str, Any]:
    """The optimizer's state to save: under FSDP gathered whole (a collective: every rank calls it), so that any
    number of ranks can resume from it; otherwise each rank's own, which is everyone's."""
    if ranks.engine != "fsdp" or not ranks.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                               ranks: Ranks) -> None:
    """The inverse of `whole_optimizer_state`: under FSDP each rank keeps its shard of the saved whole."""
    if ranks.engine != "fsdp" or not ranks.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shard_of(rows: Sequence[int], ranks: Ranks) -> list[int]:
    """This rank's rows of one global micro-batch: contiguous slices, rank 0 first, so that ranks x batch b see the
    rows one process would see in a batch of ranks x b."""
    per_rank = -(-len(rows) // ranks.world_size)
    return list(rows[ranks.rank * per_rank:(ranks.rank + 1) * per_rank])
