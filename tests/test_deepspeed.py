"""DeepSpeed ZeRO 0/2/3 from LLaMA-Factory's config files: 2 processes train exactly as one process with the same
global batch, save the same PEFT adapter (or model), and resume exactly.

Users get DeepSpeed on GPUs only (on a CPU, FSDP is the path, and the run is refused: tests/test_distributed.py). These
tests run the same engine on DeepSpeed's CPU accelerator with gloo, through PEFTKIT_DEEPSPEED_ON_CPU.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import save_chat_model
from test_distributed import TORCHRUN, assert_same_adapter, close, free_port, losses, ok, peftkit, run, settings
from transformers import AutoModelForCausalLM

from peftkit.config import load_config, read_deepspeed
from peftkit.errors import ConfigError
from peftkit.train.distributed import DEEPSPEED_ON_CPU, deepspeed_config

pytest.importorskip("deepspeed")
ON_CPU = {DEEPSPEED_ON_CPU: "1"}

COMMON = {  # LLaMA-Factory's examples/deepspeed/ds_z*_config.json share these
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "comms_config": {"verbose": False},
    "monitor_config": {"enabled": True, "tag": "DeepSpeedMonitor", "csv_monitor": {"enabled": False}},
}
ZERO_2 = {"allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": False, "reduce_scatter": True,
          "reduce_bucket_size": 5e8, "contiguous_gradients": True, "round_robin_gradients": True}
ZERO = {
    "z0": {"stage": 0, **ZERO_2},
    "z2": {"stage": 2, **ZERO_2},
    "z3": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
           "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
           "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
           "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def ds_file(folder: Path, name: str) -> Path:
    path = folder / f"ds_{name}_config.json"
    path.write_text(json.dumps({**COMMON, "zero_optimization": ZERO[name]}, indent=2))
    return path


def ds_torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return run([*TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args], env=ON_CPU)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def one_process(chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The oracle: one process without any engine, batch 4 x accumulation 2."""
    out = tmp_path_factory.mktemp("one") / "run"
    ok(peftkit("train", "/dev/null", *settings(chat_dir, out, per_device_train_batch_size=4,
                                                gradient_accumulation_steps=2)))
    return out


@pytest.mark.parametrize("zero", list(ZERO))
def test_deepspeed_lora_equals_one_process_with_twice_the_batch(chat_dir: Path, one_process: Path, tmp_path: Path,
                                                                zero: str) -> None:
    out = tmp_path / "run"
    result = ok(ds_torchrun("-m", "peftkit", "train", "/dev/null",
                            *settings(chat_dir, out, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                            f"deepspeed={ds_file(tmp_path, zero)}"))
    assert "DEEPSPEED on 2 processes (gloo" in result.stderr
    assert close(losses(out), losses(one_process), 1e-5), (losses(out), losses(one_process))
    assert_same_adapter(one_process, out)


def test_deepspeed_zero3_full_fine_tuning_equals_one_process(chat_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(finetuning_type="full", learning_rate=1e-3, gradient_accumulation_steps=2, val_size=4,
                  eval_strategy="steps", eval_steps=2)
    ok(peftkit("train", "/dev/null", *settings(chat_dir, one, per_device_train_batch_size=2, **common)))
    ok(ds_torchrun("-m", "peftkit", "train", "/dev/null", *settings(chat_dir, two, per_device_train_batch_size=1,
                                                                     **common), f"deepspeed={ds_file(tmp_path, 'z3')}"))
    assert close(losses(two), losses(one), 1e-4), (losses(two), losses(one))
    evals = [[e["eval_loss"] for e in map(json.loads, (o / "trainer_log.jsonl").read_text().splitlines())
              if "eval_loss" in e] for o in (one, two)]
    assert evals[0] and close(evals[1], evals[0], 1e-4)  # evaluation sharded over the ranks and summed
    ids = torch.randint(3, 200, (2, 24))
    a, b = (AutoModelForCausalLM.from_pretrained(o) for o in (one, two))
    assert (a(ids).logits - b(ids).logits).abs().max() <= 1e-4


def test_deepspeed_resume_on_two_ranks_is_exact_and_other_rank_counts_are_refused(chat_dir: Path,
                                                                                  tmp_path: Path) -> None:
    full, again, alone = tmp_path / "full", tmp_path / "again", tmp_path / "alone"
    args = [*settings(chat_dir, full, per_device_train_batch_size=2, save_steps=2),
            f"deepspeed={ds_file(tmp_path, 'z2')}"]
    ok(ds_torchrun("-m", "peftkit", "train", "/dev/null", *args))
    shards = sorted(p.name for p in (full / "checkpoint-2" / "deepspeed" / "zero").iterdir())
    assert any("optim_states" in name for name in shards), shards
    assert not list(full.glob(".*tmp*"))  # the engine's staging folder went into the checkpoint
    for folder in (again, alone):
        folder.mkdir()
        subprocess.run(["cp", "-r", str(full / "checkpoint-2"), str(folder)], check=True)
    ok(ds_torchrun("-m", "peftkit", "train", "/dev/null", *[a.replace(str(full), str(again)) for a in args],
                   "resume_from_checkpoint=true"))
    assert losses(again) == losses(full)
    result = peftkit("train", "/dev/null", *[a.replace(str(full), str(alone)) for a in args],
                     "resume_from_checkpoint=true", env=ON_CPU)
    assert result.returncode == 1
    assert "holds DeepSpeed ZeRO-2 optimizer shards of 2 ranks; it resumes on 2 ranks, not 1" in result.stderr


# --- the config file ---
def test_auto_values_are_filled_from_the_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["model_name_or_path=m", "per_device_train_batch_size=3", "gradient_accumulation_steps=4",
                             "max_grad_norm=0.5", f"deepspeed={ds_file(tmp_path, 'z3')}"])
    config = deepspeed_config(cfg, read_deepspeed(cfg.deepspeed), world_size=2, hidden_size=64)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 4, 24, 0.5)
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False  # peftkit's own precision
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert read_deepspeed(cfg.deepspeed)["train_batch_size"] == "auto"  # the file's own values are left alone


def test_a_file_that_contradicts_the_yaml_is_refused_in_one_line(chat_dir: Path, tmp_path: Path) -> None:
    cases = [({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu 8 (the YAML gives 2)"),
             ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "has a 'optimizer' section")]
    for extra, message in cases:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({**COMMON, "zero_optimization": ZERO["z2"], **extra}))
        out = tmp_path / "run"
        result = peftkit("train", "/dev/null", *settings(chat_dir, out, per_device_train_batch_size=2),
                         f"deepspeed={path}", env=ON_CPU)
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ConfigError, match="choose one engine"):
        load_config(None, ["model_name_or_path=m", "fsdp=full_shard", f"deepspeed={path}"])


def test_methods_deepspeed_does_not_shard_are_refused_in_one_line(tmp_path: Path) -> None:
    path = ds_file(tmp_path, "z2")
    for extra, message in [(["finetuning_type=ia3"], "deepspeed runs finetuning_type full, freeze, lora"),
                           (["quantization_bit=4"], "deepspeed cannot shard a quantized base"),
                           (["stage=grpo"], "deepspeed runs stage sft, pt, dpo, kto, not 'grpo' (sampling runs"),
                           (["stage=rm"], "not 'rm' (its value head lives outside the model the engine shards)")]:
        result = peftkit("train", "/dev/null", "model_name_or_path=m", "dataset=identity", f"deepspeed={path}",
                         f"output_dir={tmp_path / 'run'}", *extra, env=ON_CPU)
        assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            (extra, result.stderr)
