"""GRPO with LoRA: rollout speed and step time of `peftkit train` (stage: grpo) against TRL's GRPOTrainer + PEFT.

    python -m benchmarks.grpo                 # 6 steps of 2 prompts x 4 completions: ~10 min on 2 idle cores
    python -m benchmarks.grpo --quick         # 2 steps: a smoke test (no JSON written)
    python -m benchmarks.grpo --only trl      # one side (trl or peftkit), while developing

The job, the same on both sides: smollm2-135m (the built-in alias's safetensors folder, which both load), the first 16
rows of examples/data/arithmetic.json rendered by the tokenizer's own chat template (system + user turns; TRL gets
them as conversational prompts), 2 prompts per step x num_generations 4 = 8 completions per step (TRL counts its
per_device_train_batch_size in completions: 8), at most 48 new tokens sampled at temperature 1.0, top_p 1.0, no top-k,
LoRA r8 alpha 16 dropout 0 on q_proj,v_proj, lr 1e-5 constant, beta 0 (no reference model), loss_type dapo, epsilon
0.2, num_iterations 1, scale_rewards group, one reward (accuracy: the completion's final number equals the row's
`answer`), seed 42, 6 steps. Precision: bf16 where the CPU has avx512_bf16 (TRL: bf16=True, autocast; peftkit picks
its own), fp32 elsewhere.

Each side is one process timed from spawn to exit, with its peak RSS (os.wait4). Step time: the mean time between
the ends of consecutive steps from step 1's end on (step 1 is a warm-up and left out) when there are more than 2
steps; with 2 or fewer, the training loop's time over its steps. TRL's step ends come from a callback's on_step_end;
peftkit's from the moment each step's line appears in its trainer_log.jsonl (this process polls it every 20 ms).
Rollout tokens/s = completion tokens generated (EOS included, as both sides count them) / seconds spent generating:
TRL's is timed by wrapping GRPOTrainer._generate_single_turn (the prompts already tokenized: padding, model.generate and
the cut at EOS), peftkit's is its own rollout_tokens / rollout_seconds. Writes benchmarks/results/grpo.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.train_job import REPO, describe_machine, machine, peftkit_command, spawn

DATA = REPO / "examples" / "data"
JOB = dict(prompts=16, prompts_per_step=2, num_generations=4, max_new_tokens=48, temperature=1.0, top_p=1.0, top_k=0,
           lr=1e-5, beta=0.0, loss_type="dapo", epsilon=0.2, num_iterations=1, scale_rewards="group", seed=42)
TRL = "TRL GRPOTrainer + PEFT"
PEFTKIT = "peftkit"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


# --- TRL's side ----------------------------------------------------------------------------------------------------

def _text(completion) -> str:
    """A completion's text: TRL passes a list of messages for conversational prompts, a string otherwise."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


def accuracy(prompts, completions, answer, **kw) -> list[float]:
    """1.0 when the last number in the completion equals the row's answer, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        numbers = _NUMBER.findall(_text(c))
        try:
            ok = bool(numbers) and float(numbers[-1].replace(",", "")) == float(str(a).replace(",", ""))
        except ValueError:
            ok = bool(numbers) and numbers[-1] == str(a).strip()
        out.append(1.0 if ok else 0.0)
    return out


def child_trl(a: argparse.Namespace) -> None:
    """TRL's GRPOTrainer + PEFT as its documentation sets it up, on the same rows and settings."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = json.loads((DATA / "arithmetic.json").read_text())[: JOB["prompts"]]
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["instruction"]}],
         "answer": str(r["answer"])} for r in rows])
    args = GRPOConfig(
        output_dir=a.output_dir, max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none",
        per_device_train_batch_size=JOB["prompts_per_step"] * JOB["num_generations"],  # completions, in TRL
        gradient_accumulation_steps=1, num_generations=JOB["num_generations"],
        max_completion_length=JOB["max_new_tokens"], temperature=JOB["temperature"], top_p=JOB["top_p"],
        top_k=JOB["top_k"], learning_rate=JOB["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        beta=JOB["beta"], loss_type=JOB["loss_type"], epsilon=JOB["epsilon"], num_iterations=JOB["num_iterations"],
        scale_rewards=JOB["scale_rewards"], seed=JOB["seed"], use_cpu=True, bf16=a.bf16, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=args, train_dataset=data, processing_class=tok,
                          peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "v_proj"]))

    # Generation: GRPOTrainer._generate_single_turn (TRL 1.16) pads the tokenized prompts, runs model.generate under
    # no_grad and cuts each completion after its first EOS; it returns (completion_ids, logprobs).
    generations: list[dict] = []
    generate = trainer._generate_single_turn

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        completion_ids, logprobs = generate(*args, **kwargs)
        generations.append({"seconds": time.perf_counter() - start, "completions": len(completion_ids),
                            "tokens": sum(len(c) for c in completion_ids)})
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate

    clock: dict = {"begin": None, "step_ends": []}

    class StepClock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["begin"] = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            clock["step_ends"].append(time.perf_counter() - clock["begin"])

    trainer.add_callback(StepClock())
    out = trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    Path(a.result).write_text(json.dumps({
        "train_runtime": out.metrics["train_runtime"], "steps": out.global_step, "step_ends": clock["step_ends"],
        "generations": generations, "completions_mean_length": [e.get("completions/mean_length") for e in logs],
        "reward": [e.get("reward") for e in logs], "loss": [e.get("loss") for e in logs],
        "generate_dtype": str(next(trainer.model.parameters()).dtype)}))


# --- measurements --------------------------------------------------------------------------------------------------

def mean_step_s(step_ends: list[float], loop_s: float | None, steps: int) -> tuple[float | None, str]:
    """(mean seconds per step, how it was measured): step 1 left out when there are more than 2 step ends."""
    if len(step_ends) > 2:
        return (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1), f"steps 2-{len(step_ends)}"
    if loop_s and steps:
        return loop_s / steps, "all steps (loop time / steps)"
    return None, "unknown"


class LogWatcher:
    """Records when each new line appears in a growing jsonl file (polled), in seconds since `start()`."""

    def __init__(self, path: Path, every: float = 0.02):
        self.path, self.every, self.times = path, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> "LogWatcher":
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                lines = sum(1 for line in self.path.read_text().splitlines() if '"step"' in line)
            except OSError:
                lines = 0
            now = time.perf_counter() - self.t0
            while len(self.times) < lines:
                self.times.append(now)
            self._stop.wait(self.every)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.times


def peftkit_overrides(model: str, steps: int, out: Path) -> list[str]:
    return [f"model_name_or_path={model}", "stage=grpo", "finetuning_type=lora", "lora_rank=8", "lora_alpha=16",
            "lora_dropout=0", "lora_target=q_proj,v_proj", "dataset=arithmetic", f"dataset_dir={DATA}",
            f"max_samples={JOB['prompts']}", f"num_generations={JOB['num_generations']}",
            f"per_device_train_batch_size={JOB['prompts_per_step']}", "gradient_accumulation_steps=1",
            f"max_new_tokens={JOB['max_new_tokens']}", f"temperature={JOB['temperature']}", "reward_funcs=accuracy",
            f"grpo_beta={JOB['beta']}", f"grpo_epsilon={JOB['epsilon']}", f"loss_type={JOB['loss_type']}",
            f"num_iterations={JOB['num_iterations']}", f"scale_rewards={JOB['scale_rewards']}",
            f"learning_rate={JOB['lr']}", "lr_scheduler_type=constant", f"max_steps={steps}", "logging_steps=1",
            f"seed={JOB['seed']}", "save_steps=100000", f"output_dir={out}", "overwrite_output_dir=true"]


def parse_peftkit(out: Path, step_ends: list[float]) -> dict:
    """peftkit's numbers from its output_dir; tolerant of missing keys (each read key is listed under `read`)."""
    results = json.loads((out / "train_results.json").read_text()) if (out / "train_results.json").exists() else {}
    log_path = out / "trainer_log.jsonl"
    log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    log = [e for e in log if "loss" in e]
    read, per_completion = [], JOB["prompts_per_step"] * JOB["num_generations"]
    steps = results.get("train_steps") or (log[-1]["step"] if log else None)
    loop_s = results.get("train_runtime")
    read += [k for k in ("train_steps", "train_runtime") if k in results]
    tokens, seconds = results.get("rollout_tokens"), results.get("rollout_seconds")
    if tokens is not None and seconds:
        read += ["rollout_tokens", "rollout_seconds"]
    else:  # from the log: tokens = mean length x completions; seconds = tokens / the step's rollout tokens/s
        lengths = [e.get("completions/mean_length") for e in log]
        rates = [e.get("rollout_tokens_per_second") for e in log]
        if log and all(x is not None for x in lengths):
            step_tokens = [x * per_completion for x in lengths]
            tokens = sum(step_tokens)
            read.append("log: completions/mean_length")
            if all(rates):
                seconds = sum(t / r for t, r in zip(step_tokens, rates))
                read.append("log: rollout_tokens_per_second")
    rate = tokens / seconds if tokens and seconds else results.get("rollout_tokens_per_second")
    step_s, how = mean_step_s(step_ends, loop_s, steps or 0)
    return {"loop_s": loop_s, "steps": steps, "step_s": step_s, "step_s_over": how, "step_ends": step_ends,
            "rollout_tokens": tokens, "rollout_s": seconds, "rollout_tokens_per_s": rate,
            "mean_completion_len": _mean([e.get("completions/mean_length") for e in log]),
            "mean_reward": _mean([e.get("reward", e.get("rewards/accuracy/mean")) for e in log]),
            "read": read, "log_keys": sorted({k for e in log for k in e})}


def parse_trl(path: Path) -> dict:
    t = json.loads(path.read_text())
    tokens = sum(g["tokens"] for g in t["generations"])
    seconds = sum(g["seconds"] for g in t["generations"])
    step_s, how = mean_step_s(t["step_ends"], t["train_runtime"], t["steps"])
    return {"loop_s": round(t["train_runtime"], 2), "steps": t["steps"], "step_s": step_s, "step_s_over": how,
            "step_ends": t["step_ends"], "rollout_tokens": tokens, "rollout_s": round(seconds, 3),
            "rollout_tokens_per_s": tokens / seconds if seconds else None, "generations": t["generations"],
            "mean_completion_len": _mean(t["completions_mean_length"]), "mean_reward": _mean(t["reward"]),
            "loss": t["loss"], "model_dtype": t["generate_dtype"]}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# --- the comparison ------------------------------------------------------------------------------------------------

def run(quick: bool = False, only: str | None = None) -> dict:
    from peftkit.models import resolve_model_path

    steps = 2 if quick else 6
    info = machine()
    bf16 = bool(info["avx512_bf16"])
    model = resolve_model_path("smollm2-135m")  # the HF folder both sides load
    tmp = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    print(f"GRPO LoRA, {steps} steps of {JOB['prompts_per_step']} prompts x {JOB['num_generations']} completions, "
          f"<= {JOB['max_new_tokens']} new tokens; {describe_machine(info)}; bf16: {bf16}; logs in {tmp}")
    runs: dict[str, dict] = {}
    if only in (None, "peftkit"):
        out = tmp / "peftkit"
        overrides = peftkit_overrides(model, steps, out)
        # the dataset cache is made first, untimed (a one-off cost, as the model conversion)
        spawn("peftkit (warm)", peftkit_command("train", *overrides, "max_steps=1"), tmp / "warm.log", quiet=True)
        watcher = LogWatcher(out / "trainer_log.jsonl")
        (out / "trainer_log.jsonl").unlink(missing_ok=True)
        watcher.start()
        try:
            runs[PEFTKIT] = spawn(PEFTKIT, peftkit_command("train", *overrides), tmp / "peftkit.log")
        finally:
            ends = watcher.stop()
        runs[PEFTKIT].update(parse_peftkit(out, ends))
    if only in (None, "trl"):
        result = tmp / "trl.json"
        command = [sys.executable, "-m", "benchmarks.grpo", "--child", "--model", model, "--steps", str(steps),
                   "--output-dir", str(tmp / "trl"), "--result", str(result)] + (["--bf16"] if bf16 else [])
        runs[TRL] = spawn("TRL GRPOTrainer", command, tmp / "trl.log")
        runs[TRL].update(parse_trl(result))
    record = {"machine": info, "job": {**JOB, "steps": steps, "bf16": bf16, "model": model}, "runs": runs}
    if not quick:
        path = REPO / "benchmarks" / "results" / "grpo.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return record


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _x(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def markdown(record: dict) -> str:
    runs, job = record["runs"], record["job"]
    ref = runs.get(TRL, {})
    over = next((r["step_s_over"] for r in runs.values() if r.get("step_s_over")), "")
    loads = ", ".join(f"{n} {r['load_avg_before']:.1f} -> {r['load_avg_after']:.1f}{' *' if r['busy'] else ''}"
                      for n, r in runs.items())
    lines = [f"{describe_machine(record['machine'])}; {job['steps']} steps of {job['prompts_per_step']} prompts x "
             f"{job['num_generations']} completions, <= {job['max_new_tokens']} new tokens, bf16: {job['bf16']}; "
             f"load avg {loads}", "",
             f"| run | wall s | loop s | step s ({over}) | x TRL | rollout tok/s | x TRL | rollout tokens | "
             "rollout s | mean len | peak RSS MiB | x TRL | mean reward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {_f(r.get('loop_s'), '{:.1f}')} | {_f(r.get('step_s'), '{:.2f}')} | "
            f"{_x(ref.get('step_s'), r.get('step_s'))} | {_f(r.get('rollout_tokens_per_s'), '{:.1f}')} | "
            f"{_x(r.get('rollout_tokens_per_s'), ref.get('rollout_tokens_per_s'))} | "
            f"{_f(r.get('rollout_tokens'), '{:.0f}')} | {_f(r.get('rollout_s'), '{:.1f}')} | "
            f"{_f(r.get('mean_completion_len'), '{:.1f}')} | {r['peak_rss_mib']:.0f} | "
            f"{_x(r['peak_rss_mib'], ref.get('peak_rss_mib'))} | {_f(r.get('mean_reward'), '{:.3f}')} |")
    lines.append("")
    lines.append("x TRL: speed-up for step s and rollout tok/s (higher is better), ratio for peak RSS (lower is "
                 "better); * = load average above cores + 1 (other work competed).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps, no JSON written")
    parser.add_argument("--only", choices=["trl", "peftkit"], help="run one side only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model"), parser.add_argument("--steps", type=int), parser.add_argument("--result")
    parser.add_argument("--output-dir"), parser.add_argument("--bf16", action="store_true")
    a = parser.parse_args(argv)
    if a.child:
        child_trl(a)
    else:
        run(a.quick, a.only)


if __name__ == "__main__":
    main()
