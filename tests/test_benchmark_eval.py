"""`peftkit eval --task`: LLaMA-Factory's multiple-choice benchmark evaluation on planted MMLU / C-Eval / CMMLU files,
every prediction recomputed here by hand from the model's letter logits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, save_chat_model, save_random_lora
from transformers import AutoModelForCausalLM

from peftkit import TunedModel
from peftkit.cli import main
from peftkit.models import load_tokenizer

SYSTEM = {"en": "The following are multiple choice questions (with answers) about {}.\n\n",
          "zh": "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n"}
CUE = {"en": "\nAnswer:", "zh": "\n答案："}
# subject -> (name, category): two subjects in STEM, one in Humanities
SUBJECTS = {"algebra": ("abstract algebra", "STEM"), "physics": ("college physics", "STEM"),
            "law": ("international law", "Humanities")}


def rows(subject: str, split: str, n: int, zh: bool = False) -> list[list[str]]:
    """question, A, B, C, D, answer; varied text (commas and quotes too) so the prompts differ."""
    word = "题" if zh else "question"
    return [[f"{subject} {word} {split} {i}, \"{i * 7 % 5}\"?", f"opt {i}", f"{i + 1}, {i + 2}", "none", f"all {i}",
             "ABCD"[(i * 3 + len(subject)) % 4]] for i in range(n)]


def write_csv(path: Path, header: list[str] | None, body: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(body)


def plant(root: Path, layout: str = "mmlu", subjects: dict = SUBJECTS, n_dev: int = 3, n_test: int = 5) -> dict:
    """task_dir/<layout>/ in the benchmark's own file format; returns {subject: {split: rows}}."""
    folder = root / layout
    folder.mkdir(parents=True)
    (folder / "mapping.json").write_text(json.dumps({k: {"name": n, "category": c} for k, (n, c) in subjects.items()},
                                                    ensure_ascii=False), encoding="utf-8")
    asked = "val" if layout == "ceval" else "test"
    data = {}
    for subject in subjects:
        data[subject] = {"dev": rows(subject, "dev", n_dev, layout != "mmlu"),
                         asked: rows(subject, asked, n_test, layout != "mmlu")}
        for split, body in data[subject].items():
            if layout == "mmlu":  # no header
                write_csv(folder / split / f"{subject}_{split}.csv", None, body)
            elif layout == "ceval":  # id,question,A,B,C,D,answer,explanation
                write_csv(folder / split / f"{subject}_{split}.csv",
                          ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                          [[str(i), *r, "because"] for i, r in enumerate(body)])
            else:  # cmmlu: ,Question,A,B,C,D,Answer with an index column
                write_csv(folder / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                          [[str(i), *r] for i, r in enumerate(body)])
    return data


def example(row: list[str], lang: str) -> str:
    return row[0] + "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row[1:5])) + CUE[lang]


def by_hand(model, tokenizer, data: dict, split: str, n_shot: int, lang: str) -> tuple[dict, dict]:
    """Each question's prediction from the letter logits at the last prompt token, the prompt written out in
    LLaMA-Factory's fewshot format; -> (accuracy per category and Average, predictions per subject)."""
    letters = [tokenizer.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    hits: dict[str, list[bool]] = {"Average": []}
    predictions = {}
    for subject, (name, category) in SUBJECTS.items():
        shots = data[subject]["dev"][:n_shot]
        predictions[subject] = []
        for row in data[subject][split]:
            text = SYSTEM[lang].format(name) + "".join(example(s, lang) + s[5] + "\n\n" for s in shots)
            ids = tokenizer(text + example(row, lang), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                scores = model(input_ids=torch.tensor([ids])).logits[0, -1, letters]
            guess = "ABCD"[int(scores.argmax())]
            predictions[subject].append(guess)
            hits["Average"].append(guess == row[5])
            hits.setdefault(category, []).append(guess == row[5])
    return {k: 100 * sum(v) / len(v) for k, v in hits.items()}, predictions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random byte-level Llama without a chat template (a base model); its weights large enough that its answers
    vary with the question."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    return save_chat_model(tmp_path_factory.mktemp("bench") / "model", tokenizer, seed=0, initializer_range=0.5)


def base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(str(model_dir))


def check(results: dict, expected: dict, predictions: dict) -> None:
    assert results["accuracy"] == expected  # exactly: the same counts, the same division
    assert list(results["accuracy"]) == ["Average", "STEM", "Humanities"]  # LLaMA-Factory's order
    assert {s: [p[str(i)] for i in range(len(p))] for s, p in results["predictions"].items()} == predictions
    assert len({p for ps in predictions.values() for p in ps}) > 1, "a model that always answers alike tests little"


def test_lf_eval_yaml_accuracy_equals_the_letter_logits_by_hand(model_dir, tmp_path, capsys) -> None:
    """LLaMA-Factory's eval YAML as it is (save_dir, batch_size, task mmlu_test, template fewshot)."""
    data = plant(tmp_path / "evaluation")
    out = tmp_path / "out"
    (tmp_path / "eval.yaml").write_text(
        f"model_name_or_path: {model_dir}\nfinetuning_type: lora\ntask: mmlu_test\ntemplate: fewshot\nlang: en\n"
        f"n_shot: 2\nsave_dir: {out}\nbatch_size: 3\ntask_dir: {tmp_path / 'evaluation'}\n")
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    results = json.loads((out / "results.json").read_text())
    expected, predictions = by_hand(*base(model_dir), data, "test", 2, "en")
    check(results, expected, predictions)
    assert results["subjects"]["law"]["total"] == 5 and results["split"] == "test"
    log = (out / "results.log").read_text()
    assert log.splitlines()[0] == f"{'Average':>15}: {expected['Average']:.2f}"
    assert log.strip() in capsys.readouterr().out  # the table, printed


def test_flags_without_a_config_and_an_adapter(model_dir, tmp_path) -> None:
    """`peftkit eval --task mmlu --task-dir DIR --n-shot 1 key=value ...`; a LoRA adapter (B != 0) changes the letter
    logits, and the accuracy follows the adapted model's."""
    data = plant(tmp_path / "tasks")
    save_random_lora(model_dir, tmp_path / "adapter", 0.5)
    out = tmp_path / "out"
    assert main(["eval", "--task", "mmlu", "--task-dir", str(tmp_path / "tasks"), "--n-shot", "1",
                 f"model_name_or_path={model_dir}", f"adapter_name_or_path={tmp_path / 'adapter'}", f"output_dir={out}",
                 "per_device_eval_batch_size=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    model, tokenizer = base(model_dir)
    adapted = TunedModel.load(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter").eval()
    ids = torch.tensor([tokenizer("Question?\nAnswer:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits[0, -1] - model(input_ids=ids).logits[0, -1]).abs().max() > 1e-2
    expected, predictions = by_hand(adapted, tokenizer, data, "test", 1, "en")
    check(results, expected, predictions)


@pytest.mark.parametrize("layout", ["cmmlu", "ceval"])
def test_chinese_benchmark_layouts(model_dir, tmp_path, layout) -> None:
    """CMMLU's files (header ,Question,A,...,Answer; <subject>.csv) and C-Eval's (id,...,explanation; its default
    split is val), prompted in Chinese."""
    data = plant(tmp_path / "evaluation", layout)
    out = tmp_path / "out"
    assert main(["eval", "--task", layout, "--task-dir", str(tmp_path / "evaluation"), "--n-shot", "2", "--lang", "zh",
                 f"model_name_or_path={model_dir}", f"output_dir={out}", "template=fewshot"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    split = "val" if layout == "ceval" else "test"
    assert results["split"] == split
    check(results, *by_hand(*base(model_dir), data, split, 2, "zh"))


def run_error(args: list[str], capsys) -> str:
    assert main(["eval", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_task_folder_and_malformed_rows_are_one_line_errors(model_dir, tmp_path, capsys) -> None:
    common = ["--task-dir", str(tmp_path / "evaluation"), f"model_name_or_path={model_dir}",
              f"output_dir={tmp_path / 'out'}"]
    err = run_error(["--task", "mmlu", *common], capsys)
    assert "mmlu/mapping.json is missing" in err and "task_dir" in err

    plant(tmp_path / "evaluation")
    bad = tmp_path / "evaluation" / "mmlu" / "test" / "law_test.csv"
    write_csv(bad, None, [*rows("law", "test", 2), ["q", "a", "b", "c", "d", "E"]])
    err = run_error(["--task", "mmlu", *common], capsys)
    assert f"{bad} line 3" in err and "'E'" in err

    write_csv(bad, None, [["only", "three", "columns"]])
    err = run_error(["--task", "mmlu", *common], capsys)
    assert f"{bad} line 1: 3 columns" in err

    bad.unlink()
    err = run_error(["--task", "mmlu", *common], capsys)
    assert "No test file for subject 'law'" in err and "law_test.csv" in err
    assert not (tmp_path / "out" / "results.json").exists()  # nothing written before the error


def test_solved_examples_are_dropped_until_the_prompt_fits_cutoff_len(model_dir, tmp_path) -> None:
    """cutoff_len = the longest question alone: no solved example fits beside any question, so every prompt is
    0-shot (as MMLU's own script shortens prompts), and the accuracy is the 0-shot one."""
    data = plant(tmp_path / "evaluation")
    model, tokenizer = base(model_dir)
    longest = max(len(tokenizer(SYSTEM["en"].format(name) + example(row, "en"), add_special_tokens=False)["input_ids"])
                  for subject, (name, _) in SUBJECTS.items() for row in data[subject]["test"])
    out = tmp_path / "out"
    assert main(["eval", "--task", "mmlu", "--task-dir", str(tmp_path / "evaluation"), "--n-shot", "2",
                 f"model_name_or_path={model_dir}", f"output_dir={out}", f"cutoff_len={longest}"]) == 0
    check(json.loads((out / "results.json").read_text()), *by_hand(model, tokenizer, data, "test", 0, "en"))


def test_bf16_accuracy_equals_the_bf16_letter_logits_by_hand(model_dir, tmp_path, monkeypatch) -> None:
    """The base in bf16 (PEFTKIT_DTYPE forces it, whichever dtype this CPU would pick; the other tests keep the
    checkpoint's fp32): the letters follow the bf16 logits. One question per batch: no padding to round apart."""
    monkeypatch.setenv("PEFTKIT_DTYPE", "bf16")
    data = plant(tmp_path / "evaluation")
    out = tmp_path / "out"
    assert main(["eval", "--task", "mmlu", "--task-dir", str(tmp_path / "evaluation"), "--n-shot", "2",
                 f"model_name_or_path={model_dir}", f"output_dir={out}", "template=fewshot",
                 "per_device_eval_batch_size=1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    expected, predictions = by_hand(model, load_tokenizer(str(model_dir)), data, "test", 2, "en")
    check(json.loads((out / "results.json").read_text()), expected, predictions)
