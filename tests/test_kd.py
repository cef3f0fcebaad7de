"""stage: kd on tiny models: each kd_loss against torch's own KL on the same logits, top-k with k = the vocabulary,
a student that learns the teacher's distributions better than SFT alone, and refusals before any work."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA, byte_tokenizer, save_chat_model
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.cli import main
from peftkit.config import TrainConfig
from peftkit.objectives.kd import distillation_loss
from peftkit.train import run_sft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def logits_pair(rows: int = 6, vocab: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_kd_loss_equals_torch(temperature) -> None:
    student, teacher = logits_pair()
    log_s, log_t = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    t2 = temperature ** 2
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * t2  # KL(teacher || student)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1) * t2  # KL(student || teacher)
    beta = 0.3
    m = (beta * log_t.exp() + (1 - beta) * log_s.exp()).log()
    jsd = (beta * F.kl_div(m, log_t, log_target=True, reduction="none").sum(-1)
           + (1 - beta) * F.kl_div(m, log_s, log_target=True, reduction="none").sum(-1)) * t2
    for kind, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        got = distillation_loss(student, teacher, kind, temperature, jsd_beta=beta)
        assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item()), kind
        full_k = distillation_loss(student, teacher, kind, temperature, jsd_beta=beta, top_k=student.shape[-1])
        assert torch.equal(full_k, got)
    # top-k: both distributions renormalised over the teacher's k most likely ids
    k = 5
    ids = teacher.topk(k, -1).indices
    ls, lt = F.log_softmax(student.gather(-1, ids) / temperature, -1), F.log_softmax(teacher.gather(-1, ids) /
                                                                                       temperature, -1)
    expected = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1) * t2
    got = distillation_loss(student, teacher, "forward_kl", temperature, top_k=k)
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny student and a bigger teacher sharing the byte-level tokenizer."""
    root = tmp_path_factory.mktemp("kd")
    student = save_chat_model(root / "student")
    teacher = save_chat_model(root / "teacher", seed=1, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    return student, teacher


def kd_config(student: Path, teacher: Path, out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(student), teacher_model_name_or_path=str(teacher), stage="kd",
                dataset="identity", dataset_dir=str(data), output_dir=str(out), cutoff_len=128, max_steps=4,
                per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, seed=0, bf16=False,
                lora_target="all", overwrite_cache=True)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def alpaca_split(folder: Path) -> Path:
    """alpaca_en_demo's first 64 rows to train on and 16 others held out, registered as alpaca_train / alpaca_held."""
    rows = json.loads((Path(SHARED_DATA) / "alpaca_en_demo.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows[:64]))
    (folder / "held.json").write_text(json.dumps(rows[-16:]))
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_train": {"file_name": "train.json"},
                                                          "alpaca_held": {"file_name": "held.json"}}))
    return folder


def held_out_kl(student_dir: Path, adapter: Path, teacher_dir: Path, data: Path) -> float:
    """Mean forward KL(teacher || student) per answer token on the 16 held-out alpaca rows."""
    from peftkit import TunedModel
    from peftkit.data import SFTCollator, build_sft_dataset

    tok = byte_tokenizer()
    rows, _ = build_sft_dataset(tok, "alpaca_held", str(data), cutoff_len=128, cache_dir=str(adapter / "cache"))
    batch = SFTCollator(0)(rows)
    student = TunedModel.load(LlamaForCausalLM.from_pretrained(student_dir), adapter).eval()
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    return distillation_loss(s[counted], t[counted]).mean().item()


def test_kd_student_learns_the_teacher_better_than_sft(models, tmp_path) -> None:
    """On held-out alpaca rows, kd (alpha 0.5) ends closer to the teacher than SFT alone after the same steps."""
    student, teacher = models
    data = alpaca_split(tmp_path / "data")
    kls = {}
    for name, alpha in (("sft", 0.0), ("kd", 0.5)):
        out = tmp_path / name
        run_sft(kd_config(student, teacher, out, data, dataset="alpaca_train", kd_alpha=alpha, max_steps=12))
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        assert {"kd_loss", "ce_loss"} <= set(log[0])
        assert json.loads((out / "train_results.json").read_text())["teacher_seconds"] > 0
        kls[name] = held_out_kl(student, out, teacher, data)
    print(kls)
    assert kls["kd"] < kls["sft"]


@pytest.mark.parametrize("kind,dtype", [("reverse_kl", "fp32"), ("jsd", "bf16")])
def test_kd_runs_every_loss_with_top_k(models, tmp_path, monkeypatch, kind, dtype) -> None:
    """Also in both dtypes, whichever this CPU picks: PEFTKIT_DTYPE forces it for student and teacher."""
    monkeypatch.setenv("PEFTKIT_DTYPE", dtype)
    student, teacher = models
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    out = tmp_path / kind
    run_sft(kd_config(student, teacher, out, data, kd_loss=kind, kd_top_k=8, kd_temperature=2.0, max_steps=2,
                      bf16=None))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in log)


def test_kd_refusals_before_any_work(models, tmp_path, capsys) -> None:
    student, teacher = models
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    common = [f"model_name_or_path={student}", f"dataset_dir={EXAMPLES}", "dataset=identity", "stage=kd",
              "max_steps=1"]
    cases = [([f"teacher_model_name_or_path={other}"], f"teacher_model_name_or_path '{other}' has another tokenizer"),
             ([f"teacher_model_name_or_path={teacher}", "kd_top_k=100000"], "kd_top_k=100000 is more than"),
             ([], "stage kd needs teacher_model_name_or_path"),
             ([f"teacher_model_name_or_path={tmp_path / 'missing'}"], "missing")]
    for extra, message in cases:
        out = tmp_path / f"out{len(extra)}{len(message)}"
        assert main(["train", *common, *extra, f"output_dir={out}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and err.startswith("error:"), err
        assert not out.exists() or not any(out.iterdir())


def test_cached_teacher_loss_equals_float16_teacher_log_probs() -> None:
    """The cached path's kd loss is the divergence from the teacher's top-k log-probs rounded to float16 (<= 1e-6),
    and within float16's precision of the uncached loss."""
    from peftkit.data import SFTCollator
    from peftkit.objectives.kd import Kd, divergence
    from peftkit.objectives.teacher_cache import annotate, label_counts

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    student, teacher = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    rows = [{"input_ids": torch.randint(3, 64, (n,)).tolist(), "labels": [-100] * 4 + torch.randint(3, 64, (n - 4,))
             .tolist()} for n in (9, 12, 7)]
    for padding_free in (False, True):
        collate = SFTCollator(0, padding_free=padding_free)
        kd = Kd("jsd", temperature=2.0, top_k=10)
        kd.attach(student, teacher)
        plain = kd.loss(student, collate(rows)).item()
        with tempfile.TemporaryDirectory() as tmp:
            cached_rows = annotate(rows, collate, kd._teacher_topk, Path(tmp) / "t.safetensors",
                                   label_counts(rows, collate), batch_size=2)
        assert kd.teacher_forwards == 3  # one for the plain loss, two batches for the cache
        batch = collate(cached_rows)
        cached = kd.loss(student, batch).item()
        assert kd.teacher_forwards == 3  # the cached loss runs no teacher
        counted = batch["labels"][:, 1:] != -100
        with torch.no_grad():
            s = student(**{k: batch[k] for k in batch if k in ("input_ids", "attention_mask", "position_ids")}
                        ).logits[:, :-1][counted] if not padding_free else None
            t = teacher(input_ids=batch["input_ids"], **({"attention_mask": batch["attention_mask"]}
                        if "attention_mask" in batch else {})).logits[:, :-1][counted] if not padding_free else None
        if s is not None:
            logps, ids = F.log_softmax(t.float(), -1).topk(10, -1)
            expected_kd = divergence(s.gather(-1, ids), logps.half().float(), "jsd", 2.0, 0.5).sum()
            ce = F.cross_entropy(s.float(), batch["labels"][:, 1:][counted], reduction="sum")
            assert abs(cached - (0.5 * expected_kd + 0.5 * ce).item()) <= 1e-6 * max(1.0, abs(cached))
        assert abs(cached - plain) <= 2e-3 * abs(plain), (padding_free, cached, plain)


def test_teacher_cache_runs_the_teacher_once(models, tmp_path, monkeypatch) -> None:
    """Two epochs with kd_cache_teacher: the teacher runs only to fill the cache (counted), the losses match the
    uncached run's to float16 precision, and a rerun finds the cache and runs no teacher at all."""
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    student, teacher = models
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    common = dict(kd_top_k=16, max_steps=0, num_train_epochs=2, max_samples=12, per_device_eval_batch_size=4)
    losses, results = {}, {}
    for name, cache in (("plain", False), ("cached", True), ("rerun", True)):
        out = tmp_path / name
        run_sft(kd_config(student, teacher, out, data, kd_cache_teacher=cache, **common))
        losses[name] = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        results[name] = json.loads((out / "train_results.json").read_text())
    assert len(losses["plain"]) == 6  # 12 rows, batch 4, two epochs
    assert results["plain"]["teacher_forwards"] == 6  # one per step
    assert results["cached"]["teacher_forwards"] == 3  # 12 rows in batches of 4, once, before training
    assert results["rerun"]["teacher_forwards"] == 0
    assert losses["rerun"] == losses["cached"]
    for a, b in zip(losses["cached"], losses["plain"]):
        assert abs(a - b) <= 2e-3 * abs(b), (losses["cached"], losses["plain"])
    assert len(list((tmp_path / "home" / "datasets").glob("teacher-*.safetensors"))) == 1
