"""`peftkit data stats | preview | dedup` on demo rows with planted problems: exact and near duplicates, over-long
rows, malformed rows and Chinese rows. Stats must report exactly what was planted (truncation counted here
independently, from the chat template and a one-token-per-byte tokenizer), and dedup must drop exactly the planted
duplicates."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from helpers import SHARED_DATA, byte_tokenizer

from peftkit.cli import main
from peftkit.data import load_conversations
from peftkit.data.dedup import dedup_dataset
from peftkit.data.report import dataset_stats, dominant_script, preview
from peftkit.errors import ConfigError

MALFORMED = {  # row -> the reason the loader gives
    "missing": ({"instruction": "Name a colour."}, "missing column 'output' (row has: instruction)"),
    "number": ({"instruction": "Add 2 and 3.", "output": 5}, "column 'output' holds int, not text"),
    "null": (None, "not a JSON object (null)"),
    "empty": ({"instruction": "Say nothing.", "output": "  "}, "empty answer"),
}


def _read(name: str) -> list[dict]:
    with open(f"{SHARED_DATA}/{name}.json", encoding="utf-8") as f:
        return json.load(f)


def _words(row: dict) -> int:
    return len(" ".join(row.values()).split())


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tok):
    """A dataset folder with `planted.json` and what was planted where (row numbers from 0, as reports give them)."""
    en = [r for r in _read("alpaca_en_demo")[:120] if len(json.dumps(r)) < 900][:40]
    zh = [r for r in _read("alpaca_zh_demo") if len(json.dumps(r, ensure_ascii=False)) < 200][:3]
    rows: list = [*en, *zh]
    cutoff = max(_length(tok, r) for r in rows) + 16  # no demo row is truncated, only the planted ones
    long_rows = [{"instruction": f"Write out the {kind} list.",
                  "output": " ".join(f"{kind}{k}" for k in range(cutoff // 6 + j * 40))} for j, kind in
                 enumerate(("alpha", "beta"))]
    rows += long_rows
    exact = {len(rows): 0, len(rows) + 1: 0, len(rows) + 2: 7}
    rows += [dict(en[0]), dict(en[0], output="  " + en[0]["output"].replace(" ", "   ") + "\n"), dict(en[7])]
    sources = sorted(range(len(en)), key=lambda i: _words(en[i]))[-2:]  # the longest rows: one word is little
    near = {}
    for i in sources:
        words = en[i]["output"].split(" ")
        words[len(words) // 2] = "zebra"
        near[len(rows)] = i
        rows.append(dict(en[i], output=" ".join(words)))
    malformed = {}
    for row, reason in MALFORMED.values():
        malformed[len(rows)] = reason
        rows.append(row)
    folder = tmp_path_factory.mktemp("data")
    (folder / "planted.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"planted": {"file_name": "planted.json"}}))
    return dict(folder=folder, rows=rows, cutoff=cutoff, exact=exact, near=near, malformed=malformed,
                long=[len(en) + len(zh), len(en) + len(zh) + 1], zh=len(zh))


def _rendered(tok, row: dict) -> str:
    user = "\n".join(t for t in (row["instruction"], row.get("input", "")) if t)
    return tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
                                   tokenize=False)


def _length(tok, row: dict) -> int:
    return len(tok(_rendered(tok, row), add_special_tokens=False)["input_ids"])


def _answer_cut(tok, row: dict, cutoff: int) -> int:
    """Answer tokens (content + <|im_end|>) past cutoff_len, when the prompt is short: truncation keeps the head."""
    text = _rendered(tok, row)
    start = len(tok(text[:text.index(row["output"])], add_special_tokens=False)["input_ids"])
    assert start < cutoff // 2
    answer = len(tok(row["output"], add_special_tokens=False)["input_ids"]) + 1
    return answer - (cutoff - start)


def test_stats_report_exactly_what_was_planted(planted, tok) -> None:
    rows, cutoff = planted["rows"], planted["cutoff"]
    summary = dataset_stats(tok, "planted", planted["folder"], cutoff_len=cutoff).datasets[0]
    got = summary.to_dict()
    valid = [r for i, r in enumerate(rows) if i not in planted["malformed"]]
    assert (got["rows"], got["conversations"], got["tokenized"]) == (len(rows), len(valid), len(valid))
    assert got["skipped"] == len(MALFORMED)
    assert got["reasons"] == {reason: 1 for reason in planted["malformed"].values()}
    assert got["turns"] == {"1": len(valid)}

    lengths = [_length(tok, r) for r in valid]
    assert sorted(summary.lengths) == sorted(lengths)
    assert got["tokens"] == {"min": min(lengths), "median": statistics.median(lengths),
                             "p95": sorted(lengths)[math.ceil(0.95 * len(lengths)) - 1], "max": max(lengths)}
    assert sum(h["rows"] for h in got["histogram"]) == len(valid)
    long_rows = [rows[i] for i in planted["long"]]
    assert got["truncated"] == 2 == sum(n > cutoff for n in lengths)
    assert got["labels_cut"] == sum(_answer_cut(tok, r, cutoff) for r in long_rows) > 0

    assert {row: first for row, first in got["exact_pairs"]} == planted["exact"]
    assert got["exact_duplicates"] == 3
    assert {row: first for row, first, _ in got["near_pairs"]} == planted["near"]
    assert got["near_duplicates"] == 2 and all(j >= 0.85 for *_, j in got["near_pairs"])
    assert got["scripts"] == {"Latin": len(valid) - planted["zh"], "Han": planted["zh"]}

    text = summary.render()
    shown = ", ".join(f"row {row} = row {first}" for row, first in planted["exact"].items())
    assert f"exact duplicates: 3 (e.g. {shown})" in text
    assert f"over cutoff_len {cutoff}: 2 truncated, {got['labels_cut']} answer tokens dropped" in text
    assert "skipped 1x: not a JSON object (null)" in text and "#" * 40 in text


def test_scripts_and_threshold() -> None:
    assert dominant_script("Привет, мир! hi") == "Cyrillic" and dominant_script("こんにちは世界") == "Kana"
    assert dominant_script("한국어 문장 text") == "Hangul" and dominant_script("123 !?") == "none"
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        dedup_dataset("alpaca_en_demo", SHARED_DATA, "unused.json", near=1.5)


def test_dedup_drops_only_the_planted_duplicates(planted, tmp_path) -> None:
    out = tmp_path / "clean" / "deduped.json"
    done = dedup_dataset("planted", planted["folder"], out)
    dropped = set(planted["exact"]) | set(planted["near"])
    assert json.loads(out.read_text(encoding="utf-8")) == [r for i, r in enumerate(planted["rows"]) if i not in dropped]
    assert (done.rows, done.written, done.malformed) == (len(planted["rows"]), len(planted["rows"]) - 5, 4)
    assert json.loads((out.parent / "dataset_info.json").read_text()) == {"deduped": {"file_name": "deduped.json"}}
    convs, report = load_conversations("deduped", out.parent)  # the entry reads back through peftkit's own loader
    assert len(convs) == done.written - len(MALFORMED) and report.datasets["deduped"].skipped == len(MALFORMED)

    # an unregistered messages file: its detected format goes into the entry, and the file keeps its shape
    msgs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("Hi", "Hello."), ("Hi", "Hello."), ("2+2?", "4"))]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    done = dedup_dataset(str(src), tmp_path, tmp_path / "chat_clean.jsonl", name="chat")
    assert [json.loads(line) for line in (tmp_path / "chat_clean.jsonl").read_text().splitlines()] == [msgs[0], msgs[2]]
    assert done.entry == {"file_name": "chat_clean.jsonl", "formatting": "openai", "columns": {"messages": "messages"}}
    assert len(load_conversations("chat", tmp_path)[0]) == 2
    with pytest.raises(ConfigError, match="dataset's own files"):
        dedup_dataset(str(src), tmp_path, src)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return str(folder)


def test_cli_stats_preview_dedup(planted, tok, tok_dir, tmp_path, capsys) -> None:
    common = ["planted", "--dataset-dir", str(planted["folder"]), "--model", tok_dir]
    cutoff = ["--cutoff-len", str(planted["cutoff"])]
    assert main(["data", "stats", *common, *cutoff, "--json"]) == 0
    expected = dataset_stats(tok, "planted", planted["folder"], cutoff_len=planted["cutoff"]).to_dict()
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["data", "stats", *common, *cutoff]) == 0
    assert "near duplicates: 2" in capsys.readouterr().out

    assert main(["data", "preview", *common, "-n", "2"]) == 0
    out = capsys.readouterr().out
    first = planted["rows"][0]
    assert out.count("--- planted, row ") == 2 and out.startswith("--- planted, row 0: ")
    assert f"[[{first['output']}<|im_end|>]]" in out  # the answer and its end token are trained, nothing else
    assert out.count("[[") == 2 and "[[" not in _rendered(tok, first)
    assert preview(tok, "planted", planted["folder"], n=1, color=True)[0].count("\033[1;32m") == 1
    head = preview(tok, "planted", planted["folder"], n=1, cutoff_len=40)[0].splitlines()[0]
    assert head.startswith("--- planted, row 0: 40 tokens") and "truncated to cutoff_len" in head

    out_file = tmp_path / "d.json"
    assert main(["data", "dedup", "planted", "--dataset-dir", str(planted["folder"]), "--output", str(out_file),
                 "--name", "clean", "--near", "1.0"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"Wrote {len(planted['rows']) - 3} of {len(planted['rows'])} rows")
    assert "dropped 3 exact and 0 near duplicates; 4 malformed rows kept" in line and "dataset: clean" in line


@pytest.mark.parametrize("argv, message", [
    (["stats", "nope"], "Dataset 'nope' is neither in"),
    (["stats", "planted", "--template", "chatmll"], "Unknown --template 'chatmll'. Did you mean 'chatml'?"),
    (["preview", "planted", "-n", "0"], "-n must be at least 1"),
    (["stats", "planted", "--cutoff-len", "1"], "--cutoff-len must be at least 2"),
    (["dedup", "planted", "--output", "out.txt"], "must be a .json or .jsonl file"),
])
def test_cli_errors_are_one_line(planted, tok_dir, capsys, argv, message) -> None:
    model = [] if argv[0] == "dedup" else ["--model", tok_dir]
    assert main(["data", *argv, "--dataset-dir", str(planted["folder"]), *model]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
