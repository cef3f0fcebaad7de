"""Choose the dtype for the frozen base weights by measuring, not by assuming: bf16 is ~2.5x faster than fp32 on
some CPUs and ~5x slower on others (no native bf16 instructions)."""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings

import torch

from .errors import ConfigError

# Forces the automatic choice (`bf16` unset, or `bf16: true` on a CPU where it is slow) to one dtype, so the tests can
# run the bf16 path on a CPU that would pick fp32, and the fp32 path on one that would pick bf16.
DTYPE_ENV = "PEFTKIT_DTYPE"
_FORCED = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A 256 x 1024 activation and a 1024 x 1024 weight in `dtype`, multiplied once: oneDNN builds its kernel on the
    first call, which must not be timed."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=generator).to(dtype)
    w = torch.randn(1024, 1024, generator=generator).to(dtype)
    torch.nn.functional.linear(a, w)
    return a, w


def _matmul_seconds(operands: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The CPU time of one product on this thread: time spent descheduled by other processes does not count."""
    start = time.thread_time()
    torch.nn.functional.linear(*operands)
    return time.thread_time() - start


_probe_lock = threading.Lock()  # the probe changes the process's thread count for a moment


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device: str) -> bool:
    """Whether bf16 matmuls beat fp32 here; on CUDA, whether bf16 is supported at all.

    The two kinds of CPU differ by ~2.5x one way and ~5x the other, so the probe must only survive a busy machine:
    `peftkit train` started beside another run (the web UI's test starts two at once on 2 cores) once timed a
    preempted bf16 product at twice fp32's and trained in fp32. Hence one thread, timed by its own CPU time (the
    ratio is a property of a core; a single thread neither waits at a barrier for a sibling that another process
    has descheduled nor counts its own time off the CPU), each dtype's best of at least two alternating rounds, and
    up to five rounds while the ratio is a close call."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    with _probe_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fp32_operands, bf16_operands = _operands(torch.float32), _operands(torch.bfloat16)
            fp32, bf16 = float("inf"), float("inf")
            for round_ in range(5):
                fp32 = min(fp32, _matmul_seconds(fp32_operands))
                bf16 = min(bf16, _matmul_seconds(bf16_operands))
                if round_ >= 1 and not 0.5 <= bf16 / fp32 <= 2:
                    break
        finally:
            torch.set_num_threads(threads)
    return bf16 < 0.8 * fp32


def forced_dtype() -> torch.dtype | None:
    """The dtype named by $PEFTKIT_DTYPE, if set."""
    name = os.environ.get(DTYPE_ENV, "").strip().lower()
    if not name:
        return None
    if name not in _FORCED:
        raise ConfigError(f"{DTYPE_ENV}={name!r} is not a dtype; use one of: {', '.join(_FORCED)} (or unset it).")
    return _FORCED[name]


def base_dtype(bf16: bool | None, fp16: bool, device: str) -> torch.dtype:
    """The dtype to hold frozen base weights in; trainable parameters and optimizer state always stay fp32.

    `bf16: true` on a CPU that multiplies bf16 slower than fp32 falls back to fp32 with a warning: configs written
    for GPUs (LLaMA-Factory's examples all say bf16) would otherwise run several times slower here. An explicit
    `bf16: false` or `fp16: true` is obeyed; otherwise $PEFTKIT_DTYPE, when set, replaces the measurement.
    """
    if fp16:
        return torch.float16
    if bf16 is False:
        return torch.float32
    forced = forced_dtype()
    if forced is not None:
        return forced
    if bf16_is_faster(device):
        return torch.bfloat16
    if bf16:
        warnings.warn("bf16 was requested, but this CPU multiplies bf16 slower than fp32 (no native bf16 "
                      "instructions): training in fp32 instead, which is faster here.", stacklevel=2)
    return torch.float32


def inference_dtype(checkpoint: torch.dtype, device: str) -> torch.dtype:
    """The dtype to generate in from a checkpoint stored in `checkpoint`, when the user named none: its own, except
    half precision on a CPU that multiplies bf16 slower than fp32, where fp32 holds the same weight values and runs
    faster (SmolLM2-135M on a 2-core EPYC without native bf16: prefill 3.5x, decode ~2x, with the decode kernel
    reading bf16 copies of the weights; docs/performance.md, "Decode"). $PEFTKIT_DTYPE wins."""
    forced = forced_dtype()
    if forced is not None:
        return forced
    if checkpoint in (torch.bfloat16, torch.float16) and device == "cpu" and not bf16_is_faster(device):
        return torch.float32
    return checkpoint


def free_memory_bytes() -> int:
    """Free physical memory now (0 where the OS does not say): the room for a higher-precision or extra copy of the
    weights."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
