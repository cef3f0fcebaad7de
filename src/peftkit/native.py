"""peftkit's own C kernels: compiled on first use by the system's C compiler into peftkit's cache, loaded by ctypes.

Why C and not a Python extension: the kernels are a few hundred lines for x86-64 CPUs with AVX2, and building them at
first use (well under a second) keeps peftkit a pure-Python package. Without a compiler or on another CPU the callers
keep torch's own operators, so nothing here is required.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def build(source: Path) -> tuple[Path | None, str]:
    """The shared library of `source`, compiled once per source text and flags into `peftkit_home()/kernels`; or None
    and why not (no AVX2, no compiler, a compiler error). libgomp.so.1 in the library resolves, when loaded, to the
    copy torch already has: one OpenMP runtime and one thread pool in the process."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"this CPU has no AVX2 (torch's capability: {torch.backends.cpu.get_cpu_capability()})"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) on PATH"
    from .models import peftkit_home

    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = peftkit_home() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target, ""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"the C compiler could not run: {e}"
        if done.returncode != 0:
            return None, f"the C compiler failed: {done.stderr.strip()[-300:]}"
        os.replace(built, target)  # atomic: a concurrent build by another process leaves one whole file
    return target, ""


class Library:
    """A kernel library, built and loaded on first use, once per process (thread-safe). `declare(library)` sets its
    functions' signatures and returns what callers use (`loaded`); the environment variable `switch` set to "0"
    leaves it out."""

    def __init__(self, source: Path, switch: str, declare: Callable[[ctypes.CDLL], Any]) -> None:
        self.source, self.switch, self.declare = source, switch, declare
        self.loaded: Any = None  # what `declare` returned, once loaded; None before, or when it cannot be
        self.why_not = ""  # why it is not loaded, when it is not (for the docs, the tests and the benchmarks)
        self._tried = False
        self._lock = threading.Lock()

    def load(self) -> Any:
        """`loaded`, building and loading it on the first call."""
        with self._lock:
            if not self._tried:
                self._tried = True
                self.loaded, self.why_not = self._load()
            return self.loaded

    def _load(self) -> tuple[Any, str]:
        if os.environ.get(self.switch, "1") == "0":
            return None, f"{self.switch}=0"
        path, why = build(self.source)
        if path is None:
            return None, why
        try:
            return self.declare(ctypes.CDLL(str(path))), ""
        except (OSError, AttributeError) as e:
            return None, f"the kernels in {path} could not be loaded: {e}"


def release_openmp_threads() -> bool:
    """Let the calling thread's OpenMP worker threads go (`omp_pause_resource_all`); the next parallel region starts
    new ones. Returns whether an OpenMP runtime was found and paused.

    Why: GNU OpenMP counts every thread's pool of workers, idle ones included; once a process holds more OpenMP threads
    than cores, each parallel region and barrier puts its workers to sleep in the kernel and wakes them again instead of
    spinning. A server decodes in its own thread after the main thread has used OpenMP (loading, warm-up), so it ran
    that slow way: on 2 cores, a 256k-float `torch.add` took 65-75 us there against 22 us in the main thread, an empty
    region 7-27 us against 0.7, and a decode step of the layer kernel (a barrier per operator of each layer) 35-41 ms
    against 24-28 (docs/performance.md, "Decoding in a server's thread"). Linux only (the runtime is found in
    /proc/self/maps); elsewhere nothing happens."""
    return any([pause(1) == 0 for pause in _openmp_pauses()])  # omp_pause_soft; a list: every runtime paused


@functools.cache
def _openmp_pauses() -> tuple[Any, ...]:
    """`omp_pause_resource_all` of each OpenMP runtime loaded (torch's, which peftkit's kernels share), found once:
    the batcher calls `release_openmp_threads` every time it waits."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line or "/libiomp" in line}
    except OSError:
        return ()
    pauses = []
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        pauses.append(pause)
    return tuple(pauses)
