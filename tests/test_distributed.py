"""Several processes (torchrun, gloo on this CPU) train exactly as one process with the same global batch.

Each run here is a real `peftkit train` under torchrun with 2 processes on a tiny Llama, fp32 (bf16 would round
differently in differently composed batches), a few steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import save_chat_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftkit.config import load_config
from peftkit.errors import ConfigError
from peftkit.train.distributed import Ranks, engine_of, shard_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat_model"))


def settings(model: Path, out: Path, **extra: object) -> list[str]:
    base = {"model_name_or_path": model, "dataset": "identity", "dataset_dir": DATA, "max_samples": 20,
            "cutoff_len": 96, "max_steps": 5, "learning_rate": 1e-2, "logging_steps": 1, "bf16": False, "seed": 1,
            "output_dir": out, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ, cwd=ROOT)


def peftkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "peftkit", *args], env=env)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return run([*TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args])


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]


def assert_same_adapter(one: Path, two: Path) -> None:
    """The same PEFT adapter: the same tensors element by element (the weights are ~1e-2; rounding differs by CPU:
    ~1e-6 with and without AVX-512) and the same adapter_config.json."""
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    assert (one / "adapter_config.json").read_text() == (two / "adapter_config.json").read_text()


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


# --- exactness ---
@pytest.mark.parametrize("accumulation", [1, 2])
def test_ddp_lora_equals_one_process_with_twice_the_batch(chat_dir: Path, tmp_path: Path, accumulation: int) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    ok(peftkit("train", "/dev/null", *settings(chat_dir, one, per_device_train_batch_size=4,
                                                gradient_accumulation_steps=accumulation)))
    # the two launch spellings: --nproc-per-node, and LLaMA-Factory's FORCE_TORCHRUN=1 with NPROC_PER_NODE
    args = settings(chat_dir, two, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation)
    if accumulation == 1:
        result = ok(peftkit("train", "/dev/null", *args, "--nproc-per-node", "2"))
    else:
        result = ok(peftkit("train", "/dev/null", *args, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2",
                                                                "MASTER_PORT": str(free_port())}))
    assert "DDP on 2 processes (gloo; 1 threads per rank)" in result.stderr
    assert close(losses(two), losses(one), 1e-5), (losses(two), losses(one))
    assert_same_adapter(one, two)


def test_fsdp_full_fine_tuning_equals_one_process(chat_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(finetuning_type="full", learning_rate=1e-3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, val_size=4, eval_strategy="steps", eval_steps=2)
    ok(peftkit("train", "/dev/null", *settings(chat_dir, one, **{**common, "per_device_train_batch_size": 2})))
    result = ok(torchrun("-m", "peftkit", "train", "/dev/null",
                         *settings(chat_dir, two, **{**common, "per_device_train_batch_size": 1}), "fsdp=full_shard"))
    assert "FSDP on 2 processes" in result.stderr
    assert close(losses(two), losses(one), 1e-4), (losses(two), losses(one))
    evals = [[e["eval_loss"] for e in map(json.loads, (o / "trainer_log.jsonl").read_text().splitlines())
              if "eval_loss" in e] for o in (one, two)]
    assert evals[0] and close(evals[1], evals[0], 1e-4)  # evaluation sharded over the ranks and summed
    ids = torch.randint(3, 200, (2, 24))
    a, b = (AutoModelForCausalLM.from_pretrained(o) for o in (one, two))
    assert (a(ids).logits - b(ids).logits).abs().max() <= 1e-4


@pytest.mark.slow  # inductor compiles the layers in both ranks: ~1.5 min on 2 cores
def test_fsdp_with_compiled_layers_equals_one_eager_process(chat_dir: Path, tmp_path: Path) -> None:
    """torch_compile: true finds the decoder layers FSDP has subclassed (FSDPLlamaDecoderLayer) and trains as eager."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(finetuning_type="full", learning_rate=1e-3, max_steps=3)
    ok(peftkit("train", "/dev/null", *settings(chat_dir, one, **common, per_device_train_batch_size=2)))
    result = ok(peftkit("train", "/dev/null", *settings(chat_dir, two, **common, per_device_train_batch_size=1),
                        "fsdp=full_shard", "torch_compile=true", "--nproc-per-node", "2",
                        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}))
    assert "FSDP on 2 processes" in result.stderr
    assert close(losses(two), losses(one), 1e-4), (losses(two), losses(one))


def test_two_nodes_on_loopback_equal_one_node(chat_dir: Path, tmp_path: Path) -> None:
    """torchrun --nnodes 2 --node_rank 0|1 with a static rendezvous on 127.0.0.1: one process per "machine"."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    ok(torchrun("-m", "peftkit", "train", "/dev/null", *settings(chat_dir, single, per_device_train_batch_size=2)))
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    nodes = [subprocess.Popen([*TORCHRUN, "--nproc_per_node=1", "--nnodes=2", f"--node_rank={rank}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "peftkit", "train",
                               "/dev/null", *settings(chat_dir, multi, per_device_train_batch_size=2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert losses(multi) == losses(single)


# --- resume ---
def test_resume_on_two_ranks_is_exact_and_on_one_rank_continues_at_the_example(chat_dir: Path, tmp_path: Path) -> None:
    full, again, alone = tmp_path / "full", tmp_path / "again", tmp_path / "alone"
    args = dict(per_device_train_batch_size=2, save_steps=2)
    ok(torchrun("-m", "peftkit", "train", "/dev/null", *settings(chat_dir, full, **args)))
    for folder in (again, alone):
        folder.mkdir()
        subprocess.run(["cp", "-r", str(full / "checkpoint-2"), str(folder)], check=True)
    ok(torchrun("-m", "peftkit", "train", "/dev/null", *settings(chat_dir, again, **args),
                "resume_from_checkpoint=true"))
    assert losses(again) == losses(full)
    result = ok(peftkit("train", "/dev/null", *settings(chat_dir, alone, **args), "resume_from_checkpoint=true"))
    assert "resuming a 2-process checkpoint on 1 processes: continuing at example 8 of epoch 0" in result.stderr
    log = losses(alone)
    assert log[:2] == losses(full)[:2] and len(log) == 5  # 2 rows per step from there: the same 5 steps in all


# --- faults ---
CRASH = textwrap.dedent("""
    import os, signal, sys
    from peftkit.cli import main
    from peftkit.objectives import base
    from peftkit.objectives.sft import Sft

    class Crash(Sft):
        calls = 0

        def loss(self, model, batch):
            Crash.calls += 1
            if os.environ.get("RANK") == "1" and Crash.calls == 5:
                if "--kill" in sys.argv:
                    os.kill(os.getpid(), signal.SIGKILL)  # killed by a signal: no Python error at all
                raise RuntimeError("injected failure on rank 1")
            return super().loss(model, batch)

    base._REGISTRY["sft"] = Crash
    if os.environ.get("RANK") == "1" and "--differ" in sys.argv:
        sys.argv.append("seed=2")  # this rank's settings differ from rank 0's
    sys.exit(main([a for a in sys.argv[1:] if a not in ("--differ", "--kill")]))
""")


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_one_rank_failing_ends_the_job_promptly_and_says_why_once(chat_dir: Path, tmp_path: Path, how: str) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "run"
    start = time.monotonic()
    result = torchrun(str(script), "train", "/dev/null", *settings(chat_dir, out, per_device_train_batch_size=2,
                                                                    save_steps=2, max_steps=8),
                      *(["--kill"] if how == "killed" else []))
    assert result.returncode != 0 and time.monotonic() - start < 60
    if how == "raises":
        assert result.stderr.count("RuntimeError: injected failure on rank 1") == 1
    else:  # torchrun's summary names the signal
        assert "Signal 9 (SIGKILL)" in result.stderr or "SIGKILL" in result.stderr
    assert "[rank0]" not in result.stderr  # the survivor does not add a traceback of its own
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # complete: the last good one


def test_ranks_with_different_settings_are_refused_at_start(chat_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "differ.py"
    script.write_text(CRASH)
    out = tmp_path / "run"
    result = torchrun(str(script), "train", "/dev/null", *settings(chat_dir, out, per_device_train_batch_size=2),
                      "--differ")
    assert result.returncode != 0
    assert result.stderr.count("The ranks' configs differ (rank 1 vs rank 0)") == 1
    assert not (out / "trainer_log.jsonl").exists()


# --- refusals, before any work ---
DS = {"z0": {"zero_optimization": {"stage": 0}}, "z2": {"zero_optimization": {"stage": 2, "overlap_comm": False}},
      "z3": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}}


@pytest.mark.parametrize("name", list(DS))
def test_deepspeed_configs_are_read_and_refused_on_cpu_naming_fsdp(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"ds_{name}_config.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "bf16": {"enabled": "auto"}, **DS[name]}))
    out = tmp_path / "run"
    result = peftkit("train", "/dev/null", "model_name_or_path=m", "dataset=identity", f"deepspeed={path}",
                     f"output_dir={out}")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"ZeRO stage {name[1]}" in result.stderr and "fsdp: full_shard" in result.stderr
    assert not out.exists()


def test_bad_engine_settings_are_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    cases = [([f"deepspeed={bad}"], "ZeRO stages are 0, 1, 2 and 3"),
             ([f"deepspeed={tmp_path / 'missing.json'}"], "cannot read"),
             (["fsdp=full_shard", "finetuning_type=ia3"], "fsdp runs finetuning_type full, freeze, lora"),
             (["fsdp=full_shard", "quantization_bit=4"], "cannot shard a quantized base"),
             (["fsdp=full_shard", "stage=rm"], "fsdp runs stage sft, pt, dpo, kto, not 'rm' (its value head"),
             (["fsdp=full_shard", "stage=kd", "teacher_model_name_or_path=t"],
              "not 'kd' (a sharded student with its teacher is not checked yet)"),
             (["fsdp=fully_sharded"], "fsdp 'fully_sharded' is not one of")]
    for extra, message in cases:
        result = peftkit("train", "/dev/null", "model_name_or_path=m", "dataset=identity",
                         f"output_dir={tmp_path / 'run'}", *extra)
        assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (extra, result.stderr)
    assert not (tmp_path / "run").exists()


# --- pieces ---
def test_each_rank_reads_its_contiguous_share() -> None:
    rows = list(range(8))
    assert [shard_of(rows, Ranks(rank=r, world_size=2)) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [shard_of([6, 7, 8], Ranks(rank=r, world_size=2)) for r in (0, 1)] == [[6, 7], [8]]
    assert [shard_of([9], Ranks(rank=r, world_size=2)) for r in (0, 1)] == [[9], []]  # rank 1 runs one, not counted
    assert shard_of(rows, Ranks()) == rows
    assert Ranks().sum([1.5, 2]) == [1.5, 2]


def test_engine_from_the_config() -> None:
    assert engine_of(load_config(None, ["model_name_or_path=m"])) == "ddp"
    assert engine_of(load_config(None, ["model_name_or_path=m", "fsdp=full_shard auto_wrap"])) == "fsdp"
    with pytest.raises(ConfigError, match="choose one engine"):
        load_config(None, ["model_name_or_path=m", "fsdp=full_shard", f"deepspeed={ROOT / 'pyproject.toml'}"])


def test_cpu_threads_one_per_physical_core_shared_by_the_ranks_here(monkeypatch) -> None:
    from peftkit.train.distributed import physical_cores, set_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert 1 <= physical_cores() <= os.cpu_count()
        set_cpu_threads(1)
        assert torch.get_num_threads() == physical_cores()
        set_cpu_threads(physical_cores() * 4)  # more ranks than cores: one thread each
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        set_cpu_threads(1)  # the user's setting is kept
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


FAULTS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from peftkit.train.distributed import keep_freed_memory
    made = keep_freed_memory() if sys.argv[1] == "keep" else None
    def step():  # a step's worth of freed and re-allocated tensors, 6 and 24 MiB
        for size in (6, 24):
            tensors = [torch.ones(size << 18) for _ in range(4)]
            del tensors
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_training_keeps_freed_memory_instead_of_faulting_it_in_every_step(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)

    def faults(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    made, kept = faults("keep")
    _, default = faults("default")
    assert made == "True"
    # 10 steps of 4 x 30 MiB: glibc by default gives most of it back and faults it in again (~20k pages)
    assert kept < default / 3, (kept, default)
    made, _ = faults("keep", MALLOC_TRIM_THRESHOLD_="131072")  # the user's own glibc settings win
    assert made == "False"
