"""Every fine-tuning method on one model, one data split and one token budget, measured on one machine in one run.

    python benchmarks/methods.py                  # all methods (long: see --help for the budget)
    python benchmarks/methods.py --quick          # smoke test: 2 steps per method, 16 eval rows
    python benchmarks/methods.py --only lora,ia3  # a subset
    python benchmarks/methods.py --only qlora --update  # add or redo rows in the existing results

Model `smollm2-135m`; data `alpaca_en_demo` (../shared/data): its first 800 rows train, the remaining rows evaluate.
Every run trains the same examples in the same order (same seed, batch size, accumulation and steps), so each method
gets the same token budget; LoRA-drop also spends its selection phase, which its tokens/s includes. The incumbent,
transformers.Trainer + PEFT LoRA with the LoRA row's settings, runs in the same invocation for reference.

Each run is a fresh subprocess (its peak RSS is its own). Writes benchmarks/results/methods.json, docs/methods.md
(the table) and docs/methods_eval_loss.png (eval loss against training tokens, one curve per method).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS = 800
# glibc raises its mmap threshold each time a big block is freed, so later tensors come from a heap that fragments
# and never shrinks: peak RSS then measures the allocator as much as the method. Fixing it shows live memory.
FIXED_MMAP_THRESHOLD = 128 * 1024
FIXED_MALLOC_SUFFIX = " (fixed malloc)"

# name -> (finetuning_type and its keys, learning rate). Learning rates are each method's usual order of magnitude
# for a short run (full and freeze move every weight of a layer: far lower), not tuned per method on this data.
METHODS: dict[str, dict] = {
    "lora": dict(finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_target="all", learning_rate=1e-3),
    "rslora": dict(finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_target="all", use_rslora=True,
                   learning_rate=1e-3),
    "dora": dict(finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_target="all", use_dora=True,
                 learning_rate=1e-3),
    "lora+": dict(finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_target="all", loraplus_lr_ratio=16,
                  learning_rate=1e-3),
    # QLoRA: the LoRA row on a base whose linear layers are 4-bit NF4 with double quantization
    "qlora": dict(finetuning_type="lora", lora_rank=8, lora_alpha=16, lora_target="all", quantization_bit=4,
                  learning_rate=1e-3),
    "lora_drop": dict(finetuning_type="lora_drop", lora_rank=8, lora_alpha=16, lora_target="all",
                      lora_drop_sample_ratio=0.05, lora_drop_threshold=0.9, learning_rate=1e-3),
    # tinit and tfinal: a sixth of the steps each (set in main), so the budget falls during the middle two thirds
    "adalora": dict(finetuning_type="adalora", init_r=12, target_r=8, lora_alpha=16, lora_target="all", deltaT=1,
                    learning_rate=1e-3),
    "ia3": dict(finetuning_type="ia3", learning_rate=1e-2),
    "ssf": dict(finetuning_type="ssf", learning_rate=1e-3),
    "bitfit": dict(finetuning_type="bitfit", learning_rate=5e-3),
    "houlsby": dict(finetuning_type="adapter", adapter_type="houlsby", reduction_factor=16, learning_rate=1e-3),
    "pfeiffer": dict(finetuning_type="adapter", adapter_type="pfeiffer", reduction_factor=16, learning_rate=1e-3),
    "freeze": dict(finetuning_type="freeze", freeze_trainable_layers=2, learning_rate=5e-5),
    "full": dict(finetuning_type="full", learning_rate=2e-5),
    # virtual tokens: PEFT's example learning rates, except prefix tuning (its 1e-2 diverged on this model)
    "prompt_tuning": dict(finetuning_type="prompt_tuning", num_virtual_tokens=20, learning_rate=3e-2),
    "p_tuning": dict(finetuning_type="p_tuning", num_virtual_tokens=20, learning_rate=1e-3),
    "prefix_tuning": dict(finetuning_type="prefix_tuning", num_virtual_tokens=20, learning_rate=3e-3),
    "p_tuning_v2": dict(finetuning_type="p_tuning_v2", num_virtual_tokens=20, learning_rate=1e-2),
}


# --------------------------------------------------------------------------------------------- data
def write_split(data_dir: Path, out: Path, eval_rows: int | None) -> None:
    """alpaca_en_demo -> a train file (first 800 rows) and an eval file (the rest, or its first `eval_rows`),
    registered in dataset_info.json."""
    rows = json.loads((data_dir / "alpaca_en_demo.json").read_text())
    (out / "train.json").write_text(json.dumps(rows[:TRAIN_ROWS]))
    (out / "eval.json").write_text(json.dumps(rows[TRAIN_ROWS:][:eval_rows]))
    info = {name: {"file_name": f"{name}.json"} for name in ("train", "eval")}
    (out / "dataset_info.json").write_text(json.dumps(info))


def common_keys(args, data: Path, output_dir: str) -> dict:
    return dict(model_name_or_path="smollm2-135m", dataset="train", eval_dataset="eval", dataset_dir=str(data),
                cutoff_len=args.cutoff_len, max_samples=args.eval_rows_cap, output_dir=output_dir,
                overwrite_output_dir=True, per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                max_steps=args.steps, lr_scheduler_type="cosine", warmup_ratio=0.1, logging_steps=1,
                eval_strategy="steps", eval_steps=max(1, args.steps // args.eval_points), save_strategy="no",
                seed=args.seed)


# --------------------------------------------------------------------------------------------- one run (child)
def child_peftkit(spec: dict) -> dict:
    from peftkit.config import load_config
    from peftkit.train.run import run_sft

    cfg = load_config(None, **spec["keys"])
    results = run_sft(cfg)
    log = [json.loads(line) for line in open(Path(cfg.output_dir) / "trainer_log.jsonl") if line.strip()]
    return dict(results, log=log)


def child_base_eval(spec: dict) -> dict:
    """The base model's eval loss, through the trainer's own evaluation code."""
    from peftkit.config import load_config
    from peftkit.data import SFTCollator, build_sft_dataset
    from peftkit.models import load_model_and_tokenizer
    from peftkit.train.trainer import token_loss_sum

    cfg = load_config(None, **spec["keys"])
    model, tok = load_model_and_tokenizer(cfg.model_name_or_path, quantization=cfg.quantization())
    _, eval_rows = build_sft_dataset(tok, cfg.dataset, cfg.dataset_dir, cutoff_len=cfg.cutoff_len,
                                     eval_dataset=cfg.eval_dataset, max_samples=cfg.max_samples, seed=cfg.seed)
    collate = SFTCollator(tok.pad_token_id, padding_free=True)
    total = count = 0
    with torch.no_grad():
        for i in range(0, len(eval_rows), cfg.per_device_eval_batch_size):
            loss, n = token_loss_sum(model, collate(eval_rows[i:i + cfg.per_device_eval_batch_size]))
            total, count = total + loss.item(), count + n
    return {"eval_loss": total / count, "eval_rows": len(eval_rows)}


def child_hf(spec: dict) -> dict:
    """transformers.Trainer + PEFT LoRA on the same tokenized rows, order, schedule and evaluation rows."""
    import datasets
    import peft
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    import peftkit.models
    from peftkit.config import load_config
    from peftkit.data import SFTCollator, build_sft_dataset
    from peftkit.train.trainer import token_loss_sum

    cfg = load_config(None, **spec["keys"])
    tok = peftkit.models.load_tokenizer(cfg.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(peftkit.models.resolve_model_path(cfg.model_name_or_path),
                                                 dtype=torch.float32)
    model.config.use_cache = False
    train_rows, eval_rows = build_sft_dataset(tok, cfg.dataset, cfg.dataset_dir, cutoff_len=cfg.cutoff_len,
                                              eval_dataset=cfg.eval_dataset, max_samples=cfg.max_samples, seed=cfg.seed)
    bs, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    order: list[int] = []
    epoch = 0
    while len(order) < cfg.max_steps * bs * ga:  # peftkit's order: a seeded permutation per epoch
        order += torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        epoch += 1
    torch.manual_seed(cfg.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    collate = SFTCollator(tok.pad_token_id, padding_free=True)  # the same evaluation as peftkit's
    log: list[dict] = []
    seen = {"tokens": 0, "eval_s": 0.0}

    def evaluate() -> float:
        start = time.perf_counter()
        total = count = 0
        model.eval()
        with torch.no_grad():
            for i in range(0, len(eval_rows), bs):
                loss, n = token_loss_sum(model, collate(eval_rows[i:i + bs]))
                total, count = total + loss.item(), count + n
        model.train()
        seen["eval_s"] += time.perf_counter() - start
        return total / count

    class EvalEvery(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cfg.eval_steps == 0 or state.global_step == cfg.max_steps:
                log.append({"step": state.global_step, "eval_loss": evaluate()})

    def count_tokens(_module, _args, kwargs):
        if torch.is_grad_enabled():
            seen["tokens"] += kwargs["input_ids"].numel()

    model.get_base_model().register_forward_pre_hook(count_tokens, with_kwargs=True)
    args = TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps), weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", seed=cfg.seed,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([train_rows[i] for i in order]),
                      data_collator=DataCollatorWithFlattening(), callbacks=[EvalEvery()])
    start = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - start  # evaluations included, as in peftkit's train_runtime
    trainable, total = model.get_nb_trainable_parameters()
    log += [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    return {"train_runtime": runtime, "train_tokens_per_second": seen["tokens"] / (runtime - seen["eval_s"]),
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": trainable, "all_params": total, "log": log}


def child_footprint(spec: dict) -> dict:
    """The weights' memory (base + adapter tensors, no training) for rows measured before runs reported it."""
    from peftkit.config import load_config
    from peftkit.models import load_model
    from peftkit.precision import base_dtype
    from peftkit.quantization import model_bytes
    from peftkit.tuned import TunedModel

    cfg = load_config(None, **spec["keys"])
    model = load_model(cfg.model_name_or_path, dtype=base_dtype(cfg.bf16, cfg.fp16, "cpu"),
                       quantization=cfg.quantization())
    if spec["name"] == "hf-peft-lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                           target_modules="all-linear"))
    else:
        model = TunedModel(model, cfg.method_config())
    return {"model_memory_mb": round(model_bytes(model) / 2**20, 1)}


def child(spec: dict) -> None:
    fn = {"peftkit": child_peftkit, "base": child_base_eval, "hf": child_hf, "footprint": child_footprint}[spec["impl"]]
    Path(spec["result_path"]).write_text(json.dumps(fn(spec)))


# --------------------------------------------------------------------------------------------- orchestration
def spawn(spec: dict, tmp: str) -> dict | None:
    spec = dict(spec, result_path=tempfile.mktemp(dir=tmp, suffix=".json"))
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **spec.get("env", {}))
    print(f"  {spec['name']:<14}", end=" ", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(f"FAILED ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return {"name": spec["name"], "failed": proc.stderr[-3000:]}
    result = json.loads(Path(spec["result_path"]).read_text())
    result.update(name=spec["name"], process_s=round(time.perf_counter() - start, 1))
    if "model_memory_mb" in result and "log" not in result:
        print(f"weights {result['model_memory_mb']:.0f} MiB")
    elif "train_tokens_per_second" in result:
        print(f"{result['train_tokens_per_second']:7.1f} tok/s, {result['peak_memory_mb']:.0f} MiB, "
              f"eval {final_eval(result):.4f} ({result['process_s']:.0f} s)")
    else:
        print(f"eval loss {result['eval_loss']:.4f} on {result['eval_rows']} rows")
    return result


def final_eval(run: dict) -> float | None:
    evals = [e["eval_loss"] for e in run.get("log", []) if "eval_loss" in e]
    return evals[-1] if evals else None


def start_loss(record: dict, run: dict) -> float:
    """Eval loss before training: the base model's, or the 4-bit base's for QLoRA (what it starts from)."""
    if run["name"].startswith("qlora") and "base_eval_loss_4bit" in record:
        return record["base_eval_loss_4bit"]
    return record["base_eval_loss"]


def tokens_per_step(args) -> int:
    return args.batch_size * args.grad_accum


def write_docs(record: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in record["runs"] if "failed" not in r]
    base = record["base_eval_loss"]
    ref = next((r for r in runs if r["name"] == "hf-peft-lora"), None)
    lines = ["| method | trainable params | trainable % | weights MiB | peak RSS MiB | tokens/s | x HF+PEFT LoRA "
             "| eval loss before | eval loss after | change |", "|" + "---|" * 10]
    for r in runs:
        before, after = start_loss(record, r), final_eval(r)
        speed = r["train_tokens_per_second"] / ref["train_tokens_per_second"] if ref else None
        lines.append(f"| {r['name']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['all_params']:.3f} "
                     f"| {r.get('model_memory_mb', float('nan')):.0f} | {r['peak_memory_mb']:.0f} "
                     f"| {r['train_tokens_per_second']:.0f} | "
                     f"{'-' if speed is None else f'{speed:.2f}'} | {before:.4f} | {after:.4f} | "
                     f"{(after - before) / before:+.1%} |")
    failed = [r["name"] for r in record["runs"] if "failed" in r]
    by_name = {r["name"]: r for r in runs}
    tradeoff = ""
    if "lora" in by_name and "qlora" in by_name and "base_eval_loss_4bit" in record and all(
            "model_memory_mb" in r for r in (by_name["lora"], by_name["qlora"])):
        lo, q = by_name["lora"], by_name["qlora"]
        base_4bit = record["base_eval_loss_4bit"]
        tradeoff = (
            "\n**QLoRA against LoRA** (same settings; the base's linear layers in 4-bit NF4 with double quantization): "
            f"weights {q['model_memory_mb']:.0f} MiB instead of {lo['model_memory_mb']:.0f} "
            f"({q['model_memory_mb'] / lo['model_memory_mb']:.0%}; the embeddings stay in full precision), peak RSS "
            f"{q['peak_memory_mb']:.0f} MiB against {lo['peak_memory_mb']:.0f}, "
            f"{q['train_tokens_per_second'] / lo['train_tokens_per_second']:.2f}x LoRA's tokens/s. Quantizing costs "
            f"quality before any training: the 4-bit base's eval loss is {base_4bit:.4f} against "
            f"{base:.4f}; after training, QLoRA reaches {final_eval(q):.4f} "
            f"({(final_eval(q) - base_4bit) / base_4bit:+.1%} on its own base), "
            f"LoRA {final_eval(lo):.4f}.")
        fixed = [by_name.get(n + FIXED_MALLOC_SUFFIX) for n in ("lora", "qlora")]
        if all(fixed):
            tradeoff += (
                f" Peak RSS with glibc's default allocator measures fragmentation as much as tensors (it keeps freed "
                f"blocks in a heap that never shrinks); with the mmap threshold fixed (`--fixed-malloc`, rows "
                f"'{FIXED_MALLOC_SUFFIX.strip()}'), which returns freed tensors to the OS, the same runs peak at "
                f"{fixed[1]['peak_memory_mb']:.0f} MiB for QLoRA and {fixed[0]['peak_memory_mb']:.0f} MiB for LoRA, at "
                f"{fixed[1]['train_tokens_per_second']:.0f} and {fixed[0]['train_tokens_per_second']:.0f} tokens/s.")
        tradeoff += "\n"
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab20.colors  # 20 distinct colours; line style and marker tell the rest apart
    plotted = [r for r in runs if not r["name"].endswith(FIXED_MALLOC_SUFFIX)]  # same losses as their default row
    for i, r in enumerate(plotted):
        points = [(0, start_loss(record, r))] + [(e["step"], e["eval_loss"]) for e in r["log"] if "eval_loss" in e]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="osD^v"[i % 5], color=colors[i % 20],
                linestyle=("-", "--", ":")[i // 20 % 3], label=r["name"])
    examples_per_step = record["settings"]["batch_size"] * record["settings"]["grad_accum"]
    ax.set_xlabel(f"optimizer step ({examples_per_step} examples each)")
    ax.set_ylabel("eval loss")
    ax.set_title("smollm2-135m on alpaca_en_demo: eval loss per method")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    fig.savefig(docs / "methods_eval_loss.png", dpi=110)
    s = record["settings"]
    m = record["machine"]
    quick = " --quick" if s["quick"] else ""
    updated = f" (rows added {record['updated'][:10]})" if record.get("updated") else ""
    smoke = ("\n**This is a smoke run (`--quick`): too few steps for the losses to mean much.**\n"
             if s["quick"] else "")
    failures = "" if not failed else "\nFailed: " + ", ".join(failed) + " (see benchmarks/results/methods.json).\n"
    # The backslashes at line ends continue the text's line: the generated file keeps its long lines.
    text = f"""# Every method, one machine, one run

`python benchmarks/methods.py{quick}` on {record['date'][:10]}{updated}: {m['cpu']}, {m['cores']} cores,
torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}. Total {record['total_wall_s'] / 60:.0f} min.

Model `smollm2-135m` (SmolLM2-135M-Instruct); data `alpaca_en_demo`: its first {TRAIN_ROWS} rows train, the next
{record['eval_rows']} rows evaluate. Every method trains the same {s['steps']} optimizer steps of
{s['batch_size']} x {s['grad_accum']} examples in the same order (cutoff_len {s['cutoff_len']}, cosine schedule,
10% warm-up, seed {s['seed']}); learning rates are each method's usual order of magnitude, not tuned here (see
`METHODS` in the script). Eval loss is the mean token loss on the answer tokens of the eval rows; "before" is the
base model (for QLoRA, the 4-bit base). Weights MiB is what the model's tensors hold (base and adapter, \
quantization constants included);
tokens/s counts real tokens over the training time (evaluations left out); peak RSS is the
process's (evaluation runs at the training batch size, so this is the training peak). "x HF+PEFT LoRA" \
compares with transformers.Trainer + PEFT LoRA (same settings as the `lora` row,
padding-free collation) run in the same invocation.
{smoke}
{chr(10).join(lines)}
{tradeoff}{failures}
![eval loss per method](methods_eval_loss.png)
"""
    (docs / "methods.md").write_text(text)


SETTINGS_THAT_MATTER = ("steps", "batch_size", "grad_accum", "cutoff_len", "eval_points", "eval_rows", "quick", "seed")


def previous_record(out: Path, record: dict) -> dict:
    """The saved results, refreshed with today's machine facts, provided they were measured with the same budget."""
    if not out.exists():
        raise SystemExit(f"--update needs {out}; run without --update first.")
    old = json.loads(out.read_text())
    differ = [k for k in SETTINGS_THAT_MATTER if old["settings"].get(k) != record["settings"][k]]
    if differ:
        raise SystemExit(f"--update: {out} was measured with other settings ({', '.join(differ)}: "
                         f"{[old['settings'].get(k) for k in differ]}); pass the same ones or rerun everything.")
    if old["machine"] != record["machine"]:
        print(f"warning: {out} was measured with {old['machine']}; now {record['machine']}", file=sys.stderr)
    old["updated"] = record["date"]
    return old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per method (same examples for every one)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--eval-points", type=int, default=3, help="evaluations during training, evenly spaced")
    p.add_argument("--eval-rows", type=int, help="evaluate on the first N held-out rows only (default: all 199)")
    p.add_argument("--only", help="comma-separated method names (default: all, plus the HF+PEFT reference)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers.Trainer + PEFT reference run")
    p.add_argument("--update", action="store_true",
                   help="keep the other rows of benchmarks/results/methods.json (same settings required) and add or "
                        "replace these; the base eval is reused")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 16 eval rows")
    p.add_argument("--fixed-malloc", action="store_true",
                   help=f"run with glibc's mmap threshold fixed at {FIXED_MMAP_THRESHOLD // 1024} KiB, so freed "
                        f"tensors go back to the OS and peak RSS tracks live memory; rows are named '<method>"
                        f"{FIXED_MALLOC_SUFFIX}'")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    args.eval_rows_cap = None
    if args.quick:
        args.steps, args.eval_points, args.eval_rows_cap = 2, 1, 16
    names = args.only.split(",") if args.only else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    import peft
    import transformers

    started = time.time()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "child"}, "runs": []}
    out = REPO / "benchmarks" / "results" / "methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    elapsed = 0.0
    if args.update:
        record = previous_record(out, record)
        elapsed = record.get("total_wall_s", 0.0)
    with tempfile.TemporaryDirectory(prefix="methods_bench_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_split(Path(args.data_dir), data, args.eval_rows)
        if "base_eval_loss" not in record:
            base = spawn({"impl": "base", "name": "base model", "keys": common_keys(args, data, f"{tmp}/base")}, tmp)
            record.update(base_eval_loss=base["eval_loss"], eval_rows=base["eval_rows"])
        if "qlora" in names and "base_eval_loss_4bit" not in record:
            keys = dict(common_keys(args, data, f"{tmp}/base4"), quantization_bit=4)
            base4 = spawn({"impl": "base", "name": "4-bit base", "keys": keys}, tmp)
            record["base_eval_loss_4bit"] = base4["eval_loss"]
        METHODS["adalora"].update(tinit=args.steps // 6, tfinal=args.steps // 6)
        specs = [("hf", "hf-peft-lora", METHODS["lora"])] if not args.no_hf else []
        specs += [("peftkit", name, METHODS[name]) for name in names]
        env = {"MALLOC_MMAP_THRESHOLD_": str(FIXED_MMAP_THRESHOLD)} if args.fixed_malloc else {}
        for impl, name, method_keys in specs:
            name += FIXED_MALLOC_SUFFIX if args.fixed_malloc else ""
            keys = dict(common_keys(args, data, f"{tmp}/{name}"), **method_keys)
            result = spawn({"impl": impl, "name": name, "keys": keys, "env": env}, tmp)
            record["runs"] = [r for r in record["runs"] if r["name"] != name] + [result]
            record["total_wall_s"] = round(elapsed + time.time() - started, 1)
            out.write_text(json.dumps(record, indent=2) + "\n")  # results so far survive an interrupted run
            write_docs(record, REPO / "docs")
        for run in [r for r in record["runs"] if "failed" not in r and "model_memory_mb" not in r]:
            method = run["name"].removesuffix(FIXED_MALLOC_SUFFIX)
            keys = dict(common_keys(args, data, f"{tmp}/fp"), **METHODS["lora" if method == "hf-peft-lora" else method])
            footprint = spawn({"impl": "footprint", "name": run["name"], "keys": keys}, tmp)
            run["model_memory_mb"] = footprint["model_memory_mb"]
        out.write_text(json.dumps(record, indent=2) + "\n")
        write_docs(record, REPO / "docs")
    print(f"Wrote {out}, docs/methods.md and docs/methods_eval_loss.png ({record['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
