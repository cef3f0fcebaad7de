"""stage: kd on tiny models: each kd_loss against torch's own KL on the same logits, top-k with k = the vocabulary,
a student that learns the teacher's distributions better than SFT alone, and refusals before any work."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import byte_tokenizer, save_chat_model
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
    tokenizer = byte_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return student, root / "teacher"


def kd_config(student: Path, teacher: Path, out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(student), teacher_model_name_or_path=str(teacher), stage="kd",
                dataset="identity", dataset_dir=str(data), output_dir=str(out), cutoff_len=128, max_steps=4,
                per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, seed=0, bf16=False,
                lora_target="all", overwrite_cache=True)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def held_out_kl(student_dir: Path, adapter: Path, teacher_dir: Path, data: Path) -> float:
    """Mean forward KL(teacher || student) per answer token on the last 16 identity rows (held out)."""
    from peftkit import TunedModel
    from peftkit.data import SFTCollator, build_sft_dataset

    tok = byte_tokenizer()
    rows, _ = build_sft_dataset(tok, "identity", str(data), cutoff_len=128, cache_dir=str(adapter / "cache"))
    batch = SFTCollator(0)(rows[-16:])
    student = TunedModel.load(LlamaForCausalLM.from_pretrained(student_dir), adapter).eval()
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    return distillation_loss(s[counted], t[counted]).mean().item()


def test_kd_student_learns_the_teacher_better_than_sft(models, tmp_path) -> None:
    student, teacher = models
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    kls = {}
    for name, alpha in (("sft", 0.0), ("kd", 0.5)):
        out = tmp_path / name
        run_sft(kd_config(student, teacher, out, data, kd_alpha=alpha, max_steps=12, max_samples=64))
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
