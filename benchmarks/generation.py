"""Generation speed of peftkit's engine against transformers' `model.generate` and llama.cpp, on smollm2-135m.

    python benchmarks/generation.py              # 256 new tokens at batch 1, 64 per row at batch 8 (~6 min, 2 cores)
    python benchmarks/generation.py --quick      # 32 / 16 tokens, no cold-start runs (~2 min)
    python benchmarks/generation.py --threads 1  # torch and llama.cpp on one thread (steadier on a busy machine)

One run, the same prompts for everyone, greedy decoding:
- peftkit: `ChatEngine`'s decode loop on the alias's float32 weights (dequantized Q4_1, as `peftkit chat` loads it),
  and on the same model as a bf16 checkpoint (how models are published), in the dtype `peftkit chat` generates in
  from one on this CPU (bf16 where bf16 is fast, else fp32 on the bf16 values, `precision.inference_dtype`); "before
  (no decode kernel, no direct step)" is that engine without peftkit's decode kernel (serve/gemv.py) and with every
  step through the model's own forward (serve/llama_step.py);
- transformers: `model.generate` on the same weights: fp32, the bf16 checkpoint in bf16 (transformers' own default
  for it), and in peftkit's dtype where that differs (for the same-tokens check);
- llama.cpp (llama-cpp-python) on an f16 GGUF of the same weights, written by peftkit's exporter; its "batch 8" is 8
  requests one after another (llama-cpp-python serves one sequence);
- cold start: wall time of a fresh `peftkit chat --model smollm2-135m --once ... --max-new-tokens 1` process (import,
  load, first token), fp32 and bf16.

Time to first token (TTFT) is the time of a 1-token generation (prefill + one token); decode tokens/s is (new tokens -
rows) / (time of the whole generation - TTFT). Batch 8 counts every row's tokens (rows stop at their own end).
Also checked: peftkit's tokens against transformers' in the same dtype (equal in fp32; in bf16 the decode kernel's
own summation order can flip a near-tie, after which the texts part: the table says how many tokens agreed first).
On a CPU without native bf16, where `peftkit chat` generates in fp32 from a bf16 checkpoint, the bf16 model is
measured too ("peftkit bfloat16"): what a CPU with native bf16 decodes in. Writes
benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
QUESTIONS = ["Write a long story about a dragon who learns to cook.", "Who are you?",
             "Explain in detail how a CPU cache works.", "List twenty fruits and say one thing about each.",
             "Tell me about the history of Paris.", "What is two plus two? Explain your reasoning.",
             "Write a poem about the sea at night.", "How do plants turn sunlight into food?"]
# CPUs without native bf16: the bf16 model, what a CPU with native bf16 decodes in (`peftkit chat` here: fp32)
BF16_MODEL_ROW = "peftkit bfloat16 (bf16 checkpoint)"
TARGETS = {"x_transformers_fp32": 1.5, "x_llama_cpp": 0.5}  # from the issue: >= 1.5x generate, within 2x llama.cpp


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and whether it has native bf16 dot products (avx512_bf16), from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags.split(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(generate: Callable[[list[list[int]], int], list[list[int]]], prompts: list[list[int]],
            tokens_b1: int, tokens_b8: int) -> dict[str, Any]:
    """One round: TTFT and decode tokens/s at batch 1 (the first prompt) and batch 8 (all), for `generate(prompts,
    n)` that returns each row's new tokens. Also per CPU second: on a machine shared with other work, a process's
    CPU time counts only what it got to run."""
    ttft1, cpu_ttft1, _ = _timed(lambda: generate(prompts[:1], 1))
    t1, cpu1, out1 = _timed(lambda: generate(prompts[:1], tokens_b1))
    ttft8, cpu_ttft8, _ = _timed(lambda: generate(prompts, 1))
    t8, cpu8, out8 = _timed(lambda: generate(prompts, tokens_b8))
    n1, n8 = len(out1[0]), sum(len(r) for r in out8)
    return {"ttft_b1_s": round(ttft1, 3), "decode_b1_tok_s": round((n1 - 1) / max(t1 - ttft1, 1e-9), 2),
            "decode_b1_tok_per_cpu_s": round((n1 - 1) / max(cpu1 - cpu_ttft1, 1e-9), 2), "new_tokens_b1": n1,
            "ttft_b8_s": round(ttft8, 3), "decode_b8_tok_s": round((n8 - len(prompts)) / max(t8 - ttft8, 1e-9), 2),
            "decode_b8_tok_per_cpu_s": round((n8 - len(prompts)) / max(cpu8 - cpu_ttft8, 1e-9), 2),
            "new_tokens_b8": n8, "tokens": {"b1": out1, "b8": out8}}


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's best over the rounds (the least disturbed by other work), and how many rounds there were."""
    out = dict(rounds[-1])
    for key in out:
        if key.endswith("_s") and key.startswith("ttft"):
            out[key] = min(r[key] for r in rounds)
        elif "tok_s" in key or "tok_per_cpu_s" in key:
            out[key] = max(r[key] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def peftkit_runner(engine: Any) -> Callable[[list[list[int]], int], list[list[int]]]:
    """`ChatEngine.generate`'s work: the engine's rows through its decoder, whose tokens it turns into text. No
    prompt is reused between calls (as llama.cpp's runner resets): every prompt is prefilled, as transformers' is."""
    from peftkit.serve import GenerationParams
    from peftkit.serve.prefix import PrefixCache

    engine.prefixes = PrefixCache(budget=0)

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        params = GenerationParams(max_new_tokens=n)
        rows = engine.rows(prompts, params)
        if rows is None:  # PEFTKIT_DECODE=generate, the engine's path before: only the counts are kept
            return [[-1] * c.completion_tokens for c in engine.generate(prompts, params)]
        with engine.lock:
            engine.decoder(engine.model).run(rows)
        return [r.tokens for r in rows]

    return generate


def transformers_runner(model: Any, engine: Any) -> Callable[[list[list[int]], int], list[list[int]]]:
    """Plain `model.generate`: left-padded batch, greedy, the engine's end-of-turn ids."""

    @torch.no_grad()
    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        batch = engine._batch(prompts)
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=engine.stop_ids,
                             pad_token_id=engine._pad_id())
        width = batch["input_ids"].shape[1]
        rows = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in engine.stop_ids), None)
            rows.append(row[:end + 1] if end is not None else row)
        return rows

    return generate


def f16_gguf() -> Path:
    """An f16 GGUF of smollm2-135m, written once by peftkit's exporter (the packaged file is Q4_1)."""
    from peftkit.models import peftkit_home

    out = peftkit_home() / "bench" / "smollm2-135m-f16"
    path = out / "model-f16.gguf"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "peftkit", "export", f"model_name_or_path={MODEL}", f"export_dir={out}",
                        "export_format=gguf", "export_gguf_type=f16", "overwrite_output_dir=true"], check=True,
                       capture_output=True)
    return path


def llama_cpp_runner(threads: int) -> tuple[Callable[[list[list[int]], int], list[list[int]]], str]:
    from llama_cpp import Llama

    path = f16_gguf()
    llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    eos = llm.token_eos()

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        rows = []
        for prompt in prompts:  # one sequence at a time
            llm.reset()  # no prefix reuse between calls: every prompt is prefilled
            row = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                row.append(int(token))
                if token == eos or len(row) >= n:
                    break
            rows.append(row)
        return rows

    return generate, str(path)


def cold_chat(dtype: str | None) -> float:
    """Wall seconds of a fresh `peftkit chat --once` process that generates one token."""
    env = {**os.environ, **({"PEFTKIT_DTYPE": dtype} if dtype else {}),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of the rest of the run
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftkit", "chat", "--model", MODEL, "--once", "Who are you?",
                    "--max-new-tokens", "1"], check=True, capture_output=True, env=env)
    return round(time.perf_counter() - start, 2)


def _same(a: dict, b: dict) -> dict[str, Any]:
    """Per batch size: whether every row's tokens are the same, and how many agree before each row's first
    difference, of how many (a bf16 step summed in another order can flip a near-tie and so change the rest)."""
    out: dict[str, Any] = {}
    for k in ("b1", "b8"):
        ours, theirs = a["tokens"][k], b["tokens"][k]
        agree = sum(next((i for i, (x, y) in enumerate(zip(r, t)) if x != y), min(len(r), len(t)))
                    for r, t in zip(ours, theirs))
        out[k] = {"same": ours == theirs, "agree": agree, "of": sum(len(t) for t in theirs)}
    return out


def run(quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Every measurement, as a dict (what `main` prints and writes)."""
    from peftkit.models import load_model_and_tokenizer
    from peftkit.precision import base_dtype, inference_dtype
    from peftkit.serve import ChatEngine
    from peftkit.serve.fast_layers import FastLayers

    if threads:
        torch.set_num_threads(threads)
    tokens_b1, tokens_b8, rounds_count = (32, 16, 2) if quick else (256, 64, 2)
    load_before = os.getloadavg()
    picked = base_dtype(None, False, "cpu")
    model, tokenizer = load_model_and_tokenizer(MODEL)  # float32, as `peftkit chat` loads the alias
    # The same model as a bf16 checkpoint (how most models are published), generated from as `peftkit chat` does on
    # this CPU: in bf16 where bf16 is fast, else in fp32 on the same bf16 values (`precision.inference_dtype`)
    checkpoint = load_model_and_tokenizer(MODEL)[0].to(torch.bfloat16)
    generated = inference_dtype(torch.bfloat16, "cpu")
    own = str(generated).removeprefix("torch.")
    # a copy: Module.to converts in place, which turned the bf16 rows into fp32 ones before 2026-12-02 11:00
    served = checkpoint if generated == torch.bfloat16 else copy.deepcopy(checkpoint).to(generated)
    engines = {"float32": ChatEngine(model, tokenizer), f"bf16 checkpoint, {own}": ChatEngine(served, tokenizer)}
    before = ChatEngine(served, tokenizer)
    before.layers = FastLayers(kernel=False)  # the engine without peftkit's decode kernel
    before.direct_step = False  # and every step through the model's own forward
    prompts = [engines["float32"].prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    runners: dict[str, Callable] = {
        "transformers generate float32": transformers_runner(model, engines["float32"]),
        "peftkit float32": peftkit_runner(engines["float32"]),
        "transformers generate bfloat16 (bf16 checkpoint)": transformers_runner(checkpoint, engines["float32"])}
    same = {"peftkit float32": "transformers generate float32",
            f"peftkit bf16 checkpoint, {own}": f"transformers generate {own} (bf16 checkpoint)"}
    if generated != torch.bfloat16:
        runners[f"transformers generate {own} (bf16 checkpoint)"] = transformers_runner(served, engines["float32"])
        # what a CPU with native bf16 decodes in (the kernel on the bf16 weights and cache), measured here too
        engines["bfloat16"] = ChatEngine(checkpoint, tokenizer)
        runners[BF16_MODEL_ROW] = peftkit_runner(engines["bfloat16"])
        same[BF16_MODEL_ROW] = "transformers generate bfloat16 (bf16 checkpoint)"
    runners[f"peftkit bf16 checkpoint, {own}, before (no decode kernel, no direct step)"] = peftkit_runner(before)
    runners[f"peftkit bf16 checkpoint, {own}"] = peftkit_runner(engines[f"bf16 checkpoint, {own}"])
    notes = {}
    try:
        runners["llama.cpp f16"], gguf = llama_cpp_runner(torch.get_num_threads())
        notes["llama.cpp f16"] = {"gguf": gguf, "note": "batch 8 = 8 sequential requests"}
    except ImportError as e:
        notes["llama.cpp f16"] = {"skipped": f"llama-cpp-python is not installed ({e})"}
    for generate in runners.values():  # warm-up: first-call allocations, oneDNN primitives, weight packing
        generate(prompts[:1], 2)
    rounds: dict[str, list] = {name: [] for name in runners}
    for _ in range(rounds_count):  # interleaved, so that a busy spell on the machine hits every engine alike
        for name, generate in runners.items():
            rounds[name].append(measure(generate, prompts, tokens_b1, tokens_b8))
    results: dict[str, Any] = {name: {**best_of(r), **notes.get(name, {})} for name, r in rounds.items()}
    results.update({k: v for k, v in notes.items() if "skipped" in v})
    for ours, theirs in same.items():
        results[ours]["same_tokens_as_transformers"] = _same(results[ours], results[theirs])
    cold = {} if quick else {"fp32": cold_chat(None), "bf16": cold_chat("bf16")}
    for r in results.values():
        r.pop("tokens", None)
    results = {k: results[k] for k in [*runners, *(k for k in results if k not in runners)]}
    best = max((k for k in results if k.startswith("peftkit ") and "before" not in k and k != BF16_MODEL_ROW),
               key=lambda k: results[k]["decode_b1_tok_s"])
    ratios = {"x_transformers_fp32": _ratio(results, best, "transformers generate float32"),
              "x_llama_cpp": _ratio(results, best, "llama.cpp f16"),
              "x_transformers_fastest": _ratio(results, best, max(
                  (k for k in results if k.startswith("transformers")), key=lambda k: results[k]["decode_b1_tok_s"]))}
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), **cpu_info(), "model": MODEL,
            "picked_dtype": str(picked).removeprefix("torch."), "bf16_checkpoint_generates_in": own,
            "tokens_b1": tokens_b1, "tokens_b8_per_row": tokens_b8,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "results": results,
            "cold_chat_ttft_s": cold, "best_peftkit": best, "ratios_b1": ratios,
            "targets_met": {k: ratios[k] is not None and ratios[k] >= v for k, v in TARGETS.items()}}


def _ratio(results: dict, a: str, b: str) -> float | None:
    x, y = results.get(a, {}).get("decode_b1_tok_s"), results.get(b, {}).get("decode_b1_tok_s")
    return round(x / y, 2) if x and y else None


def _same_text(same: dict[str, Any] | None) -> str:
    if same is None:
        return ""
    if all(v["same"] for v in same.values()):
        return "yes"
    return ", ".join(f"{k}: {v['agree']} of {v['of']} before a difference" for k, v in same.items())


def table(record: dict[str, Any]) -> str:
    lines = [f"CPU: {record['cpu']} ({record['cores']} cores, avx512_bf16: "
             f"{'yes' if record['avx512_bf16'] else 'no'}), torch {record['torch']} on {record['torch_threads']} "
             f"threads; {record['model']}, greedy, {record['tokens_b1']} new tokens at batch 1, "
             f"{record['tokens_b8_per_row']} per row at batch 8; load average {record['load_avg_before'][0]} -> "
             f"{record['load_avg_after'][0]}", "",
             "| engine | TTFT b1 (s) | decode b1 (tok/s) | per CPU s | TTFT b8 (s) | decode b8 (tok/s) | per CPU s | "
             "same tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, r in record["results"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['ttft_b1_s']} | {r['decode_b1_tok_s']} | {r['decode_b1_tok_per_cpu_s']} | "
                     f"{r['ttft_b8_s']} | {r['decode_b8_tok_s']} | {r['decode_b8_tok_per_cpu_s']} | "
                     f"{_same_text(r.get('same_tokens_as_transformers'))} |")
    if record["cold_chat_ttft_s"]:
        lines += ["", "Cold `peftkit chat --once` (import, load, first token): " +
                  ", ".join(f"{k} {v} s" for k, v in record["cold_chat_ttft_s"].items())]
    r = record["ratios_b1"]
    lines += ["", f"Best peftkit ({record['best_peftkit']}) at batch 1: {r['x_transformers_fp32']}x transformers fp32 "
              f"(target >= 1.5; {r.get('x_transformers_fastest')}x transformers' fastest row), {r['x_llama_cpp']}x "
              f"llama.cpp f16 (target >= 0.5): "
              f"{'met' if all(record['targets_met'].values()) else 'not met'}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="32/16 new tokens, no cold-start runs")
    p.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    args = p.parse_args()
    record = run(quick=args.quick, threads=args.threads)
    print(table(record))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
