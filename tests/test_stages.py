"""Stages beyond SFT on tiny models: pt, rm, dpo (every pref_loss), kto. Their data (LLaMA-Factory's dataset_info.json
shapes and the errors for data that does not fit a stage), what each run logs and writes, the reference model, the
reward model's value head through checkpoints and `peftkit.RewardModel`, and refusals before any work."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, byte_tokenizer, save_chat_model
from safetensors.torch import load_file

from peftkit import RewardModel
from peftkit.cli import main
from peftkit.config import TrainConfig
from peftkit.data import IGNORE_INDEX, build_dataset, load_conversations
from peftkit.errors import ConfigError
from peftkit.precision import base_dtype
from peftkit.train import run_sft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("chat_model") / "m")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """The repo's example sets and LLaMA-Factory's dpo_en_demo / c4_demo, registered together."""
    folder = tmp_path / "data"
    shutil.copytree(EXAMPLES, folder)
    info = json.loads((folder / "dataset_info.json").read_text())
    shared = json.loads((Path(SHARED_DATA) / "dataset_info.json").read_text())
    for name in ("dpo_en_demo", "c4_demo"):
        shutil.copy(Path(SHARED_DATA) / shared[name]["file_name"], folder / shared[name]["file_name"])
        info[name] = shared[name]
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def config(model_dir: Path, data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(model_dir), dataset_dir=str(data_dir), output_dir=str(out), cutoff_len=96,
                per_device_train_batch_size=4, learning_rate=5e-3, max_steps=4, logging_steps=1, seed=0,
                overwrite_cache=True, lora_target="all")
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


# --- data ---
def test_preference_rows_in_every_layout(tmp_path) -> None:
    rows = {
        "alpaca": [{"instruction": "Name a colour", "input": "one word", "chosen": "Blue", "rejected": "Seven"}],
        "sharegpt": [{"conversations": [{"from": "human", "value": "Name a colour"}],
                      "chosen": {"from": "gpt", "value": "Blue"}, "rejected": {"from": "gpt", "value": "Seven"}}],
        "openai": [{"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Name a colour"}],
                    "chosen": {"role": "assistant", "content": "Blue"},
                    "rejected": {"role": "assistant", "content": "Seven"}}],
    }
    info = {
        "alpaca": {"file_name": "alpaca.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "sharegpt": {"file_name": "sharegpt.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "openai": {"file_name": "openai.json", "ranking": True, "formatting": "openai",
                   "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}},
    }
    for name, r in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    convs, _ = load_conversations("alpaca,sharegpt,openai", str(tmp_path), kind="pairs", stage="dpo")
    assert [c.messages[-1]["content"] for c in convs] == ["Blue"] * 3
    assert [c.rejected["content"] for c in convs] == ["Seven"] * 3
    assert convs[0].messages[0] == {"role": "user", "content": "Name a colour\none word"}
    assert convs[2].messages[0] == {"role": "system", "content": "Be brief."}
    train, _ = build_dataset(byte_tokenizer(), "openai", str(tmp_path), kind="pairs", cutoff_len=64,
                             cache_dir=str(tmp_path / "cache"))
    ex = train[0]
    tok = byte_tokenizer()
    chosen = [t for t, label in zip(ex["chosen_ids"], ex["chosen_labels"]) if label != IGNORE_INDEX]
    rejected = [t for t, label in zip(ex["rejected_ids"], ex["rejected_labels"]) if label != IGNORE_INDEX]
    assert tok.decode(chosen).startswith("Blue") and tok.decode(rejected).startswith("Seven")
    # the prompt is the same tokens on both sides; only the last answer is labelled
    n = ex["chosen_labels"].index(next(x for x in ex["chosen_labels"] if x != IGNORE_INDEX))
    assert ex["chosen_ids"][:n] == ex["rejected_ids"][:n]


def test_bad_preference_and_kto_rows_are_skipped_and_named(tmp_path, caplog) -> None:
    pairs = [{"instruction": "q", "chosen": "a", "rejected": "b"},
             {"instruction": "q", "chosen": "", "rejected": "b"},
             {"instruction": "q", "chosen": "same", "rejected": "same "},
             {"instruction": "q", "chosen": "a"}]
    kto = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "maybe"},
           {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "label": "false"}]
    (tmp_path / "p.json").write_text(json.dumps(pairs))
    (tmp_path / "k.json").write_text(json.dumps(kto))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "p": {"file_name": "p.json", "ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen",
                                                                   "rejected": "rejected"}},
        "k": {"file_name": "k.json", "formatting": "openai", "columns": {"messages": "messages", "kto_tag": "label"}},
    }))
    with caplog.at_level("WARNING"):
        convs, report = load_conversations("p", str(tmp_path), kind="pairs", stage="dpo")
    assert len(convs) == 1 and report.datasets["p"].skipped == 3
    text = caplog.text
    assert "row 1: empty chosen answer" in text and "row 2: chosen and rejected answers are identical" in text
    assert "row 3: missing column 'rejected'" in text
    caplog.clear()
    with caplog.at_level("WARNING"):
        convs, report = load_conversations("k", str(tmp_path), kind="kto", stage="kto")
    assert [c.kto_tag for c in convs] == [True, False]
    assert "row 1: missing kto_tag column 'label'" in caplog.text
    assert "row 2: kto_tag column 'label' holds 'maybe'" in caplog.text
    (tmp_path / "p.json").write_text(json.dumps(pairs[1:]))
    with pytest.raises(ConfigError, match="Dataset 'p' has no usable rows.*empty chosen answer"):
        load_conversations("p", str(tmp_path), kind="pairs", stage="dpo")


def test_datasets_that_do_not_fit_the_stage_are_refused_before_any_work(model_dir, data_dir, tmp_path,
                                                                        capsys) -> None:
    cases = [("dpo", "c4_demo", "Dataset 'c4_demo' has no chosen/rejected answers, which stage 'dpo' trains on"),
             ("rm", "identity", "Dataset 'identity' has no chosen/rejected answers, which stage 'rm' trains on"),
             ("sft", "dpo_en_demo", "Dataset 'dpo_en_demo' is a ranking (preference) dataset"),
             ("pt", "identity_pairs", "Dataset 'identity_pairs' is a preference dataset (ranking: true); stage 'pt'"),
             ("kto", "identity_pairs", "Dataset 'identity_pairs' has no kto_tag column, which stage 'kto' needs"),
             ("kto", "identity", "Dataset 'identity' has no kto_tag column, which stage 'kto' needs"),
             ("sft", "lumen_labs", "Dataset 'lumen_labs' is plain text"),
             ("sft", "identity_kto", "Dataset 'identity_kto' is a KTO dataset")]
    for stage, dataset, message in cases:
        out = tmp_path / f"out_{stage}_{dataset}"
        code = main(["train", f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", f"dataset={dataset}",
                     f"stage={stage}", f"output_dir={out}", "max_steps=1"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and message in err and len(err.splitlines()) == 1, (stage, dataset, err)
        assert not out.exists()
    # a separate reference model with another tokenizer: refused before anything is loaded or written
    other = tmp_path / "other_model"
    save_chat_model(other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    capsys.readouterr()
    out = tmp_path / "out_ref"
    code = main(["train", f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", "dataset=identity_pairs",
                 "stage=dpo", f"ref_model={other}", f"output_dir={out}", "max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and f"ref_model '{other}' has another tokenizer" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_text_is_joined_with_eos_and_cut_into_blocks(tmp_path) -> None:
    tok = byte_tokenizer()
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n\n")
    info = {"t": {"file_name": "t.txt", "columns": {"prompt": "text"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    stream = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    blocks, _ = build_dataset(tok, "t", str(tmp_path), kind="text", cutoff_len=8, packing=True,
                              cache_dir=str(tmp_path / "c"))
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 8] for i in range(0, len(stream) - 7, 8)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    one_each, _ = build_dataset(tok, "t", str(tmp_path), kind="text", cutoff_len=8, packing=False,
                                cache_dir=str(tmp_path / "c"))
    assert [r["input_ids"] for r in one_each] == [(tok(d)["input_ids"] + [tok.eos_token_id])[:8] for d in docs]
    # an unregistered .txt file reads the same way
    again, _ = build_dataset(tok, str(tmp_path / "t.txt"), str(tmp_path), kind="text", cutoff_len=8, packing=True,
                             cache_dir=str(tmp_path / "c2"))
    assert again == blocks


# --- runs ---
def test_pt_logs_perplexity_and_packs_by_default(model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "pt"
    cfg = config(model_dir, data_dir, out, stage="pt", dataset="lumen_labs", val_size=2, eval_strategy="steps",
                 eval_steps=2)
    assert cfg.packing is True  # LLaMA-Factory packs pretraining text unless told otherwise
    run_sft(cfg)
    evals = [e for e in log_of(out) if "eval_loss" in e]
    assert len(evals) == 2
    for e in evals:
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-4)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.parametrize("pref_loss", ["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"])
def test_dpo_runs_every_pref_loss_and_logs_trl_metrics(model_dir, data_dir, tmp_path, pref_loss) -> None:
    out = tmp_path / pref_loss
    run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", pref_loss=pref_loss, val_size=8,
                   eval_strategy="steps", eval_steps=4, plot_loss=True, pref_ftx=0.1 if pref_loss == "hinge" else 0.0))
    log = log_of(out)
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}
    assert names <= set(log[0]) and {f"eval_{n}" for n in names} <= set(log[-1])
    first = log[0]
    if pref_loss not in ("orpo", "simpo"):  # before the first update the policy is the reference, to the bit
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
        assert first["rewards/accuracies"] == 0.0
    if pref_loss == "sigmoid":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"], abs=1e-5)
    assert (out / "training_rewards_accuracies.png").is_file()
    config_file = json.loads((out / "adapter_config.json").read_text())
    assert config_file["peft_type"] == "LORA"  # a DPO'd LoRA is an ordinary PEFT LoRA


def test_dpo_full_finetuning_compares_with_a_separate_reference(model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "full"
    run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", finetuning_type="full",
                   learning_rate=1e-3))
    log = log_of(out)
    assert log[0]["rewards/chosen"] == 0.0 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[-1]["rewards/margins"] != 0.0  # the policy moved away from its frozen copy
    # ref_model: an explicit reference (here the same model) gives the same first step
    out2 = tmp_path / "ref"
    run_sft(config(model_dir, data_dir, out2, stage="dpo", dataset="identity_pairs", ref_model=str(model_dir),
                   max_steps=1))
    assert log_of(out2)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_padded_and_padding_free_dpo_agree(model_dir, data_dir, tmp_path) -> None:
    logs = []
    for padding_free in (True, False):
        out = tmp_path / f"pf{padding_free}"
        run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", padding_free=padding_free,
                       bf16=False, max_steps=3))
        logs.append(log_of(out))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_kto_runs_with_its_reference_point(model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "kto"
    run_sft(config(model_dir, data_dir, out, stage="kto", dataset="identity_kto", kto_rejected_weight=1.5,
                   val_size=8, eval_strategy="steps", eval_steps=4))
    log = log_of(out)
    # before the first update: each desirable example's loss is 1 - sigmoid(0) = 0.5, each undesirable one 1.5 x 0.5
    assert 0.5 <= log[0]["loss"] <= 0.75 and (log[0]["loss"] - 0.5) % 0.0625 == pytest.approx(0.0, abs=1e-6)
    assert log[0]["kl"] == 0.0 and log[0]["rewards/chosen"] == 0.0
    assert {"kl", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"} <= set(log[0])
    assert {"eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"} <= set(log[-1])
    assert log[-1]["eval_rewards/margins"] == pytest.approx(
        log[-1]["eval_rewards/chosen"] - log[-1]["eval_rewards/rejected"], abs=1e-5)


def test_reward_model_trains_saves_its_value_head_and_scores(model_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "rm"
    run_sft(config(model_dir, data_dir, out, stage="rm", dataset="identity_pairs", max_steps=12, val_size=8,
                   eval_strategy="steps", eval_steps=12, bf16=False, cutoff_len=256))
    log = log_of(out)
    assert {"rewards/accuracies", "accuracy", "rewards/margins"} <= set(log[0])
    assert "eval_rewards/accuracies" in log[-1]
    head = load_file(out / "value_head.safetensors")
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}
    assert head["v_head.summary.weight"].shape == (1, 32)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"

    rm = RewardModel.load(out)
    pair = json.loads((data_dir / "identity_pairs.json").read_text())[0]
    user = {"role": "user", "content": pair["instruction"]}
    chosen, rejected = rm([[user, {"role": "assistant", "content": pair["chosen"]}],
                           [user, {"role": "assistant", "content": pair["rejected"]}]])
    assert chosen > rejected  # it learnt the preference
    assert rm([user, {"role": "assistant", "content": pair["chosen"]}]) == pytest.approx([chosen], abs=1e-5)
    assert len(rm(["plain text", "more text"])) == 2


def test_reward_model_resumes_exactly(model_dir, data_dir, tmp_path) -> None:
    """The value head is part of the checkpoint: a run killed after step 2 and resumed ends where the whole run
    ends."""
    whole = tmp_path / "whole"
    run_sft(config(model_dir, data_dir, whole, stage="rm", dataset="identity_pairs", bf16=False, save_steps=2))
    part = tmp_path / "part"
    run_sft(config(model_dir, data_dir, part, stage="rm", dataset="identity_pairs", bf16=False, save_steps=2))
    for d in part.iterdir():  # keep only checkpoint-2, as if the run died after it
        if d.name != "checkpoint-2":
            shutil.rmtree(d) if d.is_dir() else d.unlink()
    assert (part / "checkpoint-2" / "objective_state.safetensors").is_file()
    run_sft(config(model_dir, data_dir, part, stage="rm", dataset="identity_pairs", bf16=False, save_steps=2,
                   resume_from_checkpoint=True))
    a, b = load_file(whole / "value_head.safetensors"), load_file(part / "value_head.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k])
    assert [e["loss"] for e in log_of(whole)] == [e["loss"] for e in log_of(part)]


@pytest.mark.parametrize("method", ["adalora", "adapter", "bitfit", "freeze", "ia3", "lora_drop", "p_tuning",
                                    "p_tuning_v2", "prefix_tuning", "prompt_tuning", "ssf", "qlora"])
def test_every_method_trains_with_dpo(model_dir, data_dir, tmp_path, method) -> None:
    """The stage never knows the method: each one trains a few DPO steps, with the adapter-disabled reference (or,
    for freeze, a separate frozen copy). Methods whose fresh adapter leaves the model unchanged start at ln 2."""
    extra = {"quantization_bit": 4} if method == "qlora" else {}
    finetuning_type = "lora" if method == "qlora" else method
    if method == "lora_drop":
        extra["lora_drop_steps"] = 2
    out = tmp_path / method
    run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", finetuning_type=finetuning_type,
                   max_steps=2, lora_target="all" if finetuning_type in ("lora", "adalora", "lora_drop") else None,
                   **extra))
    log = [e for e in log_of(out) if "loss" in e]
    assert len(log) == 2 and all(math.isfinite(e["loss"]) and "rewards/accuracies" in e for e in log)
    # freeze on a bf16 base runs its trained layers in fp32 (methods/freeze.py) and its separate reference in bf16:
    # their log-probs differ by bf16 rounding (1.7e-4 on this loss seen); elsewhere policy and reference are exact
    bf16_freeze = method == "freeze" and base_dtype(None, False, "cpu") == torch.bfloat16
    if method not in ("p_tuning", "p_tuning_v2", "prefix_tuning", "prompt_tuning"):  # virtual tokens change outputs
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3 if bf16_freeze else 1e-6), method


def test_a_dpo_adapter_is_an_ordinary_peft_lora(model_dir, data_dir, tmp_path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    from peftkit import TunedModel

    out = tmp_path / "dpo"
    run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", bf16=False, max_steps=3))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    ours = TunedModel.load(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 and (a - base).abs().max() > 1e-4  # it loads, and DPO moved it


def test_kto_with_a_batch_of_one_warns_about_its_reference_point() -> None:
    with pytest.warns(UserWarning, match="with a batch of 1 that is a single pair"):
        TrainConfig(model_name_or_path="m", dataset="d", stage="kto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(model_name_or_path="m", dataset="d", stage="kto", per_device_train_batch_size=4,
                    per_device_eval_batch_size=4)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_preference_stages_in_both_dtypes(model_dir, data_dir, tmp_path, monkeypatch, dtype) -> None:
    """PEFTKIT_DTYPE forces the dtype this CPU would not pick: in both, the first DPO loss is ln 2 and the first KTO
    loss sits on its 0.5 grid (policy = reference to the bit), and the runs stay finite."""
    monkeypatch.setenv("PEFTKIT_DTYPE", dtype)
    out = tmp_path / "dpo"
    run_sft(config(model_dir, data_dir, out, stage="dpo", dataset="identity_pairs", max_steps=2))
    log = log_of(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(log[-1]["loss"])
    out = tmp_path / "kto"
    run_sft(config(model_dir, data_dir, out, stage="kto", dataset="identity_kto", max_steps=2))
    assert log_of(out)[0]["loss"] == pytest.approx(0.5, abs=1e-6)
