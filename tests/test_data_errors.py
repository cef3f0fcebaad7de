"""Bad data files give one-line errors or counted skips, never tracebacks; truncation is counted and reported."""

from __future__ import annotations

import codecs
import json
import logging
import re

import pytest
from test_data import write_json
from test_templates import smollm2_tokenizer

from peftkit import ConfigError
from peftkit.data import IGNORE_INDEX, DataReport, build_sft_dataset, encode, get_template, load_conversations

ROWS = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Café?", "input": "one word", "output": "Oui."}]
MESSAGES = [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
            [{"role": "user", "content": "Café?\none word"}, {"role": "assistant", "content": "Oui."}]]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def csv_text(rows: list[dict]) -> str:
    return "instruction,input,output\r\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\r\n" for r in rows)


FILES = {
    "rows.json": lambda: json.dumps(ROWS, ensure_ascii=False),
    "rows.jsonl": lambda: "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n",
    "rows.csv": lambda: csv_text(ROWS),
}


@pytest.mark.parametrize("name", list(FILES))
def test_non_utf8_file_names_the_byte(tmp_path, name) -> None:
    data = FILES[name]().replace("Café", "Caf\udce9").encode("utf-8", "surrogateescape")  # Latin-1 é: byte 0xe9
    offset = data.index(b"\xe9")
    assert offset > 20  # on the second row, not at the start
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_conversations(str(tmp_path / name), str(tmp_path))
    message = str(e.value)
    assert str(tmp_path / name) in message and f"0xe9 at byte offset {offset} (line " in message
    assert message.endswith("re-save the file as UTF-8.") and "\n" not in message


def test_non_utf8_dataset_info(tmp_path) -> None:
    (tmp_path / "dataset_info.json").write_bytes(b'{"caf\xe9": {"file_name": "x.json"}}')
    with pytest.raises(ConfigError, match=r"dataset_info.json is not UTF-8: byte 0xe9 at byte offset 5 \(line 1\)"):
        load_conversations("x", str(tmp_path))


@pytest.mark.parametrize("name", list(FILES))
def test_utf8_bom_is_accepted(tmp_path, name) -> None:
    (tmp_path / name).write_bytes(codecs.BOM_UTF8 + FILES[name]().encode("utf-8"))
    convs, report = load_conversations(name, str(tmp_path))  # unregistered: the format comes from the column names
    assert [c.messages for c in convs] == MESSAGES and report.datasets[name].skipped == 0


def test_non_object_rows_are_skipped_and_every_reason_counted(tmp_path, caplog) -> None:
    good = {"instruction": "Hi", "output": "Hello"}
    rows = [None, good, None, 5, "text", [good], {"instruction": "Hi"}, 2.5, good]
    write_json(tmp_path / "mixed.json", rows)
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        convs, report = load_conversations("mixed.json", str(tmp_path))  # detected from the first object, row 1
    stats = report.datasets["mixed.json"]
    assert [c.row for c in convs] == [1, 8] and (stats.rows, stats.loaded, stats.skipped) == (9, 2, 7)
    assert stats.reasons == {"not a JSON object (null)": 2, "not a JSON object (number)": 2,
                             "not a JSON object (string)": 1, "not a JSON object (array)": 1,
                             "missing column 'output' (row has: instruction)": 1}
    summary = ("skipped 7 of 9 rows (2x not a JSON object (null); 2x not a JSON object (number); "
               "1x not a JSON object (string); 1x not a JSON object (array); "
               "1x missing column 'output' (row has: instruction)). "
               "First: row 0: not a JSON object (null) | row 2: not a JSON object (null) | "
               "row 3: not a JSON object (number)")
    assert summary in caplog.text

    (tmp_path / "mixed.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\nnull\n\n[]\n', encoding="utf-8")
    convs, report = load_conversations("mixed.jsonl", str(tmp_path))
    assert len(convs) == 1 and report.datasets["mixed.jsonl"].reasons == {"not a JSON object (null)": 1,
                                                                         "not a JSON object (array)": 1}


@pytest.mark.parametrize("text, found", [("5", "number"), ('"hello"\n', "string"), ("[null, 1]", "null, number"),
                                         ("null\nnull\n", "null")])
def test_file_without_objects_is_refused(tmp_path, text, found) -> None:
    (tmp_path / "bad.json").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"bad.json holds no JSON object (only {found}); it must hold a "
                                                    "JSON array of objects, or one JSON object per line.")):
        load_conversations("bad.json", str(tmp_path))


def test_truncation_is_counted_and_reported(tok, tmp_path, caplog) -> None:
    rows = [{"instruction": "Hi", "output": "Hello."},  # fits
            {"instruction": "Talk.", "output": "la " * 100},  # the answer is cut
            {"instruction": "filler " * 100 + "What is 2+2?", "output": "Four."},  # only the prompt is cut
            {"instruction": "Count.", "output": " ".join(map(str, range(60)))}]  # the answer is cut
    write_json(tmp_path / "talk.json", rows)
    write_json(tmp_path / "dataset_info.json", {"talk": {"file_name": "talk.json"}})
    kw = dict(template="chatml", cache_dir=str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="peftkit.data")
    train, _ = build_sft_dataset(tok, "talk", str(tmp_path), cutoff_len=32, **kw)

    convs, _ = load_conversations("talk", str(tmp_path))
    full = [encode(c, get_template("chatml", tok), tok, cutoff_len=10**6)[0] for c in convs]
    trained = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in full]
    kept = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in train]
    assert [len(e["input_ids"]) > 32 for e in full] == [False, True, True, True]
    assert kept[0] == trained[0] and kept[2] == trained[2] and kept[1] < trained[1] and kept[3] < trained[3]
    lost = sum(trained) - sum(kept)
    line = f"talk: 4 rows, 4 conversations, 4 examples (3 truncated, {lost} answer tokens cut)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and line in warnings[0] and "Raise cutoff_len" in warnings[0]

    caplog.clear()
    build_sft_dataset(tok, "talk", str(tmp_path), cutoff_len=32, **kw)  # the report comes back from the cache
    assert "from cache" in caplog.text and line in caplog.text
    caplog.clear()
    build_sft_dataset(tok, "talk", str(tmp_path), cutoff_len=1024, **kw)
    assert "talk: 4 rows, 4 conversations, 4 examples (0 truncated)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_report_from_older_cache() -> None:
    old = {"datasets": {"a": {"name": "a", "rows": 3, "loaded": 3, "tokenized": 3, "truncated": 1, "skipped": 0,
                              "reasons": {}, "first_skips": [], "from_the_future": 1}}}
    stats = DataReport.from_dict(old).datasets["a"]
    assert (stats.truncated, stats.labels_cut) == (1, 0)
