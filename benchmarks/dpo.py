"""DPO with LoRA: the `peftkit train` CLI against TRL's DPOTrainer + PEFT, same model, data, steps and settings.

    python -m benchmarks.dpo            # 16 steps of 2 pairs: ~6 min on 2 idle cores
    python -m benchmarks.dpo --quick    # 3 steps: a smoke test

The job: smollm2-135m, the first 64 pairs of LLaMA-Factory's dpo_en_demo, sequences cut at 512 tokens, LoRA r8
alpha 16 dropout 0 on q_proj,v_proj, 2 pairs per step, lr 5e-6 constant, beta 0.1, sigmoid loss, the reference = the
base with the adapter disabled on both sides (TRL's default for a PEFT model; reference log-probs computed in each
step on both sides), seed 42. Precision: what peftkit picks for this CPU (bf16 with avx512_bf16); TRL gets bf16=True
(autocast) on the same CPUs, fp32 elsewhere. Each side is one process, timed from spawn to exit; its peak RSS read by
wait4. Tokens/s is each side's own count of real (non-padding) tokens trained, over its training loop's time.
Writes benchmarks/results/dpo.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.train_job import REPO, describe_machine, machine, peftkit_command, spawn

SHARED = Path(os.environ.get("PEFTKIT_TEST_DATA") or REPO.parent / "shared" / "data")
JOB = dict(pairs=64, cutoff_len=512, batch=2, lr=5e-6, beta=0.1, seed=42)


def child_trl(a: argparse.Namespace) -> None:
    """TRL's DPOTrainer + PEFT, as its documentation sets it up, on the same rows and settings."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = json.loads((SHARED / "dpo_en_demo.json").read_text())[: JOB["pairs"]]
    role = {"human": "user", "gpt": "assistant", "system": "system"}

    def example(row: dict) -> dict:
        prompt = [{"role": role[m["from"]], "content": m["value"]} for m in row["conversations"]]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]}

    args = DPOConfig(output_dir=a.output_dir, per_device_train_batch_size=JOB["batch"], max_steps=a.steps,
                     learning_rate=JOB["lr"], lr_scheduler_type="constant", beta=JOB["beta"], loss_type=["sigmoid"],
                     max_length=JOB["cutoff_len"], seed=JOB["seed"], use_cpu=True, save_strategy="no",
                     report_to="none", logging_steps=1, bf16=a.bf16, dataloader_num_workers=0, weight_decay=0.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([example(r) for r in rows]),
                         processing_class=tok,
                         peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "v_proj"]))
    out = trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    Path(a.result).write_text(json.dumps({
        "train_runtime": out.metrics["train_runtime"], "steps": out.global_step,
        "tokens": max(e.get("num_tokens", 0) for e in logs), "first_loss": logs[0]["loss"],
        "last_loss": logs[-1]["loss"], "last_accuracy": logs[-1].get("rewards/accuracies")}))


def run(quick: bool = False) -> dict:
    from peftkit.models import resolve_model_path
    from peftkit.precision import base_dtype

    steps = 3 if quick else 16
    info = machine()
    bf16 = str(base_dtype(None, False, "cpu")) == "torch.bfloat16"
    model = resolve_model_path("smollm2-135m")
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    out = tmp / "peftkit"
    overrides = [f"model_name_or_path={model}", "stage=dpo", "pref_loss=sigmoid", f"pref_beta={JOB['beta']}",
                 "dataset=dpo_en_demo", f"dataset_dir={SHARED}", f"max_samples={JOB['pairs']}",
                 f"cutoff_len={JOB['cutoff_len']}", "finetuning_type=lora", "lora_rank=8", "lora_alpha=16",
                 "lora_dropout=0.0", "lora_target=q_proj,v_proj", f"per_device_train_batch_size={JOB['batch']}",
                 f"learning_rate={JOB['lr']}", "lr_scheduler_type=constant", f"max_steps={steps}",
                 f"seed={JOB['seed']}", "logging_steps=1", "save_steps=100000", f"output_dir={out}",
                 "overwrite_output_dir=true"]
    print(f"DPO LoRA, {steps} steps of {JOB['batch']} pairs; {describe_machine(info)}")
    # the dataset cache is made first, untimed (a one-off cost, as the model conversion)
    spawn("peftkit (warm)", peftkit_command("train", *overrides, "max_steps=1"), tmp / "warm.log", quiet=True)
    runs = {"peftkit": spawn("peftkit", peftkit_command("train", *overrides), tmp / "peftkit.log")}
    mine = json.loads((out / "train_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    runs["peftkit"].update(loop_s=mine["train_runtime"], tokens_per_s=mine["train_tokens_per_second"],
                           first_loss=log[0]["loss"], last_loss=log[-1]["loss"],
                           last_accuracy=log[-1].get("rewards/accuracies"))
    result = tmp / "trl.json"
    command = [sys.executable, "-m", "benchmarks.dpo", "--child", "--model", model, "--steps", str(steps),
               "--output-dir", str(tmp / "trl"), "--result", str(result)] + (["--bf16"] if bf16 else [])
    runs["TRL DPOTrainer + PEFT"] = spawn("TRL DPOTrainer", command, tmp / "trl.log")
    theirs = json.loads(result.read_text())
    runs["TRL DPOTrainer + PEFT"].update(loop_s=round(theirs["train_runtime"], 2),
                                         tokens_per_s=round(theirs["tokens"] / theirs["train_runtime"], 1),
                                         first_loss=theirs["first_loss"], last_loss=theirs["last_loss"],
                                         last_accuracy=theirs["last_accuracy"])
    record = {"machine": info, "job": {**JOB, "steps": steps, "bf16": bf16}, "runs": runs}
    if not quick:
        path = REPO / "benchmarks" / "results" / "dpo.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    runs = record["runs"]
    trl = runs["TRL DPOTrainer + PEFT"]
    lines = [f"{describe_machine(record['machine'])}; {record['job']['steps']} steps of {record['job']['batch']} "
             f"pairs, bf16: {record['job']['bf16']}", "",
             "| run | wall s | loop s | tokens/s | x TRL | peak RSS MiB | x TRL | first loss | last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model"), parser.add_argument("--steps", type=int), parser.add_argument("--result")
    parser.add_argument("--output-dir"), parser.add_argument("--bf16", action="store_true")
    a = parser.parse_args(argv)
    if a.child:
        child_trl(a)
    else:
        run(a.quick)


if __name__ == "__main__":
    main()
