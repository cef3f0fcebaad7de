"""Several datasets in one run: mix_strategy / interleave_probs (LLaMA-Factory's keys, datasets' draws), and several
eval sets reported apart (eval_<name>_loss and their mean eval_loss)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, interleave_datasets
from helpers import byte_tokenizer, make_cfg, read_log, run, synthetic_examples, tiny_llama

from peftkit import ConfigError
from peftkit.config import load_config
from peftkit.data import build_dataset
from peftkit.data.mixing import interleave_order, mix
from peftkit.tuned import TunedModel


@pytest.mark.parametrize("lengths,probs,seed", [
    ([30, 50, 20], None, 0), ([30, 50, 20], [0.2, 0.5, 0.3], 42), ([7, 300], [0.9, 0.1], 3),
    ([40, 40, 10], [0.5, 0.0, 0.5], 1), ([1200, 900], [0.5, 0.5], 7),
])
@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
def test_interleave_draws_the_rows_datasets_draws(lengths, probs, seed, strategy) -> None:
    """The same (dataset, row) sequence as `datasets.interleave_datasets`, which LLaMA-Factory mixes with."""
    if strategy == "all_exhausted" and probs and 0.0 in probs:
        with pytest.raises(ConfigError, match="probability 0"):
            interleave_order(lengths, probs, seed, oversample=True)
        return
    parts = [Dataset.from_dict({"d": [d] * n, "r": list(range(n))}) for d, n in enumerate(lengths)]
    theirs = interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=strategy)
    ours = interleave_order(lengths, probs, seed, oversample=strategy == "all_exhausted")
    assert ours == list(zip(theirs["d"], theirs["r"]))


def test_mixed_counts_follow_the_strategy() -> None:
    a, b, c = [f"a{i}" for i in range(100)], [f"b{i}" for i in range(400)], [f"c{i}" for i in range(50)]
    parts = [("a", a), ("b", b), ("c", c)]
    rows, counts = mix(parts, "concat", None, 0)
    assert counts == {"a": 100, "b": 400, "c": 50} and rows == a + b + c

    rows, counts = mix(parts, "interleave_under", None, 0)  # in turn until c runs out: 50 of each
    assert counts == {"a": 50, "b": 50, "c": 50} and rows[:3] == ["a0", "b0", "c0"]
    rows, counts = mix(parts, "interleave_over", None, 0)  # in turn until b has given all: 400 of each
    assert counts == {"a": 400, "b": 400, "c": 400} and Counter(rows)["c7"] == 8  # c repeats 8 times

    probs = [0.2, 0.7, 0.1]
    rows, counts = mix(parts, "interleave_under", probs, 42)
    assert len(rows) == sum(counts.values()) and len(set(rows)) == len(rows)  # undersampling never repeats a row
    exhausted = [name for name, n in counts.items() if n == dict(a=100, b=400, c=50)[name]]
    assert len(exhausted) == 1  # stopped when the first dataset gave its last row
    for name, p in zip("abc", probs):
        assert counts[name] / len(rows) == pytest.approx(p, abs=0.05)
    assert counts == {"a": 100, "b": 296, "c": 41}  # the fixed seed's draws (datasets gives the same)

    rows, counts = mix(parts, "interleave_over", probs, 42)
    assert all(counts[n] >= size for n, size in (("a", 100), ("b", 400), ("c", 50)))  # every row at least once
    assert {r for r in rows} == set(a + b + c)
    for name, p in zip("abc", probs):
        assert counts[name] / len(rows) == pytest.approx(p, abs=0.05)


@pytest.mark.parametrize("probs,message", [
    ("0.5", "has 1 numbers for 2 datasets"),
    ("0.2,0.3,0.5", "has 3 numbers for 2 datasets"),
    ("-0.5,1.5", "must not be negative"),
    ("0.5,0.6", "must sum to 1"),
    ("0.5,half", "must be numbers"),
])
def test_bad_interleave_probs_are_one_line(probs, message) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, ["model_name_or_path=m", "dataset=a,b", "mix_strategy=interleave_under",
                           f"interleave_probs={probs}"])
    assert "\n" not in str(e.value)


def test_probs_with_concat_are_refused() -> None:
    with pytest.raises(ConfigError, match="mix_strategy is concat"):
        load_config(None, ["model_name_or_path=m", "dataset=a,b", "interleave_probs=0.5,0.5"])


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Three small alpaca datasets whose answers name their source, in a dataset_info.json."""
    info = {}
    for name, n in (("math", 40), ("code", 20), ("chat", 60)):
        rows = [{"instruction": f"{name} question {i}", "output": f"{name} answer {i}"} for i in range(n)]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def source_of(tok, example: dict) -> str:
    return tok.decode(example["input_ids"]).split("<|im_start|>assistant\n")[-1].split()[0]


def test_build_dataset_mixes_and_logs_each_datasets_rows(data_dir, tmp_path, caplog) -> None:
    tok = byte_tokenizer()
    kw = dict(cutoff_len=256, cache_dir=str(tmp_path / "cache"), seed=42)
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        train, evals = build_dataset(tok, "math,code,chat", str(data_dir), mix_strategy="interleave_over",
                                     interleave_probs=[0.25, 0.25, 0.5], **kw)
    assert evals is None
    counts = Counter(source_of(tok, e) for e in train)
    expected = Counter(dict(zip(["math", "code", "chat"], [0, 0, 0])))
    for d, _ in interleave_order([40, 20, 60], [0.25, 0.25, 0.5], 42, oversample=True):
        expected[["math", "code", "chat"][d]] += 1
    assert counts == expected
    log = caplog.text
    assert "interleave_over" in log and all(f"{name}: {counts[name]} (" in log for name in counts)
    assert f"; {counts['code']} in training" in log  # the report's per-dataset line says it too
    cached, _ = build_dataset(tok, "math,code,chat", str(data_dir), mix_strategy="interleave_over",
                              interleave_probs=[0.25, 0.25, 0.5], **kw)
    assert cached == train
    under, _ = build_dataset(tok, "math,code,chat", str(data_dir), mix_strategy="interleave_under", **kw)
    assert Counter(source_of(tok, e) for e in under) == {"math": 20, "code": 20, "chat": 20}


def test_eval_sets_by_name_from_eval_dataset_and_val_size(data_dir, tmp_path) -> None:
    tok = byte_tokenizer()
    kw = dict(cutoff_len=256, cache_dir=str(tmp_path / "cache"))
    train, evals = build_dataset(tok, "chat", str(data_dir), eval_dataset="math,code", **kw)
    assert list(evals) == ["math", "code"] and [len(v) for v in evals.values()] == [40, 20]
    assert {source_of(tok, e) for e in evals["code"]} == {"code"}
    again = build_dataset(tok, "chat", str(data_dir), eval_dataset="math,code", **kw)
    assert again == (train, evals)  # several eval sets survive the cache

    train, evals = build_dataset(tok, "math,chat", str(data_dir), val_size=0.25, **kw)
    assert {k: len(v) for k, v in evals.items()} == {"math": 10, "chat": 15}  # a quarter of each
    assert len(train) == 30 + 45 and {source_of(tok, e) for e in evals["chat"]} == {"chat"}
    held = {tuple(e["input_ids"]) for v in evals.values() for e in v}
    assert not held & {tuple(e["input_ids"]) for e in train}

    single, one = build_dataset(tok, "math", str(data_dir), val_size=0.25, **kw)
    assert isinstance(one, list) and len(one) == 10  # one set: a plain list, metrics named eval_loss


def test_trainer_reports_each_eval_set_and_their_mean(tmp_path) -> None:
    cfg = make_cfg(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, plot_loss=True,
                   load_best_model_at_end=True, metric_for_best_model="hard_loss")
    tuned = TunedModel(tiny_llama(), load_config(None, ["model_name_or_path=m"]).method_config())
    sets = {"easy": synthetic_examples(8, seed=1), "hard": synthetic_examples(4, seed=2)}
    trainer, results = run(cfg, synthetic_examples(16), tuned, eval_data=sets)
    evals = [e for e in read_log(cfg) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["eval_loss"] == pytest.approx((e["eval_easy_loss"] + e["eval_hard_loss"]) / 2, abs=2e-6)
        assert {"eval_easy_loss", "eval_hard_loss", "eval_loss"} <= set(e)
    direct = trainer._evaluate_set(sets["hard"])["eval_loss"]
    assert results["eval_hard_loss"] == pytest.approx(direct, abs=1e-6)
    assert results["eval_loss"] == evals[-1]["eval_loss"] and "eval_easy_loss" in results
    assert results["best_eval_loss"] == pytest.approx(min(e["eval_hard_loss"] for e in evals), abs=1e-5)
    assert (Path(cfg.output_dir) / "training_loss.png").stat().st_size > 10_000
