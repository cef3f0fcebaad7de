"""stage: grpo on a tiny byte-level model: learning, every loss type, exact resume, refusals, and the result as an
ordinary adapter."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import save_chat_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import rl_rewards
from peftkit.config import TrainConfig
from peftkit.errors import ConfigError
from peftkit.serve.chat import ChatEngine
from peftkit.train.run import run_sft
from peftkit.tuned import TunedModel


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("grpo") / "policy")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo_data")
    rows = [{"instruction": f"Write some a's, please ({i}).", "answer": "a"} for i in range(32)]
    (folder / "prompts.json").write_text(json.dumps(rows))
    chat = [{"messages": [{"role": "user", "content": "Say a."}, {"role": "assistant", "content": "a"}],
             "answer": "a"}] * 4
    (folder / "chat.json").write_text(json.dumps(chat))
    (folder / "dataset_info.json").write_text(json.dumps({"prompts": {"file_name": "prompts.json"},
                                                          "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                                                                   "columns": {"messages": "messages"},
                                                                   "tags": {"role_tag": "role",
                                                                            "content_tag": "content",
                                                                            "user_tag": "user",
                                                                            "assistant_tag": "assistant"}}}))
    return folder


def grpo_config(policy: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(policy), stage="grpo", finetuning_type="lora", lora_target="all",
                lora_rank=8, lora_alpha=16, dataset="prompts", dataset_dir=str(data), output_dir=str(out),
                cutoff_len=64, max_new_tokens=8, num_generations=4, per_device_train_batch_size=2,
                reward_funcs=["rl_rewards.letters"], learning_rate=3e-2, max_steps=2, logging_steps=1, seed=0,
                bf16=False, overwrite_cache=True, lr_scheduler_type="constant")
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward(policy, data, tmp_path) -> None:
    cfg = grpo_config(policy, data, tmp_path / "out", max_steps=16, num_generations=8, learning_rate=0.1)
    results = run_sft(cfg)
    rewards = [e["reward"] for e in log(tmp_path / "out") if "reward" in e]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards
    assert results["rollout_tokens"] > 0 and results["rollout_tokens_per_second"] > 0
    entry = log(tmp_path / "out")[0]
    for name in ("loss", "reward", "reward_std", "rewards/letters", "completions/mean_length", "clip_ratio",
                 "entropy", "rollout_tokens_per_second", "tokens_per_second"):
        assert name in entry, name
    # the trained policy is an ordinary adapter: chat with it
    model = AutoModelForCausalLM.from_pretrained(policy)
    engine = ChatEngine(TunedModel.load(model, tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out"))
    assert engine.reply([{"role": "user", "content": "Write some a's"}], max_new_tokens=8) is not None


@pytest.mark.parametrize("loss_type,beta,iterations", [("grpo", 0.04, 1), ("bnpo", 0.0, 2), ("dr_grpo", 0.04, 1),
                                                       ("dapo", 0.04, 2)])
def test_every_loss_type_trains(policy, data, tmp_path, loss_type, beta, iterations) -> None:
    cfg = grpo_config(policy, data, tmp_path / "out", loss_type=loss_type, grpo_beta=beta,
                      num_iterations=iterations, gradient_accumulation_steps=2, max_steps=1)
    run_sft(cfg)
    entry = log(tmp_path / "out")[0]
    assert ("kl" in entry) == (beta > 0)
    assert torch.isfinite(torch.tensor(entry["loss"]))
    if iterations > 1:  # the second update reuses the samples with the ratio against the sampling policy
        assert entry["clip_ratio"] >= 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_dtypes(policy, data, tmp_path, monkeypatch, dtype) -> None:
    """The base in fp32 and in bf16, whichever this CPU would pick (PEFTKIT_DTYPE forces it; bf16 rollouts decode
    with packed weights): a KL term against the adapter-disabled base, samples reused for a second update."""
    monkeypatch.setenv("PEFTKIT_DTYPE", dtype)
    first = tmp_path / f"{dtype}-first"
    run_sft(grpo_config(policy, data, first, bf16=None, grpo_beta=0.04, max_steps=1))
    assert log(first)[0]["kl"] == 0.0  # the first update's policy is the reference, to the last bit
    out = tmp_path / dtype
    run_sft(grpo_config(policy, data, out, bf16=None, grpo_beta=0.04, num_iterations=2, max_steps=2))
    entries = log(out)
    assert all(math.isfinite(e[k]) for e in entries for k in ("loss", "reward", "kl", "entropy", "clip_ratio"))
    TunedModel.load(AutoModelForCausalLM.from_pretrained(policy), out)


def test_prefix_methods_and_full_training_generate(policy, data, tmp_path) -> None:
    """Virtual tokens take part in the rollouts; full fine-tuning with a KL term loads a separate reference."""
    run_sft(grpo_config(policy, data, tmp_path / "prefix", finetuning_type="prefix_tuning", num_virtual_tokens=4,
                        max_steps=1))
    run_sft(grpo_config(policy, data, tmp_path / "full", finetuning_type="full", grpo_beta=0.1, learning_rate=1e-4,
                        max_steps=1))
    assert "kl" in log(tmp_path / "full")[0]
    run_sft(grpo_config(policy, data, tmp_path / "chat", dataset="chat", max_steps=1,
                        reward_funcs=["accuracy", "format", "length"], reward_weights=[1, 0.5, 0.1],
                        reward_length_budget=4))
    entry = log(tmp_path / "chat")[0]
    assert {"rewards/accuracy", "rewards/format", "rewards/length"} <= set(entry)


def test_resume_after_a_reward_function_crash_is_exact(policy, data, tmp_path, monkeypatch) -> None:
    """A reward function that raises stops the run with its traceback and the last checkpoint intact; resuming from it
    gives the same rewards and losses as an uninterrupted run (sampling is seeded per step)."""
    kw = dict(max_steps=4, save_steps=2, reward_funcs=["rl_rewards.raises_on_call"])
    whole = tmp_path / "whole"
    run_sft(grpo_config(policy, data, whole, **kw))
    cut = tmp_path / "cut"
    rl_rewards.CALLS["n"] = 0
    monkeypatch.setenv("RL_RAISE_ON_CALL", "4")  # call 1 probes before training, calls 2-5 score steps 1-4
    with pytest.raises(RuntimeError, match="the grader crashed") as raised:
        run_sft(grpo_config(policy, data, cut, **kw))
    assert any("last checkpoint is intact" in note for note in raised.value.__notes__)
    assert (cut / "checkpoint-2").is_dir() and not (cut / "checkpoint-4").exists()
    monkeypatch.delenv("RL_RAISE_ON_CALL")
    run_sft(grpo_config(policy, data, cut, resume_from_checkpoint=True, overwrite_output_dir=False, **kw))
    a, b = log(whole), log(cut)
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for name in ("loss", "reward", "rewards/raises_on_call", "completions/mean_length", "entropy"):
            assert x[name] == pytest.approx(y[name], abs=1e-6), (name, x, y)


@pytest.mark.parametrize("kw,message", [
    ({"reward_funcs": ["no_such_module.score"]}, "cannot import module 'no_such_module'"),
    ({"reward_funcs": ["rl_rewards.missing"]}, "has no 'missing'"),
    ({"reward_funcs": ["rl_rewards.wrong_length"]}, "returned 3 values for 2 completions"),
    ({"reward_funcs": ["rl_rewards.not_a_number"]}, "rewards must be numbers"),
    ({"reward_funcs": ["accuracy"], "dataset": "prompts_without_answer"}, "`answer` column"),
    ({"num_generations": 1}, "num_generations must be at least 2"),
    ({"reward_funcs": []}, "needs reward_funcs"),
    ({"reward_funcs": ["accuracy", "format"], "reward_weights": [1]}, "reward_weights has 1 values"),
])
def test_bad_input_is_one_line_before_training(policy, data, tmp_path, kw, message) -> None:
    rows = [{"instruction": "Say a."}] * 4
    (data / "plain.json").write_text(json.dumps(rows))
    info = json.loads((data / "dataset_info.json").read_text())
    info["prompts_without_answer"] = {"file_name": "plain.json"}
    (data / "dataset_info.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    run_sft(grpo_config(policy, data, out, max_steps=1))  # an earlier run, which overwrite_output_dir may clear...
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=message) as raised:
        run_sft(grpo_config(policy, data, out, overwrite_output_dir=True, **kw))
    assert "\n" not in str(raised.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier  # ...but not for a failed one
