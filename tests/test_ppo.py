"""stage: ppo on a tiny byte-level model: against a reward server (learning, KL bounded), against a stage-rm LoRA
reward model on the policy's own base (scores equal RewardModel's), and its refusals."""

from __future__ import annotations

import http.server
import json
import random
import shutil
import string
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, save_chat_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rl_rewards
from peftkit.config import TrainConfig
from peftkit.errors import ConfigError
from peftkit.evaluate.reward import RewardModel
from peftkit.objectives.rollout import Sampler
from peftkit.objectives.scorer import AdapterScorer, load_scorer
from peftkit.train.run import run_sft
from peftkit.tuned import TunedModel

OTHER = string.digits + string.punctuation + "".join(map(chr, range(0xC0, 0x180)))  # what random bytes decode to


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("ppo") / "policy")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ppo_data")
    rows = [{"instruction": f"Write something ({i}).", "output": "letters"} for i in range(32)]
    g = random.Random(0)
    pairs = [{"instruction": f"Write something ({i}).",
              "chosen": "".join(g.choice(string.ascii_letters) for _ in range(g.randint(3, 8))),
              "rejected": "".join(g.choice(OTHER) for _ in range(g.randint(3, 8)))}
             for i in range(64)]
    (folder / "prompts.json").write_text(json.dumps(rows))
    (folder / "pairs.json").write_text(json.dumps(pairs))
    (folder / "dataset_info.json").write_text(json.dumps({
        "prompts": {"file_name": "prompts.json"},
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}))
    return folder


@pytest.fixture(scope="module")
def reward_server():
    """LLaMA-Factory's reward API: {"messages": [texts]} in, {"scores": [...]} out; the score is the share of ASCII
    letters in the text after the last assistant turn marker."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
            answers = [t.rsplit("assistant\n", 1)[-1] for t in texts]
            body = json.dumps({"scores": rl_rewards.letters(texts, answers)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/score"
    server.shutdown()


def ppo_config(policy: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(policy), stage="ppo", finetuning_type="lora", lora_target="all", lora_rank=8,
                lora_alpha=16, dataset="prompts", dataset_dir=str(data), output_dir=str(out), cutoff_len=64,
                max_new_tokens=8, per_device_train_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2,
                learning_rate=5e-2, max_steps=2, logging_steps=1, seed=0, bf16=False, overwrite_cache=True,
                lr_scheduler_type="constant", temperature=1.0)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_ppo_raises_the_reward_with_the_kl_bounded(policy, data, reward_server, tmp_path) -> None:
    out = tmp_path / "out"
    target = 6.0
    results = run_sft(ppo_config(policy, data, out, reward_model=reward_server, reward_model_type="api",
                                 max_steps=20, learning_rate=3e-2, ppo_init_kl_coef=0.05, ppo_target=target,
                                 ppo_horizon=64, ppo_buffer_size=2))
    entries = log(out)
    rewards = [e["reward"] for e in entries]
    # the rise over 20 steps, seeds 0-3, with and without the attention kernel (fused_ops.attention): 0.04-0.14; the
    # trajectory follows every rounding of the logits through the sampled rollouts
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.03, rewards
    kls = [e["kl"] for e in entries]
    assert sum(kls[-5:]) / 5 < 1.5 * target, kls
    for name in ("reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "response_length", "kl_coef",
                 "rollout_tokens_per_second", "tokens_per_second"):
        assert name in entries[0], name
    # the controller steers towards ppo_target: above it, the coefficient grows
    over = [(a["kl"], b["kl_coef"] / a["kl_coef"]) for a, b in zip(entries, entries[1:])]
    assert all(ratio > 1 for kl, ratio in over if kl > target * 1.01)
    assert all(ratio < 1 for kl, ratio in over if kl < target * 0.99)
    assert results["kl_coef"] != pytest.approx(0.2)
    head = load_file(out / "value_head.safetensors")
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert head["v_head.summary.weight"].abs().sum() > 0
    TunedModel.load(AutoModelForCausalLM.from_pretrained(policy), out)  # an ordinary adapter


@pytest.fixture(scope="module")
def reward_model(policy, data, tmp_path_factory) -> Path:
    """A stage-rm LoRA reward model that prefers answers in ASCII letters to other characters."""
    rm = tmp_path_factory.mktemp("rm") / "rm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_sft(TrainConfig(model_name_or_path=str(policy), stage="rm", finetuning_type="lora", lora_target="all",
                            dataset="pairs", dataset_dir=str(data), output_dir=str(rm), num_train_epochs=2,
                            per_device_train_batch_size=8, learning_rate=1e-2, bf16=False, overwrite_cache=True,
                            logging_steps=1))
    accuracy = [e["rewards/accuracies"] for e in log(rm)]
    assert sum(accuracy[-4:]) / 4 > 0.9, accuracy
    return rm


def test_ppo_against_a_trained_reward_model(policy, data, reward_model, tmp_path) -> None:
    """The policy learns what the reward model was trained to prefer, the KL held near ppo_target."""
    out, target = tmp_path / "out", 6.0
    run_sft(ppo_config(policy, data, out, reward_model=str(reward_model), max_steps=40, learning_rate=3e-2,
                       ppo_epochs=4, ppo_init_kl_coef=0.05, ppo_target=target, ppo_horizon=64, ppo_buffer_size=2))
    entries = log(out)
    rewards, kls = [e["reward"] for e in entries], [e["kl"] for e in entries]
    # the rise over 40 steps, seeds 0-3: 0.08-0.23 with the attention kernel (fused_ops.attention), -0.03-0.29 with
    # SDPA; each trajectory follows every rounding of the logits through the sampled rollouts
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards
    assert sum(kls[-5:]) / 5 < 1.5 * target, kls


def test_lora_reward_model_shares_the_policy_base(policy, data, reward_model, tmp_path) -> None:
    """A stage-rm LoRA adapter joins the policy's model as a frozen second adapter; its scores equal RewardModel's,
    and after two PPO steps the saved policy adapter holds only the policy's tensors."""
    rm = reward_model
    cfg = ppo_config(policy, data, tmp_path / "out", reward_model=str(rm))
    tuned = TunedModel(AutoModelForCausalLM.from_pretrained(policy), cfg.method_config())
    scorer = load_scorer(cfg, tuned, byte_tokenizer())
    assert isinstance(scorer, AdapterScorer) and tuned.active_adapter == "default"
    sampler = Sampler(cfg)
    from peftkit.data import SFTCollator

    sampler.bind(byte_tokenizer(), SFTCollator(0))
    tok = byte_tokenizer()
    prompts = [tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]] * 2
    completions = [tok("abc<|im_end|>")["input_ids"], tok("123<|im_end|>")["input_ids"]]
    got = scorer(sampler.sequences(prompts, completions), [])
    reference = RewardModel.load(rm)
    texts = [tok.decode(p + c) for p, c in zip(prompts, completions)]
    want = torch.tensor(reference(texts))
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert all(p.requires_grad for _, p in tuned.trainable_parameters())
    run_sft(cfg)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and not any("reward" in k for k in saved)
    assert "reward" in log(tmp_path / "out")[0]


def test_resume_is_exact_with_the_value_head_and_kl_controller(policy, data, reward_server, tmp_path) -> None:
    """Checkpoints hold the value head, the KL coefficient and the score moments: a run resumed from step 2 logs
    the same steps 3 and 4 as the uninterrupted run."""
    kw = dict(reward_model=reward_server, reward_model_type="api", max_steps=4, save_steps=2, ppo_score_norm=True,
              ppo_target=1.0, ppo_horizon=16, plot_loss=True)
    whole = tmp_path / "whole"
    run_sft(ppo_config(policy, data, whole, **kw))
    assert (whole / "training_reward.png").is_file() and (whole / "training_kl.png").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run_sft(ppo_config(policy, data, resumed, resume_from_checkpoint=True, overwrite_output_dir=False, **kw))
    a, b = log(whole), log(resumed)
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        for name in ("loss", "reward", "kl", "kl_coef", "value_loss", "policy_loss"):
            assert x[name] == pytest.approx(y[name], abs=1e-6), (name, x, y)


def test_an_epochs_short_last_step_still_updates(policy, data, reward_server, tmp_path) -> None:
    """4 prompts: one micro-batch of 4 per epoch, where a step would take 2 per update x a buffer of 2; each step
    takes what the epoch has left and still updates on it."""
    out = tmp_path / "out"
    run_sft(ppo_config(policy, data, out, reward_model=reward_server, reward_model_type="api", max_samples=4,
                       ppo_buffer_size=2, max_steps=3))
    assert [e["step"] for e in log(out)] == [1, 2, 3]


def test_refusals_before_any_training(policy, data, tmp_path) -> None:
    other = save_chat_model(tmp_path / "other", tokenizer=byte_tokenizer())
    (other / "value_head.safetensors").write_bytes(b"")
    from transformers import PreTrainedTokenizerFast

    small = PreTrainedTokenizerFast.from_pretrained(policy)
    small.add_tokens(["<extra>"])
    small.save_pretrained(other)
    with pytest.raises(ConfigError, match="another tokenizer"):
        run_sft(ppo_config(policy, data, tmp_path / "out", reward_model=str(other), reward_model_type="full"))
    assert not (tmp_path / "out" / "trainer_log.jsonl").exists()
    with pytest.raises(ConfigError, match="needs reward_model"):
        ppo_config(policy, data, tmp_path / "out")
    with pytest.raises(ConfigError, match="http"):
        ppo_config(policy, data, tmp_path / "out", reward_model="saves/rm", reward_model_type="api")
    with pytest.raises(ConfigError, match="not a folder"):
        run_sft(ppo_config(policy, data, tmp_path / "out", reward_model=str(tmp_path / "nothing")))
