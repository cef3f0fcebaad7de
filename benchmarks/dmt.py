"""Data composition: which mix of specialised and general SFT data keeps both abilities (DMT's question).

    python -m benchmarks.dmt              # 7 runs of 64 steps each, ~25 min on 2 cores
    python -m benchmarks.dmt --steps 8    # a smoke test (no JSON written)

Model: smollm2-135m with LoRA (r16, alpha 32, every linear layer), batch 8, lr 2e-4 cosine with 5% warm-up (restarted
in each phase, as DMT trains), cutoff_len 256, seed 42: the settings of examples/dmt.yaml. Every strategy trains the
same number of optimizer steps (`--steps`, default 64); a two-phase strategy gives half to each phase.

Data (examples/data): specialised = arithmetic_sft ("What is 13 + 14?" -> "27", 546 problems) and identity (91 rows);
general = alpaca_general (240 alpaca_en_demo rows). Measured after training, each ability apart:
- arithmetic: exact-match accuracy of `peftkit predict` (greedy, 8 new tokens) on the 64 held-out problems of
  arithmetic_sft_test (the answer, stripped, must equal the number);
- general instruction following: `peftkit eval`'s loss on alpaca_general_test (100 other alpaca_en_demo rows).

Strategies: general only; specialised only; multi-task (all three sets concatenated and shuffled); sequential
(specialised, then general); DMT with k in {0, 1/4, 1} (specialised, then general plus k of each specialised set,
drawn by interleave_probs from k: n_general : k*n_arithmetic : k*n_identity, with interleave_under). DMT with k = 0 is
the sequential recipe itself, so it is trained once and reported on both rows. The base model without an adapter is
the first row. Writes benchmarks/results/dmt.json, docs/dmt.png, and prints the markdown table of docs/dmt.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.train_job import REPO, describe_machine, machine

DATA = REPO / "examples" / "data"
SPECIALISED = ["arithmetic_sft", "identity"]
GENERAL = "alpaca_general"
SHARED = dict(model_name_or_path="smollm2-135m", finetuning_type="lora", lora_rank=16, lora_alpha=32, lora_target="all",
              dataset_dir=str(DATA), cutoff_len=256, per_device_train_batch_size=8, learning_rate=2e-4,
              lr_scheduler_type="cosine", warmup_ratio=0.05, logging_steps=8, save_steps=100000, seed=42,
              overwrite_output_dir=True, plot_loss=False)
KS = {"0": 0.0, "1/4": 0.25, "1": 1.0}


def sizes() -> dict[str, int]:
    from peftkit.data import load_conversations

    _, report = load_conversations([GENERAL, *SPECIALISED], str(DATA))
    return {name: s.loaded for name, s in report.datasets.items()}


def dmt_probs(k: float, n: dict[str, int]) -> list[float]:
    """Draw shares that take about k of each specialised set while the general set is used up once."""
    weights = [n[GENERAL], *(k * n[s] for s in SPECIALISED)]
    return [w / sum(weights) for w in weights]


def strategies(steps: int, n: dict[str, int]) -> dict[str, list[dict]]:
    """name -> phases (a list of per-phase settings); one phase is a plain run."""
    half = steps // 2
    specialised = {"dataset": ",".join(SPECIALISED), "max_steps": half}
    plans = {
        "general only": [{"dataset": GENERAL, "max_steps": steps}],
        "specialised only": [{"dataset": ",".join(SPECIALISED), "max_steps": steps}],
        "multi-task mix": [{"dataset": ",".join([GENERAL, *SPECIALISED]), "max_steps": steps}],
        "sequential (= DMT k=0)": [specialised, {"dataset": GENERAL, "max_steps": steps - half}],
    }
    for label, k in KS.items():
        if k:
            plans[f"DMT k={label}"] = [specialised, {
                "dataset": ",".join([GENERAL, *SPECIALISED]), "mix_strategy": "interleave_under",
                "interleave_probs": dmt_probs(k, n), "max_steps": steps - half}]
    return plans


def train(name: str, phases: list[dict], out: Path) -> float:
    from peftkit.config import Recipe, load_recipe
    from peftkit.train import run_sft
    from peftkit.train.recipe import run_recipe

    values = {**SHARED, "output_dir": str(out)}
    if len(phases) == 1:
        values.update(phases[0])
    else:
        values["phases"] = phases
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    start = time.perf_counter()
    loaded = load_recipe(path)
    run_recipe(loaded) if isinstance(loaded, Recipe) else run_sft(loaded)
    return time.perf_counter() - start


def measure(adapter: Path | None, work: Path) -> dict[str, float]:
    """Arithmetic exact-match accuracy (predict) and the general held-out loss (eval), the adapter's or the base's."""
    from peftkit.config import load_config
    from peftkit.evaluate import run_eval, run_predict

    common = [f"model_name_or_path={SHARED['model_name_or_path']}", f"dataset_dir={DATA}", "cutoff_len=256",
              "per_device_eval_batch_size=16", *([f"adapter_name_or_path={adapter}"] if adapter else [])]
    out = work / "predict"
    run_predict(load_config(None, [*common, "eval_dataset=arithmetic_sft_test", "max_new_tokens=8",
                                   f"output_dir={out}", "do_train=false"]))
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    correct = sum(r["predict"].strip() == r["label"].strip() for r in rows)
    loss = run_eval(load_config(None, [*common, "eval_dataset=alpaca_general_test", f"output_dir={work / 'eval'}",
                                       "do_train=false"]))["eval_loss"]
    return {"arithmetic_accuracy": round(correct / len(rows), 4), "general_loss": round(loss, 4),
            "arithmetic_problems": len(rows)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["general_loss"], 100 * r["arithmetic_accuracy"], s=40)
        ax.annotate(r["strategy"], (r["general_loss"], 100 * r["arithmetic_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("general: held-out alpaca loss (lower is better)")
    ax.set_ylabel("specialised: arithmetic exact match (%)")
    ax.invert_xaxis()  # better to the right, as accuracy is better upwards
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(record: dict) -> str:
    lines = ["| strategy | arithmetic exact match | general held-out loss | train s |", "|---|---|---|---|"]
    for r in record["results"]:
        train_s = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "-"
        lines.append(f"| {r['strategy']} | {100 * r['arithmetic_accuracy']:.1f}% "
                     f"({round(r['arithmetic_accuracy'] * r['arithmetic_problems'])}/{r['arithmetic_problems']}) "
                     f"| {r['general_loss']:.4f} | {train_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps of every strategy (default 64)")
    parser.add_argument("--only", help="run only the strategies whose name contains this text")
    args = parser.parse_args()
    n = sizes()
    plans = strategies(args.steps, n)
    results = []
    with tempfile.TemporaryDirectory(prefix="peftkit-dmt-") as tmp:
        work = Path(tmp)
        if not args.only:
            results.append({"strategy": "base model (no training)", "train_s": None, **measure(None, work / "base")})
            print(results[-1], flush=True)
        for i, (name, phases) in enumerate(plans.items()):
            if args.only and args.only not in name:
                continue
            out = work / f"run{i}"
            seconds = train(name, phases, out)
            results.append({"strategy": name, "phases": phases, "train_s": round(seconds, 1),
                            **measure(out, work / f"measure{i}")})
            print(results[-1], flush=True)
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "steps": args.steps, "sizes": n,
              "settings": SHARED, "results": results}
    print(f"\n{describe_machine(record['machine'])}; {args.steps} steps per strategy\n")
    print(table(record))
    if args.steps >= 32 and not args.only:
        (REPO / "benchmarks" / "results" / "dmt.json").write_text(json.dumps(record, indent=1) + "\n")
        plot(results, REPO / "docs" / "dmt.png")


if __name__ == "__main__":
    main()
