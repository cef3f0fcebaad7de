"""Training on several processes: DDP (every rank holds the model, gradients all-reduced), FSDP (parameters, gradients
and optimizer state sharded) or DeepSpeed ZeRO 0-3 (from a `deepspeed:` JSON file), launched by torchrun or
`accelerate launch`, one machine or many.

torch.distributed is used directly: on CPU (gloo) accelerate neither detects torchrun's processes nor adds anything to
DDP or FSDP2 (`fully_shard`), and the loop needs only a handful of collectives (sums of losses and token counts, a stop
flag, barriers). DeepSpeed's engine is called directly too (`deepspeed.initialize`, what accelerate's DeepSpeed plugin
calls): the loop keeps its own accumulation, so the engine is told where each step ends. Nothing here communicates by
any other means.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import read_deepspeed
from ..errors import ConfigError
from ..io.atomic import temp_dir
from ..models import layer_stack

# The methods FSDP and DeepSpeed run here: checked to train exactly as one process does (the others train with DDP).
SHARDED_METHODS = ("full", "freeze", "lora")
# The stages they run (checked on 2 ranks); why the others train with DDP only
SHARDED_STAGES = ("sft", "pt", "dpo", "kto")
UNSHARDED_STAGES = {
    "rm": "its value head lives outside the model the engine shards",
    "ppo": "its value head lives outside the model the engine shards, and sampling runs a different number of "
           "forward passes on each rank",
    "grpo": "sampling runs a different number of forward passes on each rank, which sharded parameters cannot serve",
    "kd": "a sharded student with its teacher is not checked yet",
}
# DeepSpeed needs a GPU (FSDP is the CPU path); the tests set this to run its engine on DeepSpeed's CPU accelerator.
DEEPSPEED_ON_CPU = "PEFTKIT_DEEPSPEED_ON_CPU"
DEEPSPEED_TAG = "zero"  # the sub-folder of a checkpoint's deepspeed/ folder holding the engine's files
AUTO = "auto"  # transformers' placeholder in DeepSpeed configs, filled from the training settings


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Which process this is. One process (the default) is rank 0 of 1, and every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    engine: str = "none"  # none (one process), ddp, fsdp or deepspeed (one process or several)

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
    """The engine the config asks for: deepspeed with a `deepspeed:` file, fsdp with `fsdp: full_shard` (or
    shard_grad_op), ddp otherwise."""
    if cfg.deepspeed:
        return "deepspeed"
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
            keep_freed_memory()
        if engine_of(cfg) != "deepspeed":
            return Ranks()
        # DeepSpeed's engine runs in a process group even alone (ZeRO's offload on one GPU): one of one, on loopback
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # what torchrun sets, and DeepSpeed reads
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
        return Ranks(engine="deepspeed")
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # respects CUDA_VISIBLE_DEVICES
    else:  # ranks on one machine share its cores instead of each taking all of them
        set_cpu_threads(local_world)
        if engine_of(cfg) == "fsdp":
            return_freed_memory()
        else:
            keep_freed_memory()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, local_world, engine_of(cfg))
    if ranks.is_main:
        where = f"{torch.cuda.device_count()} GPUs visible" if cuda else f"{torch.get_num_threads()} threads per rank"
        print(f"peftkit: {ranks.engine.upper()} on {ranks.world_size} processes ({dist.get_backend()}; {where}).",
              file=sys.stderr, flush=True)
    return ranks


def free_port() -> int:
    """A free TCP port on loopback, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Set glibc malloc parameters, unless $MALLOC_MMAP_THRESHOLD_ / $MALLOC_TRIM_THRESHOLD_ say otherwise or this is
    not glibc. Returns whether every setting was made."""
    if (os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(param, value)) for param, value in settings)
    except (OSError, AttributeError):
        return False


def return_freed_memory() -> bool:
    """Have glibc give every block of 128 KiB or more back to the system when it is freed.

    By default glibc raises its mmap threshold to 32 MiB once a large block is freed, so a layer's tensors (1-30 MiB)
    come from the heap afterwards, and memory freed there stays with the process. FSDP's saving (a share of the
    weights, gradients and optimizer state per rank) then never shows: ranks of a full fine-tuning of smollm2-135m
    peaked at 2.9-3.3 GB, as high as one process. With this they peak at 1.8-2.3 GB against one process's 3.1 GB, for
    ~10% of FSDP's speed on this CPU (one process would lose ~30%, so only FSDP asks for it). Returns whether the
    setting was made."""
    return _mallopt((M_MMAP_THRESHOLD, 128 * 1024))


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next step instead of giving it back to the system and faulting it in again.

    A training step frees and re-allocates the same tensors (1-30 MiB each on smollm2-135m) every step. By default
    glibc trims the heap's free top beyond twice its mmap threshold (at most 64 MiB), so a step's memory went back to
    the system and came back page by page: 6-20k page faults a step of the README benchmark's job on a CPU, 0.03-0.1 s
    of kernel time (docs/performance.md, "Freed memory kept"). Here blocks up to 32 MiB (glibc's own dynamic
    maximum) come from the heap and up to 1 GiB of its free top stays; the peak stays what the step needs. Returns
    whether the settings were made."""
    return _mallopt((M_MMAP_THRESHOLD, 32 * 1024 * 1024), (M_TRIM_THRESHOLD, 1024 * 1024 * 1024))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_engine(cfg: Any, method: Any, quantized: bool) -> None:
    """Refuse, before any work, what an engine cannot run: DeepSpeed without a GPU (FSDP is the CPU path) or without
    its package, a DeepSpeed file that contradicts the YAML, a method FSDP or DeepSpeed cannot shard, a quantized
    base."""
    engine = engine_of(cfg)
    if engine == "deepspeed":
        config = read_deepspeed(cfg.deepspeed)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if not torch.cuda.is_available() and not os.environ.get(DEEPSPEED_ON_CPU):
            raise ConfigError(f"deepspeed ({cfg.deepspeed}: ZeRO stage {stage}) needs a GPU. On a CPU, shard with "
                              "fsdp: full_shard instead (torch's FSDP), or remove the deepspeed key for DDP.")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed is set but the deepspeed package is not installed: pip install "
                              "--no-build-isolation deepspeed (after torch), or use fsdp: full_shard.")
        deepspeed_config(cfg, config, int(os.environ.get("WORLD_SIZE", "1")))
    if engine in ("fsdp", "deepspeed"):
        if method.name not in SHARDED_METHODS:
            raise ConfigError(f"{engine} runs finetuning_type {', '.join(SHARDED_METHODS)} (checked to train as one "
                              f"process does), not '{method.name}'; remove the {engine} key to train it with DDP.")
        if cfg.stage not in SHARDED_STAGES:
            why = UNSHARDED_STAGES.get(cfg.stage, "it is not checked with a sharded model")
            raise ConfigError(f"{engine} runs stage {', '.join(SHARDED_STAGES)}, not '{cfg.stage}' ({why}); remove "
                              f"the {engine} key to train it with DDP.")
        if quantized:
            raise ConfigError(f"{engine} cannot shard a quantized base (quantization_bit); remove the {engine} key to "
                              "train QLoRA with DDP.")
        if cfg.load_best_model_at_end:
            raise ConfigError(f"load_best_model_at_end is not supported with {engine} (the best weights would have "
                              "to be kept whole on every rank); remove one of them.")


def deepspeed_config(cfg: Any, config: dict[str, Any], world_size: int, hidden_size: int | None = None
                     ) -> dict[str, Any]:
    """The DeepSpeed JSON with transformers' "auto" values filled from the YAML: batch sizes, accumulation, clipping,
    ZeRO's bucket sizes from the model's width. A number that contradicts the YAML is refused, as transformers refuses
    it. `bf16`/`fp16` "auto" leave precision to peftkit (the base in the run's dtype, trainable weights in fp32); set
    `enabled: true` to have DeepSpeed keep the weights in 16 bits with fp32 master copies."""
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"deepspeed: '{cfg.deepspeed}' has a '{section}' section; peftkit builds the optimizer "
                              "(AdamW) and the schedule from the YAML (learning_rate, lr_scheduler_type, "
                              "warmup_ratio, ...): remove the section.")
    config = copy.deepcopy(config)
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro * accumulation * world_size, "gradient_clipping": float(cfg.max_grad_norm)}
    differ = []
    for key, value in wanted.items():
        given = config.get(key, AUTO)
        if given == AUTO:
            config[key] = value
        elif given != value:
            differ.append(f"{key} {given} (the YAML gives {value})")
    if differ:
        raise ConfigError(f"deepspeed: '{cfg.deepspeed}' contradicts the YAML: {'; '.join(differ)}. Set these to "
                          '"auto" in the file, or change the YAML.')
    for name in ("bf16", "fp16"):
        if isinstance(config.get(name), dict) and config[name].get("enabled") == AUTO:
            config[name]["enabled"] = False
    zero = config.setdefault("zero_optimization", {})
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == AUTO:
                zero[key] = value
    config.setdefault("zero_allow_untested_optimizer", True)  # AdamW from torch: the optimizer peftkit trains with
    config.setdefault("steps_per_print", 2**31 - 1)  # peftkit logs the steps
    return config


def wrap(model: nn.Module, ranks: Ranks, make_optimizer: Callable[[], torch.optim.Optimizer], cfg: Any
         ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model as the engine runs it, and its optimizer: DDP's wrapper; or the same model with its decoder layers
    and then the whole model sharded in place by FSDP2 (the optimizer made after, over the shards); or DeepSpeed's
    engine over the model and the optimizer. One process gets the model unchanged."""
    if ranks.engine == "deepspeed":
        optimizer = make_optimizer()
        return _deepspeed_engine(model, optimizer, cfg, ranks), optimizer
    if not ranks.enabled:
        return model, make_optimizer()
    if ranks.engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        stack = layer_stack(model)  # the decoder layers, sharded one by one, if the model has a stack of them
        for layer in stack[1] if stack else ():
            fully_shard(layer)
        fully_shard(model)
        return model, make_optimizer()
    device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device,
                                              find_unused_parameters=cfg.ddp_find_unused_parameters)
    return ddp, make_optimizer()


def _deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, ranks: Ranks) -> nn.Module:
    import deepspeed  # deferred: an optional package, for GPU clusters

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = deepspeed_config(cfg, read_deepspeed(cfg.deepspeed), ranks.world_size,
                              getattr(getattr(model, "config", None), "hidden_size", None))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if engine.zero_optimization_partition_weights():
        # ZeRO-3 gathers a module's own parameters while it runs; an adapter layer reads its weights from parameter
        # dicts that never run, so they are registered as the layer's own (for forward and backward alike)
        for module in model.modules():
            for child in module.children():
                if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                    for parameter in child.parameters():
                        deepspeed.zero.register_external_parameter(module, parameter)
    return engine


def backward(model: nn.Module, loss: torch.Tensor, last: bool, ranks: Ranks) -> None:
    """Backward of one micro-batch's loss. DeepSpeed's engine is told whether it is the step's last (its gradients are
    reduced then) and must not divide the loss again: it is already scaled by the step's units."""
    if ranks.engine == "deepspeed":
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


def update(model: nn.Module, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], max_grad_norm: float,
           ranks: Ranks) -> None:
    """Gradient clipping on the global norm, then the update. DeepSpeed's engine does both itself (ZeRO's shards hold
    the gradients; `gradient_clipping` is the YAML's max_grad_norm)."""
    if ranks.engine == "deepspeed":
        model.step()
        return
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
    """DDP: skip the all-reduce on the micro-batches before a step's last (the last one reduces them all)."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_parameters(model: nn.Module, ranks: Ranks) -> Iterator[None]:
    """Under FSDP or ZeRO-3, every parameter whole on every rank for the duration (to save them); else nothing to
    do. Every rank must enter it."""
    if ranks.engine == "deepspeed" and model.zero_optimization_partition_weights():
        import deepspeed  # deferred: an optional package

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
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
    number of ranks can resume from it; under DeepSpeed a note of where it is (`save_engine_state` writes ZeRO's
    shards); otherwise each rank's own, which is everyone's."""
    if ranks.engine == "deepspeed":
        return {"deepspeed_stage": model.zero_optimization_stage(), "world_size": ranks.world_size}
    if ranks.engine != "fsdp" or not ranks.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_engine_state(model: nn.Module, output_dir: Path, name: str, ranks: Ranks) -> Path | None:
    """DeepSpeed: every rank writes its ZeRO shards (optimizer state, and the trainable weights) into one temporary
    folder in output_dir, which the checkpoint then takes in whole; None for the other engines."""
    if ranks.engine != "deepspeed":
        return None
    folder = Path(ranks.gather(str(temp_dir(output_dir, name)) if ranks.is_main else None)[0])
    model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    ranks.barrier()
    return folder


def load_whole_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                               ranks: Ranks, checkpoint: Path) -> None:
    """The inverse of `whole_optimizer_state`: under FSDP each rank keeps its shard of the saved whole; under
    DeepSpeed the engine reads its own files, which ZeRO stages 1-3 split by rank: they resume on as many ranks."""
    if ranks.engine == "deepspeed" or "deepspeed_stage" in state:
        saved_stage, saved_world = state.get("deepspeed_stage"), state.get("world_size")
        if ranks.engine != "deepspeed" or saved_stage != model.zero_optimization_stage():
            raise ConfigError(f"'{checkpoint}' was saved by DeepSpeed ZeRO stage {saved_stage}; resume it with the "
                              "same deepspeed config file.")
        if saved_stage and saved_world != ranks.world_size:
            raise ConfigError(f"'{checkpoint}' holds DeepSpeed ZeRO-{saved_stage} optimizer shards of {saved_world} "
                              f"ranks; it resumes on {saved_world} ranks, not {ranks.world_size}.")
        model.load_checkpoint(str(checkpoint / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
        return
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
