"""One entry point: the whole-process training comparison, the generation comparison, the API's throughput (one
client against 8) and the memory figures.

    python -m benchmarks all            # on an idle machine: writes a dated section of docs/performance.md + .json
    python -m benchmarks all --quick    # smoke test (tiny settings); write it elsewhere: --out-doc /tmp/perf.md
    python -m benchmarks train          # only the training comparison (benchmarks/train_job.py)
    python -m benchmarks generate       # only the generation comparison (benchmarks/generation.py)
    python -m benchmarks render docs/performance.json   # the doc section again, from the JSON (no runs)

Each part runs in its own process tree (this process imports neither torch nor transformers). `all` replaces only
the text between its CPU kind's markers in the doc (appending the section when absent) and prints the same tables:
CPUs with native bf16 and CPUs without it keep a section each (and a JSON each: performance.json and
performance-no-bf16.json), since their paths and targets differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import train_job

REPO = Path(__file__).resolve().parents[1]


def markers(machine: dict) -> tuple[str, str]:
    """The doc section's markers for this kind of CPU."""
    kind = "" if machine.get("native_bf16") else ":no-bf16"
    return f"<!-- benchmarks:all{kind}:start -->", f"<!-- benchmarks:all{kind}:end -->"


def default_json(doc: Path, machine: dict) -> Path:
    return doc.with_suffix(".json") if machine.get("native_bf16") else doc.with_name(f"{doc.stem}-no-bf16.json")


# --------------------------------------------------------------------------------------------- the parts
def part(name: str, command: list[str], result: Path) -> dict:
    """Run one part in its own process (its output shows as it goes); its JSON, or why there is none."""
    print(f"\n== {name} ==", flush=True)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    code = subprocess.call(command, cwd=REPO)
    out = {"load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
           "wall_s": round(time.perf_counter() - start, 1)}
    if result.exists():
        return {**json.loads(result.read_text()), **out}  # the part's own wall time and load averages win
    return dict(out, error=f"{' '.join(command[1:])} exited with {code} and wrote no result (its output is above)")


def run_generation(quick: bool, result: Path) -> None:
    """The child of `all`/`generate`: benchmarks.generation.run(quick), or the error it met, as JSON."""
    try:
        from benchmarks import generation

        out = {"result": generation.run(quick)}
        if callable(getattr(generation, "table", None)):  # its own rendering, where it has one
            try:
                out["markdown"] = generation.table(out["result"])
            except Exception as e:  # noqa: BLE001 -- the generic rendering below still works
                out["markdown_error"] = repr(e)
    except Exception:  # noqa: BLE001 -- recorded in the doc; the other parts still count
        out = {"error": traceback.format_exc(limit=3).strip()}
        print(out["error"], file=sys.stderr)
    result.write_text(json.dumps(out, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------- rendering
def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(c) for c in row) + " |" for row in rows)]


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys and lists of scalars one cell, so a record fits one table row."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v):
            out[f"{prefix}{k}"] = ", ".join(fmt(x) for x in v)
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else json.dumps(v)
    return out


def render(value) -> list[str]:
    """Any JSON-like result as markdown: a list of records, or a dict of records, is one table (a row per record);
    a dict's scalars are a two-column table, and its other entries follow under bold headings."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = [flatten(v) for v in value]
        cols = list(dict.fromkeys(k for row in rows for k in row))
        return table(cols, [[row.get(c) for c in cols] for row in rows])
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        rows = {k: flatten(v) for k, v in value.items()}
        cols = list(dict.fromkeys(k for row in rows.values() for k in row))
        return table(["", *cols], [[k, *(row.get(c) for c in cols)] for k, row in rows.items()])
    if isinstance(value, dict):
        def nested(v) -> bool:
            return isinstance(v, dict) or isinstance(v, list) and any(isinstance(x, dict) for x in v)

        scalars = [[k, v] for k, v in flatten({k: v for k, v in value.items() if not nested(v)}).items()]
        lines = table(["", "value"], scalars) if scalars else []
        for k, v in value.items():
            if nested(v) and v:
                lines += ["", f"**{k}**", "", *render(v)]
        return lines
    return [fmt(value)]


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} (avx512_bf16: {'yes' if m['avx512_bf16'] else 'no'}), {m['cores']} cores; torch "
            f"{m['torch']}, transformers {m['transformers']}, peft {m['peft']}, peftkit {m['peftkit']}, "
            f"Python {m['python']}")


def load_note(p: dict) -> str:
    busy = max(p["load_avg_before"], p["load_avg_after"]) > train_job.BUSY_LOAD
    return (f"1-minute load average {p['load_avg_before']:.1f} -> {p['load_avg_after']:.1f}"
            + (" (other work competed)" if busy else ""))


def report(record: dict) -> str:
    """The dated section: machine, then training, memory and generation, each with its load averages."""
    train, gen = record["train"], record["generation"]
    quick = " (--quick: smoke-test settings, not the benchmark)" if record["quick"] else ""
    lines = [f"## All benchmarks (`python -m benchmarks all`), {record['date'][:10]}{quick}", "",
             f"Machine: {machine_line(record['machine'])}. Load average before the first run: "
             f"{record['load_avg_at_start']:.1f}. Every run is its own process.", "",
             "### Training, whole process (`benchmarks/train_job.py`)", ""]
    if train.get("skipped"):
        lines.append("Skipped (--skip train).")
    elif "error" in train:
        lines.append(f"Failed: {train['error']}")
    else:
        lines += [train_job.markdown(train), "", f"Part wall {train['wall_s']:.0f} s; {load_note(train)}.",
                  "", "### Memory: peak RSS of each training process", ""]
        mem = record["memory"]
        lines += table(["run", "peak RSS MiB", "/ HF-default", "/ HF-best"],
                       [[r["run"], round(r["peak_rss_mib"]), r["vs_hf_default"], r["vs_hf_best"]] for r in mem])
        rss = next((v for k, v in train.get("checks", {}).items() if k.startswith("peak RSS")), None)
        if rss is not None:
            lines += ["", f"Target peftkit <= {train['targets']['rss_vs_hf_best']}x HF-best's peak RSS: "
                          f"{'met' if rss else 'NOT met'}."]
    lines += ["", "### Generation (`benchmarks/generation.py`)", ""]
    if gen.get("skipped"):
        lines.append("Skipped (--skip generate).")
    elif "error" in gen:
        lines += ["Not measured; the generation benchmark failed:", "", "```", gen["error"], "```", "",
                  f"Part wall {gen['wall_s']:.0f} s."]
    else:
        lines += [gen["markdown"]] if "markdown" in gen else render(gen["result"])
        lines += ["", f"Part wall {gen['wall_s']:.0f} s; {load_note(gen)}."]
        if gen.get("note"):  # a part run again on its own, say why
            lines += ["", f"Note: {gen['note']}."]
    serve = record.get("serve", {"skipped": True})  # absent from records written before it was a part
    lines += ["", "### Serving: the API's throughput (`benchmarks/serve.py`)", ""]
    if serve.get("skipped"):
        lines.append("Skipped (--skip serve).")
    elif "error" in serve:
        lines.append(f"Failed: {serve['error']}")
    else:
        lines += [serve["markdown"], "", f"Part wall {serve['wall_s']:.0f} s; {load_note(serve)}."]
    return "\n".join(lines)


def write_section(doc: Path, body: str, machine: dict) -> None:
    """Replace the text between this CPU kind's markers (or append the section); the rest of the file stays."""
    start, end = markers(machine)
    text = doc.read_text() if doc.exists() else "# Performance\n"
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(doc, text)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- commands
def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{all,train,generate,render}")
    for name, what in (("all", "training, generation and memory; writes the doc section and JSON"),
                       ("train", "the whole-process training comparison only"),
                       ("generate", "the generation comparison only")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--quick", action="store_true", help="smoke test: tiny settings, minutes not tens of minutes")
        if name != "generate":
            s.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
        if name == "all":
            s.add_argument("--out-doc", default=str(REPO / "docs" / "performance.md"))
            s.add_argument("--out-json", help="default: --out-doc with .json")
            s.add_argument("--skip", choices=["train", "generate", "serve"], action="append", default=[],
                           help="leave a part out (it is recorded as skipped)")
        else:
            s.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                                ("train_job.json" if name == "train" else "generation.json")))
    again = sub.add_parser("render", help="write the doc section again from a JSON that `all` wrote")
    again.add_argument("json")
    again.add_argument("--out-doc", default=str(REPO / "docs" / "performance.md"))
    child = sub.add_parser("_generation")  # the generation part's own process
    child.add_argument("result")
    child.add_argument("--quick", action="store_true")
    a = p.parse_args()
    quick = ["--quick"] if getattr(a, "quick", False) else []
    if a.command == "_generation":
        return run_generation(a.quick, Path(a.result))
    if a.command == "render":
        record = json.loads(Path(a.json).read_text())
        body = report(record)
        write_section(Path(a.out_doc), body, record["machine"])
        print(f"{body}\n\nWrote the section of {a.out_doc}.")
        return
    if a.command == "train":
        train_job.main([*quick, "--data-dir", a.data_dir, "--out", a.out])
        return
    if a.command == "generate":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        r = part("generation", [sys.executable, "-m", "benchmarks", "_generation", a.out, *quick], Path(a.out))
        print(r.get("markdown") or "\n".join(render(r.get("result", r))))
        return
    run_all(a, quick)


def run_all(a: argparse.Namespace, quick: list[str]) -> None:
    started = time.time()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": train_job.machine(),
              "quick": a.quick, "load_avg_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="benchmarks_all_") as tmp:
        train_json, gen_json = Path(tmp) / "train.json", Path(tmp) / "generation.json"
        skipped = {"skipped": True}
        record["train"] = skipped if "train" in a.skip else part(
            "training (whole process)",
            [sys.executable, "-m", "benchmarks.train_job", *quick, "--data-dir", a.data_dir, "--out", str(train_json)],
            train_json)
        record["generation"] = skipped if "generate" in a.skip else part(
            "generation", [sys.executable, "-m", "benchmarks", "_generation", str(gen_json), *quick], gen_json)
        serve_json = Path(tmp) / "serve.json"
        record["serve"] = skipped if "serve" in a.skip else part(
            "serving (the API, one client against 8)",
            [sys.executable, "-m", "benchmarks.serve", *quick, "--out", str(serve_json)], serve_json)
    record["memory"] = train_job.memory_rows(record["train"]) if "runs" in record["train"] else []
    record["total_wall_s"] = round(time.time() - started, 1)
    body = report(record)
    doc = Path(a.out_doc)
    out_json = Path(a.out_json) if a.out_json else default_json(doc, record["machine"])
    write_section(doc, body, record["machine"])
    atomic_write(out_json, json.dumps(record, indent=2, default=str) + "\n")
    print(f"\n{body}\n\nWrote the section of {doc} and {out_json} ({record['total_wall_s']:.0f} s in all).")


if __name__ == "__main__":
    main()
