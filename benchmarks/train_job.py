"""Whole-process LoRA training: the `peftkit train` CLI against a transformers.Trainer + PEFT script, start-up included.

    python -m benchmarks.train_job            # the README job: ~12 min on 2 idle cores
    python -m benchmarks.train_job --quick    # 16 rows, smoke test: ~4 min

The README benchmark's job: smollm2-135m, the first 200 rows of alpaca_en_demo, cutoff 256, LoRA r8 alpha 16 dropout 0
on q_proj,v_proj, batch 4, one epoch, lr 1e-4 cosine, seed 42. Each run is one process, timed from spawn to exit, its
peak RSS and CPU time read by wait4 (its own, children excluded). The model folder and peftkit's dataset cache are
made before timing (they are one-off costs for both sides); a separate instrumented CLI run tokenizes cold and times
peftkit's start-up phases. Eval loss: one function (sft_throughput.eval_loss) on held-out rows 200..263 for every
saved adapter, in one untimed process. Also the quickstart (examples/quickstart.yaml) and its answer to "Who are you?".
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Only the standard library up here: the HF child imports this module, and must pay for nothing a plain script would
# not import.
REPO = Path(__file__).resolve().parents[1]
DATASET = "alpaca_en_demo"
JOB = dict(model_name_or_path="smollm2-135m", finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0,
           lora_target="q_proj,v_proj", dataset=DATASET, cutoff_len=256, per_device_train_batch_size=4,
           gradient_accumulation_steps=1, learning_rate=1e-4, num_train_epochs=1, lr_scheduler_type="cosine",
           seed=42, save_steps=100000, overwrite_output_dir=True, logging_steps=10)
BUSY_LOAD = (os.cpu_count() or 2) + 1.0  # a run's own threads load ~cores; more means other work competed


def targets(native_bf16: bool) -> dict[str, float]:
    """The issue's targets; CPUs without native bf16 get the lower ones."""
    return {"x_hf_default": 2.5 if native_bf16 else 2.0, "x_hf_best": 1.5 if native_bf16 else 1.3, "eval_rel": 0.01,
            "rss_vs_hf_best": 0.75, "quickstart_s": 40.0 if native_bf16 else 80.0}


def machine() -> dict:
    """CPU model, native bf16 (avx512_bf16 or AMX), cores and versions, read without importing torch."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor() or "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"cpu": cpu, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": ver("torch"), "transformers": ver("transformers"),
            "peft": ver("peft"), "peftkit": ver("peftkit")}


def describe_machine(m: dict) -> str:
    return (f"{m['cpu']}, avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, {m['cores']} cores; torch {m['torch']}, "
            f"transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}")


# --------------------------------------------------------------------------------------------- children
def digest(rows: list[dict]) -> str:
    """Of the token ids and labels, in row order: equal digests mean both sides train on identical tokens."""
    blob = json.dumps([[r["input_ids"], r["labels"]] for r in rows], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def child_hf(a: argparse.Namespace) -> None:
    """What a competent user writes with transformers + PEFT; `--variant best` adds HF's fastest CPU settings here:
    group_by_length, and bf16 autocast where the CPU has native bf16 (without it, bf16 is ~5x slower: fp32 is best)."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    best = a.variant == "best"
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if best:
        model.config.use_cache = False  # no KV cache built during training forwards
    info = json.loads((Path(a.data_dir) / "dataset_info.json").read_text())[DATASET]
    rows = json.loads((Path(a.data_dir) / info["file_name"]).read_text())[: a.max_samples]
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def example(row: dict) -> dict:
        user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False).input_ids
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        labels = [-100] * len(prompt) + ids[len(prompt):]
        last = len(ids) - 1 - ids[::-1].index(end)  # answer through <|im_end|>; the newline after it is not learned
        labels[last + 1:] = [-100] * (len(ids) - last - 1)
        ids, labels = ids[: a.cutoff_len], labels[: a.cutoff_len]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    examples = [example(r) for r in rows]
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                       target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=a.output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", seed=42, use_cpu=True, save_strategy="no", report_to="none", logging_steps=10,
        bf16=best and machine()["native_bf16"],
        train_sampling_strategy="group_by_length" if best else "random")  # 5.x's name for group_by_length
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(examples),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    out = trainer.train()
    trainer.save_model()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    Path(a.result).write_text(json.dumps({
        "train_runtime": out.metrics["train_runtime"], "steps": out.global_step, "mean_train_loss": out.training_loss,
        "train_loss": losses[-1] if losses else out.training_loss, "tokens": sum(len(e["input_ids"]) for e in examples),
        "label_tokens": sum(sum(t != -100 for t in e["labels"]) for e in examples), "digest": digest(examples),
        "trainable_params": model.get_nb_trainable_parameters()[0]}))


def _job_config(yaml_path: str, overrides: list[str]):
    from peftkit.config import load_config

    return load_config(yaml_path, overrides)


def child_warm(a: argparse.Namespace) -> None:
    """Make what peftkit makes on first use (the converted model folder, the dataset cache) through the CLI's own
    code path, stopped before training; and load the HF stack once, so neither side's first run reads a cold disk."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from peftkit.models import resolve_model_path
    from peftkit.train import run

    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    run.Trainer = stop  # everything before the trainer: dtype probe, model load, data (tokenized and cached), LoRA
    for job in json.loads(a.jobs):
        try:
            run.run_sft(_job_config(job["config"], job["overrides"]))
        except Stop:
            pass
    Path(a.result).write_text(json.dumps({"model_folder": resolve_model_path("smollm2-135m")}))


def child_phases(a: argparse.Namespace) -> None:
    """The real `peftkit train` (cli.main), with timestamps around each phase of start-up, the steps and the save."""
    marks: list[tuple[str, float, float]] = [("interpreter start", float(os.environ["BENCH_SPAWN_TIME"]), time.time())]
    start = time.time()
    import peftkit.cli as cli
    from peftkit.train import run, trainer

    marks.append(("import peftkit.cli (torch, transformers, ...)", start, time.time()))

    def timed(owner, attr: str, label: str, once: bool = False) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapper(*args, **kw):
            t0 = time.time()
            out = original(*args, **kw)
            if not (once and any(m[0] == label for m in marks)):
                marks.append((label, t0, time.time()))
            return out

        setattr(owner, attr, wrapper)

    timed(run, "base_dtype", "dtype choice (bf16 vs fp32 matmul probe)")
    timed(run, "load_model_and_tokenizer", "load model + tokenizer")
    timed(run, "build_dataset", "read + tokenize data (cold: overwrite_cache)")
    timed(run, "TunedModel", "add LoRA")
    timed(trainer.Trainer, "__init__", "trainer set-up (optimizer, schedule)")
    timed(trainer, "optimizer_step", "first optimizer step", once=True)
    timed(trainer.Trainer, "_train_loop", "training loop (all steps)")
    timed(trainer.Trainer, "_finish", "save adapter + records")
    code = cli.main(["train", a.config, *a.overrides])
    marks.append(("main returned", time.time(), time.time()))
    Path(a.result).write_text(json.dumps(marks))
    cli.exit_now(code)  # as the `peftkit` command exits


def child_eval(a: argparse.Namespace) -> None:
    """Eval loss of the base model and of each adapter (PEFT-loaded, fp32) on held-out rows tokenized by peftkit;
    and peftkit's training rows' token counts and digest, to compare with the HF side's."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.sft_throughput import eval_loss
    from peftkit.data import build_sft_dataset, encode, get_template, load_conversations
    from peftkit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    chat = get_template(None, tok)
    first, last = a.eval_rows
    conversations, _ = load_conversations(DATASET, a.data_dir, max_samples=last)
    held_out = [encode(c, chat, tok, cutoff_len=JOB["cutoff_len"])[0] for c in conversations if c.row >= first]
    train, _ = build_sft_dataset(tok, DATASET, a.data_dir, cutoff_len=JOB["cutoff_len"], max_samples=a.max_samples,
                                 seed=JOB["seed"])  # what `peftkit train` read (from its cache)
    out = {"eval_rows": [first, last], "eval_examples": len(held_out), "eval_label_tokens": sum(
        sum(t != -100 for t in r["labels"][1:]) for r in held_out), "peftkit_rows": {
        "tokens": sum(len(r["input_ids"]) for r in train), "label_tokens": sum(
            sum(t != -100 for t in r["labels"]) for r in train), "digest": digest(train)}, "eval_loss": {}}
    for name, folder in [("base", None), *json.loads(a.adapters).items()]:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        if folder:
            model = peft.PeftModel.from_pretrained(model, folder)
        out["eval_loss"][name] = round(eval_loss(model, held_out), 5)
    Path(a.result).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------- parent
def spawn(name: str, command: list[str], log: Path, *, stdout: Path | None = None, quiet: bool = False) -> dict:
    """Run one process to its end: wall time from spawn to exit, its own peak RSS and CPU time (wait4)."""
    if not quiet:
        print(f"  {name:<16} ...", end=" ", flush=True)
    env = dict(os.environ, BENCH_SPAWN_TIME=repr(time.time()))
    load_before = os.getloadavg()[0]
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out if stdout else err, stderr=err, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"run": name, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load_avg_before": load_before,
              "load_avg_after": os.getloadavg()[0], "exit_time": time.time(), "returncode": proc.returncode}
    result["busy"] = max(result["load_avg_before"], result["load_avg_after"]) > BUSY_LOAD
    if proc.returncode:
        print("FAILED")
        raise SystemExit(f"{name} failed (exit {proc.returncode}); its log {log}:\n{log.read_text()[-4000:]}")
    if not quiet:
        print(f"{wall:6.1f} s, {result['peak_rss_mib']:6.0f} MiB peak RSS, CPU {result['cpu_s']:.0f} s "
              f"(load avg {load_before:.1f} -> {result['load_avg_after']:.1f})")
    return result


def child_command(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.train_job", "--child", mode, *args]


def peftkit_command(*args: str) -> list[str]:
    """The console script pip installed beside this Python (not a pyenv shim, which adds its own start-up)."""
    script = Path(sys.executable).with_name("peftkit")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "peftkit", *args]


def write_yaml(path: Path, values: dict) -> None:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))  # JSON scalars are YAML


def run_phases(config: Path, overrides: list[str], tmp: Path) -> dict:
    result = tmp / "phases.json"
    r = spawn("peftkit phases", child_command("phases", str(config), *overrides, "--result", str(result)),
              tmp / "phases.log")
    marks = json.loads(result.read_text())
    spawned = marks[0][1]
    rows = [{"phase": label, "start_s": round(t0 - spawned, 2), "seconds": round(t1 - t0, 2)}
            for label, t0, t1 in marks if label != "main returned"]
    loop = next((row for row in rows if row["phase"].startswith("training loop")), None)
    first = next((row for row in rows if row["phase"] == "first optimizer step"), None)
    if loop and first:
        steps = int(next(o for o in overrides if o.startswith("max_steps=")).split("=")[1])
        rest = loop["seconds"] - first["seconds"]
        loop["phase"] = f"training loop ({steps} steps; after the first: {rest / max(steps - 1, 1):.2f} s/step)"
    rows.sort(key=lambda row: row["start_s"])
    rows.append({"phase": "exit (after main returned)", "start_s": round(marks[-1][1] - spawned, 2),
                 "seconds": round(r["exit_time"] - marks[-1][1], 2)})
    return dict(r, phases=rows)


def saved_line(log: Path) -> dict:
    """`Saved the adapter to DIR (N s, M tokens/s)`, the CLI's last word."""
    m = re.search(r"Saved the \w+ to .* \((\d+) s, (\d+) tokens/s\)", log.read_text())
    return {"train_s_printed": int(m[1]), "tokens_per_s_printed": int(m[2])} if m else {}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 16 rows, 8 eval rows, 2-step quickstart")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--max-samples", type=int, default=200, help="training rows: the first N of alpaca_en_demo")
    p.add_argument("--runs", default="phases,peftkit,hf-default,hf-best,quickstart",
                   help="comma-separated subset (for development)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each compared job, in the order ABC, CBA, ...; each row is their mean")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_job.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    p.add_argument("--cutoff-len", type=int, default=JOB["cutoff_len"], help=argparse.SUPPRESS)
    p.add_argument("--eval-rows", type=int, nargs=2, default=[200, 264], help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    p.add_argument("--jobs", help=argparse.SUPPRESS)
    a, unknown = p.parse_known_args(argv)
    if a.child:
        a.config, a.overrides = (a.rest[0] if a.rest else None), a.rest[1:] + unknown
        return {"hf": child_hf, "warm": child_warm, "phases": child_phases, "eval": child_eval}[a.child](a)
    if unknown or a.rest:
        p.error(f"unrecognized arguments: {' '.join(unknown + a.rest)}")
    return compare(a)


def compare(a: argparse.Namespace) -> dict:
    if a.quick:
        a.max_samples = min(a.max_samples, 16)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    eval_rows = [200, 208] if a.quick else [200, 264]
    info = machine()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": info, "quick": a.quick,
              "settings": dict(JOB, max_samples=a.max_samples, dataset_dir=a.data_dir, eval_rows=eval_rows,
                              rounds=a.rounds),
              "targets": targets(info["native_bf16"]), "runs": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"Whole-process training comparison on {describe_machine(info)}")
    with tempfile.TemporaryDirectory(prefix="train_job_") as name:
        tmp = Path(name)
        config = tmp / "job.yaml"
        write_yaml(config, dict(JOB, dataset_dir=a.data_dir, max_samples=a.max_samples, output_dir=str(tmp / "pk")))
        quick_steps = ["max_steps=2"] if a.quick else []
        quickstart = ("examples/quickstart.yaml", [f"output_dir={tmp / 'quickstart'}", *quick_steps])
        jobs = [{"config": str(config), "overrides": [f"output_dir={tmp / 'warm'}"]},
                {"config": quickstart[0], "overrides": [f"output_dir={tmp / 'warm-q'}", *quick_steps]}]
        warm = spawn("warm-up", child_command("warm", "--jobs", json.dumps(jobs), "--result", str(tmp / "warm.json")),
                     tmp / "warm.log", quiet=True)
        folder = json.loads((tmp / "warm.json").read_text())["model_folder"]
        print(f"  (warm-up, untimed: model folder, dataset caches, imports: {warm['wall_s']:.0f} s)")

        def save() -> None:  # partial results survive an interrupted run
            out.write_text(json.dumps(record, indent=2) + "\n")

        adapters: dict[str, str] = {}
        rounds: dict[str, list[dict]] = {}
        if "phases" in runs:
            record["runs"]["peftkit-phases"] = run_phases(
                config, [f"output_dir={tmp / 'phases'}", "max_steps=2" if a.quick else "max_steps=3",
                         "logging_steps=1", "overwrite_cache=true"], tmp)
            save()
        compared = [name for name in ("peftkit", "hf-default", "hf-best") if name in runs]
        for round_ in range(a.rounds):
            # ABC, then CBA, ...: a drift of the machine's speed during the comparison (this VM's moves 10-20%)
            # weighs on every run alike in the mean of a forward and a backward round
            for name in compared if round_ % 2 == 0 else compared[::-1]:
                here = tmp / f"round{round_}"
                here.mkdir(exist_ok=True)
                label = name if a.rounds == 1 else f"{name} ({round_ + 1}/{a.rounds})"
                if name == "peftkit":
                    r = spawn(label, peftkit_command("train", str(config), f"output_dir={here / 'pk'}"),
                              here / "peftkit.log")
                    res = json.loads((here / "pk" / "train_results.json").read_text())
                    r.update(saved_line(here / "peftkit.log"), loop_s=res["train_runtime"], steps=res["train_steps"],
                             train_loss=res["train_loss"], peak_memory_mb_reported=res["peak_memory_mb"],
                             trainable_params=res["trainable_params"],
                             tokens=round(res["train_tokens_per_second"] * res["train_runtime"]))  # no evals here
                    output = here / "pk"
                else:
                    result, output = here / f"{name}.json", here / name
                    r = spawn(label, child_command("hf", "--variant", name.removeprefix("hf-"), "--model", folder,
                                                   "--data-dir", a.data_dir, "--max-samples", str(a.max_samples),
                                                   "--output-dir", str(output), "--result", str(result)),
                              here / f"{name}.log")
                    res = json.loads(result.read_text())
                    r.update(res, loop_s=round(res.pop("train_runtime"), 2))
                rounds.setdefault(name, []).append(r)
                adapters.setdefault(name, str(output))  # the first round's: training is seeded, rounds agree
                record["runs"][name] = mean_of_rounds(rounds[name])
                save()
        if "quickstart" in runs:
            r = spawn("quickstart", peftkit_command("train", *quickstart[0:1], *quickstart[1]), tmp / "quickstart.log")
            r.update(saved_line(tmp / "quickstart.log"))
            reply = tmp / "chat.txt"
            chat = spawn("quickstart chat", peftkit_command("chat", "--model", "smollm2-135m", "--adapter",
                                                            str(tmp / "quickstart"), "--once", "Who are you?"),
                         tmp / "chat.log", stdout=reply)
            r.update(chat_wall_s=chat["wall_s"], answer=reply.read_text().strip())
            print(f"  quickstart answer to 'Who are you?': {r['answer']!r}")
            record["runs"]["quickstart"] = r
            save()
        if adapters:
            print(f"  eval loss on alpaca rows {eval_rows[0]}..{eval_rows[1] - 1} (untimed) ...", flush=True)
            spawn("eval", child_command("eval", "--model", folder, "--data-dir", a.data_dir, "--max-samples",
                                        str(a.max_samples), "--eval-rows", *map(str, eval_rows), "--adapters",
                                        json.dumps(adapters), "--result", str(tmp / "eval.json")),
                  tmp / "eval.log", quiet=True)
            ev = json.loads((tmp / "eval.json").read_text())
            record["eval"] = ev
            for name in adapters:
                record["runs"][name]["eval_loss"] = ev["eval_loss"][name]
    summarize(record)
    save()
    print("\n" + markdown(record))
    print(f"\nWrote {out}")
    return record


def mean_of_rounds(results: list[dict]) -> dict:
    """One run's row: the mean of its rounds' times and CPU seconds, the highest peak RSS, the load average from the
    first start to the last end, and every round as it was (`rounds`)."""
    row = dict(results[0])
    for key in ("wall_s", "loop_s", "cpu_s"):
        row[key] = round(sum(r[key] for r in results) / len(results), 2)
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    row["load_avg_after"] = results[-1]["load_avg_after"]
    row["busy"] = any(r["busy"] for r in results)
    row["loop_tokens_per_s"] = round(row["tokens"] / row["loop_s"], 1)
    row["rounds"] = [{k: r[k] for k in ("wall_s", "loop_s", "cpu_s", "peak_rss_mib", "load_avg_before",
                                        "load_avg_after")} for r in results]
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(record: dict) -> None:
    """Ratios against HF-default and HF-best, and each target as met or not (None where a run is missing)."""
    runs, t = record["runs"], record["targets"]
    pk, hd, hb = runs.get("peftkit"), runs.get("hf-default"), runs.get("hf-best")
    for r in (pk, hd, hb):
        if r is None:
            continue
        r["x_hf_default"] = _ratio(hd and hd["wall_s"], r["wall_s"])  # speed-up: HF's wall / this wall
        r["x_hf_best"] = _ratio(hb and hb["wall_s"], r["wall_s"])
        r["rss_vs_hf_default"] = _ratio(r["peak_rss_mib"], hd and hd["peak_rss_mib"])
        r["rss_vs_hf_best"] = _ratio(r["peak_rss_mib"], hb and hb["peak_rss_mib"])
        if hd and "eval_loss" in r and "eval_loss" in hd:
            r["eval_rel_vs_hf_default"] = round((r["eval_loss"] - hd["eval_loss"]) / hd["eval_loss"], 5)
    checks = {}
    if pk:
        checks[f"peftkit >= {t['x_hf_default']}x faster than HF-default (whole process)"] = (
            None if pk["x_hf_default"] is None else pk["x_hf_default"] >= t["x_hf_default"])
        checks[f"peftkit >= {t['x_hf_best']}x faster than HF-best (whole process)"] = (
            None if pk["x_hf_best"] is None else pk["x_hf_best"] >= t["x_hf_best"])
        rel = pk.get("eval_rel_vs_hf_default")
        checks[f"eval loss within {t['eval_rel']:.0%} of HF-default's"] = None if rel is None else abs(
            rel) <= t["eval_rel"]
        checks[f"peak RSS <= {t['rss_vs_hf_best']}x HF-best's"] = (
            None if pk["rss_vs_hf_best"] is None else pk["rss_vs_hf_best"] <= t["rss_vs_hf_best"])
    q = runs.get("quickstart")
    if q and not record["quick"]:
        checks[f"quickstart trains in < {t['quickstart_s']:.0f} s (whole process)"] = q["wall_s"] < t["quickstart_s"]
    ev = record.get("eval", {})
    if hd and "peftkit_rows" in ev:
        same = hd["digest"] == ev["peftkit_rows"]["digest"]
        record["same_tokens"] = {"identical": same, "peftkit": ev["peftkit_rows"],
                                 "hf": {k: hd[k] for k in ("tokens", "label_tokens", "digest")}}
    record["checks"] = checks


def _rounds_text(rounds: int) -> str:
    if rounds == 1:
        return "one run each"
    return (f"{rounds} runs each, in the order peftkit, HF-default, HF-best, then back, so that a drift of the "
            "machine's speed weighs on each alike; each row is the mean of its runs (the highest peak RSS)")


def _num(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(record: dict) -> str:
    """The training tables: the comparison, the targets, peftkit's start-up phases, the quickstart."""
    runs, m = record["runs"], record["machine"]
    s = record["settings"]
    compared = [name for name in ("peftkit", "hf-default", "hf-best") if name in runs]
    lines = [f"Job: smollm2-135m, first {s['max_samples']} rows of {DATASET}, cutoff {s['cutoff_len']}, LoRA r8 "
             f"alpha 16 dropout 0 on q_proj,v_proj, batch 4, one epoch, lr 1e-4 cosine, seed 42. Whole process, spawn "
             f"to exit; {_rounds_text(s.get('rounds', 1))}; model folder and peftkit's dataset cache made beforehand "
             "(untimed). HF-default: "
             f"fp32, DataCollatorForSeq2Seq padding; HF-best: bf16 autocast (where the CPU has native bf16) + "
             "group_by_length. Eval loss: held-out "
             f"rows {s['eval_rows'][0]}..{s['eval_rows'][1] - 1}, fp32, one function for all.", "",
             "| run | wall s | x HF-default | x HF-best | outside the loop s | loop s | loop tokens/s | peak RSS MiB "
             "| RSS / HF-best | CPU s | last train loss | eval loss | vs HF-default | load avg | wall s by round |",
             "|" + "---|" * 15]
    if not compared:
        lines = lines[:1]
    for name in compared:
        r = runs[name]
        busy = " *" if r["busy"] else ""
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {_num(r.get('x_hf_default'))} | {_num(r.get('x_hf_best'))} | "
            f"{r['wall_s'] - r['loop_s']:.1f} | {r['loop_s']:.1f} | {r['loop_tokens_per_s']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {_num(r.get('rss_vs_hf_best'))} | {r['cpu_s']:.0f} | "
            f"{_num(r.get('train_loss'), '{:.4f}')} | {_num(r.get('eval_loss'), '{:.4f}')} | "
            f"{_num(r.get('eval_rel_vs_hf_default'), '{:+.2%}')} | "
            f"{r['load_avg_before']:.1f} -> {r['load_avg_after']:.1f}{busy} | "
            f"{' / '.join(format(x['wall_s'], '.1f') for x in r.get('rounds', [r]))} |")
    ev = record.get("eval")
    if ev:
        lines.append(f"\nBase model eval loss {ev['eval_loss']['base']:.4f} ({ev['eval_examples']} rows, "
                     f"{ev['eval_label_tokens']} label tokens).")
    same = record.get("same_tokens")
    if same:
        pk, hf = same["peftkit"], same["hf"]
        verdict = "identical ids and labels" if same["identical"] else "NOT identical"
        lines.append(f"Training tokens: peftkit {pk['tokens']} ({pk['label_tokens']} labels), HF script "
                     f"{hf['tokens']} ({hf['label_tokens']} labels): {verdict}.")
    if record.get("checks"):
        lines += ["", "| target | result |", "|---|---|"]
        lines += [f"| {k} | {'–' if v is None else 'met' if v else 'NOT met'} |" for k, v in record["checks"].items()]
        if record["quick"]:
            lines.append("\n(--quick: a few steps, where start-up dominates; these verdicts say nothing.)")
    ph = runs.get("peftkit-phases")
    if ph:
        lines += ["", f"peftkit's start-up, phase by phase (one instrumented `peftkit train` of the same job, "
                      f"tokenizing cold, a few steps; wall {ph['wall_s']:.1f} s, peak RSS "
                      f"{ph['peak_rss_mib']:.0f} MiB):",
                  "", "| phase | starts at s | s |", "|---|---|---|"]
        lines += [f"| {row['phase']} | {row['start_s']:.2f} | {row['seconds']:.2f} |" for row in ph["phases"]]
    q = runs.get("quickstart")
    if q:
        printed = (f", {q['train_s_printed']} s in the loop at {q['tokens_per_s_printed']} tokens/s"
                   if "train_s_printed" in q else "")
        steps = " max_steps=2" if record["quick"] else ""
        native = "" if m["native_bf16"] else "out"
        lines += ["", f"Quickstart (`peftkit train examples/quickstart.yaml{steps}`): "
                      f"{q['wall_s']:.1f} s whole process{printed}, peak RSS {q['peak_rss_mib']:.0f} MiB (target "
                      f"< {record['targets']['quickstart_s']:.0f} s with{native} native bf16). "
                      f"`peftkit chat --adapter ... --once \"Who are you?\"` ({q['chat_wall_s']:.1f} s): "
                      f"\"{q['answer']}\""]
    if any(r.get("busy") for r in runs.values()):
        lines.append(f"\n* the 1-minute load average passed {BUSY_LOAD:.0f} during the run: other work competed.")
    return "\n".join(lines)


def memory_rows(record: dict) -> list[dict]:
    """Peak RSS of every process the comparison ran, for the memory table."""
    rows = []
    for name, r in record["runs"].items():
        rows.append({"run": name, "peak_rss_mib": r["peak_rss_mib"], "vs_hf_default": r.get("rss_vs_hf_default"),
                     "vs_hf_best": r.get("rss_vs_hf_best")})
    return rows


if __name__ == "__main__":
    main()
