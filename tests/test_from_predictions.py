"""Sequence-level distillation: predict's rows carry their messages; from-predictions makes them an alpaca dataset
that peftkit reads back as the same conversations with the teacher's answers, and an SFT run trains on it."""

from __future__ import annotations

import json

import pytest
from helpers import save_chat_model

from peftkit.cli import main
from peftkit.data import load_conversations, predictions_to_alpaca
from peftkit.errors import ConfigError

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}]
PREDICTIONS = [
    {"prompt": "<templated>", "predict": "6, of course.", "label": "6", "messages": [SYSTEM, *TURNS]},
    {"prompt": "<templated>", "predict": "Paris", "label": "Paris",
     "messages": [{"role": "user", "content": "Capital of France?"}]},
    {"prompt": "<templated>", "predict": " \n", "label": "x", "messages": [{"role": "user", "content": "Say x"}]},
    {"prompt": "<templated>", "predict": "call", "label": "call", "tools": '[{"name": "f"}]',
     "messages": [{"role": "user", "content": "Use f"}]},
]
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_and_entry_exactly(tmp_path, capsys) -> None:
    pred, data = tmp_path / "generated_predictions.jsonl", tmp_path / "data"
    write_jsonl(pred, PREDICTIONS)
    data.mkdir()
    other = {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}, "distilled": {"file_name": "old.json"}}
    (data / "dataset_info.json").write_text(json.dumps(other))

    done = predictions_to_alpaca(pred, data / "distilled.json")
    path, entry = done.path, done.entry
    assert path == data / "distilled.json"
    assert json.loads(path.read_text()) == [
        {"instruction": "And 3+3?", "input": "", "output": "6, of course.", "system": "You are terse.",
         "history": [["Hi", "Hello."], ["2+2?", "4"]]},
        {"instruction": "Capital of France?", "input": "", "output": "Paris", "system": "", "history": []},
    ]
    assert entry == {"file_name": "distilled.json", "columns": COLUMNS}
    registry = json.loads((data / "dataset_info.json").read_text())
    assert registry == {"alpaca_en_demo": other["alpaca_en_demo"], "distilled": entry}  # kept, and replaced

    # the CLI: one line with the counts and what to put in a training YAML; --name picks the entry
    assert main(["data", "from-predictions", str(pred), "--output", str(data / "d2.json"), "--name", "teacher"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "Wrote 2 rows" in out[0] and "skipped 2" in out[0]
    assert "1 empty predict" in out[0] and "need sharegpt" in out[0]
    assert f"dataset: teacher, dataset_dir: {data}" in out[0]
    assert set(json.loads((data / "dataset_info.json").read_text())) == {"alpaca_en_demo", "distilled", "teacher"}

    # round trip: peftkit's own reader gives back the prompt's messages with the teacher's answer last
    convs, _ = load_conversations("distilled", str(data))
    assert [c.messages for c in convs] == [
        [SYSTEM, *TURNS, {"role": "assistant", "content": "6, of course."}],
        [PREDICTIONS[1]["messages"][0], {"role": "assistant", "content": "Paris"}],
    ]


def test_a_file_without_messages_is_refused_in_one_line(tmp_path, capsys) -> None:
    pred = tmp_path / "generated_predictions.jsonl"
    write_jsonl(pred, [{"prompt": "p", "predict": "a", "label": "b"}])  # LLaMA-Factory's layout
    with pytest.raises(ConfigError, match=r"written by `peftkit predict`"):
        predictions_to_alpaca(pred, tmp_path / "d.json")
    assert main(["data", "from-predictions", str(pred), "--output", str(tmp_path / "d.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "messages" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "dataset_info.json").exists()
    write_jsonl(pred, [PREDICTIONS[2]])  # every row skipped: an error, not an empty dataset
    with pytest.raises(ConfigError, match="1 empty predict"):
        predictions_to_alpaca(pred, tmp_path / "d.json")


def test_teacher_predict_then_student_sft(tmp_path) -> None:
    """predict (rows carry their messages) -> from-predictions -> a 2-step SFT run on the teacher's answers."""
    model = save_chat_model(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue", "system": "Be brief.",
             "history": [["Hi", "Hello"]]},
            {"instruction": "Count to three.", "input": "", "output": "1 2 3"}]
    (data / "qa.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "qa.json", "columns": COLUMNS}}))
    common = [f"model_name_or_path={model}", f"dataset_dir={data}"]
    assert main(["predict", "/dev/null", *common, "eval_dataset=qa", "max_new_tokens=6",
                 f"output_dir={tmp_path / 'pred'}"]) == 0
    lines = (tmp_path / "pred" / "generated_predictions.jsonl").read_text().splitlines()
    predicted = [json.loads(line) for line in lines]
    originals, _ = load_conversations("qa", str(data))
    for row, conv in zip(predicted, originals, strict=True):
        assert list(row)[:3] == ["prompt", "predict", "label"] and "tools" not in row
        assert row["messages"] == conv.messages[:-1] and row["label"] == conv.messages[-1]["content"]
    kept = [(row, conv) for row, conv in zip(predicted, originals) if row["predict"].strip()]
    assert kept, "the random teacher answered nothing; change its seed"

    student_data = tmp_path / "student"
    assert main(["data", "from-predictions", str(tmp_path / "pred" / "generated_predictions.jsonl"),
                 "--output", str(student_data / "distilled.json")]) == 0
    convs, _ = load_conversations("distilled", str(student_data))
    assert [c.messages for c in convs] == [conv.messages[:-1] + [{"role": "assistant", "content": row["predict"]}]
                                           for row, conv in kept]

    out = tmp_path / "student_run"
    assert main(["train", "/dev/null", f"model_name_or_path={model}", "dataset=distilled",
                 f"dataset_dir={student_data}", "max_steps=2", "logging_steps=1", "learning_rate=1e-3",
                 f"output_dir={out}"]) == 0
    losses = [e["loss"] for e in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
