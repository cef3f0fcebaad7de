"""Data sources and formats: dataset_info.json, file types, bad rows, splits, packing and the on-disk cache."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from helpers import SHARED_DATA
from test_templates import smollm2_tokenizer

from peftkit import ConfigError
from peftkit.data import IGNORE_INDEX, build_sft_dataset, load_conversations

DATA = SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def demo_rows(name: str, n: int) -> list[dict]:
    return json.loads(Path(DATA, name).read_text(encoding="utf-8"))[:n]


def test_registry_formats_and_max_samples() -> None:
    convs, report = load_conversations("alpaca_en_demo, glaive_toolcall_en_demo", DATA, max_samples=50)
    assert len(convs) == 100 and [s.loaded for s in report.datasets.values()] == [50, 50]
    first = demo_rows("alpaca_en_demo.json", 1)[0]
    assert convs[0].messages == [{"role": "user", "content": first["instruction"]},
                                 {"role": "assistant", "content": first["output"]}]
    assert convs[0].tools is None and convs[0].source == "alpaca_en_demo"
    tool = convs[50]
    assert json.loads(tool.tools)[0]["name"] == "search_recipes"
    roles = [m["role"] for m in tool.messages]
    assert roles[:6] == ["user", "assistant", "user", "function_call", "tool", "assistant"]
    same, _ = load_conversations(["alpaca_en_demo", "glaive_toolcall_en_demo"], DATA, max_samples=50)
    assert same == convs


def test_alpaca_input_system_and_history(tmp_path) -> None:
    rows = [{"q": "Translate", "ctx": "chat", "a": "Plaudern", "sys": "Be brief.", "hist": [["Hi", "Hello"]]}]
    write_json(tmp_path / "mine.json", rows)
    info = {"mine": {"file_name": "mine.json", "columns": {"prompt": "q", "query": "ctx", "response": "a",
                                                           "system": "sys", "history": "hist"}}}
    write_json(tmp_path / "dataset_info.json", info)
    (conv,), _ = load_conversations("mine", str(tmp_path))
    assert conv.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Translate\nchat"},
                             {"role": "assistant", "content": "Plaudern"}]


def test_openai_messages_with_tool_calls(tmp_path) -> None:
    call = {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]
    rows = [{"messages": messages, "tools": [{"name": "add"}]}]
    write_json(tmp_path / "chat.json", rows)
    write_json(tmp_path / "dataset_info.json", {"chat": {"file_name": "chat.json", "formatting": "openai"}})
    for name in ("chat", str(tmp_path / "chat.json")):  # registered, and detected from an unregistered path
        (conv,), _ = load_conversations(name, str(tmp_path))
        assert [m["role"] for m in conv.messages] == ["system", "user", "function_call", "tool", "assistant"]
        assert json.loads(conv.messages[2]["content"]) == call and json.loads(conv.tools) == [{"name": "add"}]


def test_sharegpt_tags(tmp_path) -> None:
    rows = [{"dialog": [{"who": "me", "text": "Hi"}, {"who": "bot", "text": "Hey"}], "sys": "Kind."}]
    write_json(tmp_path / "d.json", rows)
    info = {"d": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
                  "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}}}
    write_json(tmp_path / "dataset_info.json", info)
    (conv,), _ = load_conversations("d", str(tmp_path))
    assert conv.messages == [{"role": "system", "content": "Kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hey"}]


def test_file_types_and_folders(tmp_path) -> None:
    rows = demo_rows("alpaca_en_demo.json", 20)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with open(tmp_path / "rows.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_json(tmp_path / "shards" / f"part{i}.json", rows[i * 10:(i + 1) * 10])
    expected, _ = load_conversations(str(tmp_path / "rows.jsonl"), DATA)
    assert len(expected) == 20
    for name in ("rows.csv", "rows.parquet", "shards"):  # relative to dataset_dir, no dataset_info.json there
        convs, _ = load_conversations(name, str(tmp_path))
        assert [c.messages for c in convs] == [c.messages for c in expected], name


def test_bad_rows_are_skipped_counted_and_shown(tmp_path, caplog) -> None:
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    rows = [good,
            {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            {"conversations": [{"from": "human", "value": "a"}]},
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]},
            {"other": 1},
            good]
    write_json(tmp_path / "bad.json", rows)
    write_json(tmp_path / "dataset_info.json", {"bad": {"file_name": "bad.json", "formatting": "sharegpt"}})
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        convs, report = load_conversations("bad", str(tmp_path))
    stats = report.datasets["bad"]
    assert len(convs) == 2 and (stats.rows, stats.loaded, stats.skipped) == (6, 2, 4)
    assert stats.reasons["empty answer"] == 1
    assert any(r.startswith("two prompt turns in a row") for r in stats.reasons)
    assert any(r.startswith("does not end with an assistant turn") for r in stats.reasons)
    assert any(r.startswith("missing column 'conversations'") for r in stats.reasons)
    assert "skipped 4 of 6 rows" in caplog.text and "row 1: two prompt turns" in caplog.text
    assert "row 3: empty answer" in caplog.text and "row 4:" not in caplog.text  # only the first three are shown
    assert "1x missing column 'conversations' (row has: other)" in caplog.text  # but every reason is counted
    write_json(tmp_path / "bad.json", rows[1:5])
    with pytest.raises(ConfigError, match="no usable rows"):
        load_conversations("bad", str(tmp_path))


def test_registry_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"lives on the hub \(hf_hub_url=llamafactory/alpaca_en.*offline.*file_name"):
        load_conversations("alpaca_en", DATA)
    with pytest.raises(ConfigError, match="ranking"):
        load_conversations("dpo_en_demo", DATA)
    with pytest.raises(ConfigError, match="Closest names: alpaca_en_demo"):
        load_conversations("alpaca_en_dem", DATA)
    with pytest.raises(ConfigError, match="no dataset_info.json"):
        load_conversations("nothing_here", str(tmp_path))
    with pytest.raises(ConfigError, match="plain text for pretraining"):
        load_conversations(str(Path(DATA, "c4_demo.jsonl")), str(tmp_path))
    write_json(tmp_path / "dataset_info.json", {"x": {"file_name": "x.json", "colums": {}}})
    with pytest.raises(ConfigError, match="Did you mean 'columns'"):
        load_conversations("x", str(tmp_path))


def test_num_samples_is_seeded(tmp_path) -> None:
    shutil.copy(Path(DATA, "identity.json"), tmp_path / "identity.json")
    write_json(tmp_path / "dataset_info.json", {"id": {"file_name": "identity.json", "num_samples": 20},
                                                "many": {"file_name": "identity.json", "num_samples": 120}})
    a, _ = load_conversations("id", str(tmp_path))
    b, _ = load_conversations("id", str(tmp_path))
    many, _ = load_conversations("many", str(tmp_path))
    assert len(a) == 20 and a == b and len(many) == 120


def test_build_splits_packs_and_caches(tok, tmp_path, caplog) -> None:
    kw = dict(cache_dir=str(tmp_path / "cache"), max_samples=120, cutoff_len=256)
    start = time.perf_counter()
    train, evals = build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, val_size=0.1, **kw)
    first_time = time.perf_counter() - start
    assert {name: len(rows) for name, rows in evals.items()} == {"alpaca_en_demo": 12, "identity": 9}  # 10% of each
    assert len(train) == 120 + 91 - 21
    held = [e for rows in evals.values() for e in rows]
    assert all(len(e["input_ids"]) <= 256 and e["labels"][0] == IGNORE_INDEX for e in train + held)
    assert all(any(label != IGNORE_INDEX for label in e["labels"]) for e in train)
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        start = time.perf_counter()
        again = build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, val_size=0.1, **kw)
    assert time.perf_counter() - start < first_time / 3
    assert again == (train, evals) and "from cache" in caplog.text
    assert not list((tmp_path / "cache").glob("*.tmp"))  # written atomically
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peftkit.data"):
        shorter, _ = build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, val_size=0.1, **{**kw, "cutoff_len": 64})
        assert "from cache" not in caplog.text and max(len(e["input_ids"]) for e in shorter) == 64
        build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, val_size=0.1, overwrite_cache=True, **kw)
        assert "from cache" not in caplog.text

    counted, held = build_sft_dataset(tok, "identity", DATA, val_size=5, **kw)
    assert (len(counted), len(held)) == (86, 5)
    explicit, other = build_sft_dataset(tok, "identity", DATA, val_size=0.5, eval_dataset="alpaca_en_demo", **kw)
    assert (len(explicit), len(other)) == (91, 120)  # eval_dataset wins over val_size

    packed, packed_eval = build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, packing=True, **kw)
    assert packed_eval is None and len(packed) < 211
    assert sum(len(r["seq_lens"]) for r in packed) == 211 and all(len(r["input_ids"]) <= 256 for r in packed)
    assert all(r["position_ids"] == [p for n in r["seq_lens"] for p in range(n)] for r in packed)
    cached_packed, _ = build_sft_dataset(tok, "alpaca_en_demo,identity", DATA, packing=True, **kw)
    assert cached_packed == packed


def test_build_argument_errors(tok, tmp_path) -> None:
    kw = dict(cache_dir=str(tmp_path), max_samples=10)
    with pytest.raises(ConfigError, match="leaves none to train on"):
        build_sft_dataset(tok, "identity", DATA, val_size=10, **kw)
    with pytest.raises(ConfigError, match="val_size"):
        build_sft_dataset(tok, "identity", DATA, val_size=2.5, **kw)
    with pytest.raises(ConfigError, match="cutoff_len"):
        build_sft_dataset(tok, "identity", DATA, cutoff_len=1, **kw)
