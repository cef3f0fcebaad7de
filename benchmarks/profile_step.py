"""Where one LoRA training step spends its time, by kind of operator (torch.profiler, CPU self time).

    python benchmarks/profile_step.py                     # alpaca (long rows) and identity (short rows), ~3 min
    python benchmarks/profile_step.py --steps 5 --rows identity

Builds the README benchmark's job (smollm2-135m, LoRA r8 on q_proj,v_proj, batch 4, cutoff 256, the dtype peftkit picks
on this CPU), runs two warm-up steps, then profiles `--steps` optimizer steps through the Trainer's own step function,
and prints a markdown table of self CPU time per category (docs/performance.md keeps the current one).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from peftkit import LoraConfig, TunedModel, load_model_and_tokenizer
from peftkit.data import SFTCollator, build_sft_dataset
from peftkit.objectives import get_objective
from peftkit.precision import base_dtype
from peftkit.train.trainer import optimizer_step

ROOT = Path(__file__).resolve().parents[1]
# operator name patterns -> category, first match wins
CATEGORIES = [
    # short examples' attention is batched matmuls + a softmax (varlen._matmul_attention); nothing else here uses them
    # peftkit's kernels show as their autograd Functions (fused_ops.py, objectives/fused_head.py)
    ("attention",
     r"(scaled_dot_product|_flash_attention|attention|_Attention|_efficient|aten::(bmm|baddbmm)$|"
     r"aten::_softmax($|_b))"),
    ("matmul", r"aten::(mm|addmm|matmul|linear|_mkldnn|mkldnn_)"),
    ("cross-entropy and softmax",
     r"(log_softmax|logsumexp|nll_loss|cross_entropy|CrossEntropy|_softmax|exp\b|aten::exp)"),
    ("norms and activations", r"(rms|RMSNorm|SwiGLU|layer_norm|silu|gelu|rsqrt|pow|mean|sigmoid)"),
    ("casts and copies", r"(aten::to\b|_to_copy|copy_|clone|contiguous|empty_like|aten::cat|index|gather|scatter)"),
    ("optimizer", r"(_foreach|adam|lerp|addcdiv|addcmul|sqrt|zero_)"),
    ("elementwise", r"(_Rope|aten::(add|mul|sub|div|neg|where|sum|fill_|masked|cumsum|arange|ones|zeros))"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other (Python/dispatch, autograd bookkeeping)"


def profile_rows(dataset: str, steps: int, data_dir: str) -> tuple[dict[str, float], float, int]:
    device = "cpu"
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=base_dtype(None, False, device))
    tuned = TunedModel(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rows, _ = build_sft_dataset(tokenizer, dataset, data_dir, cutoff_len=256, max_samples=4 * (steps + 2))
    collate = SFTCollator(tokenizer.pad_token_id, mask_dtype=model.dtype, padding_free=True)
    batches = [collate(rows[i:i + 4]) for i in range(0, 4 * (steps + 2), 4)]
    objective = get_objective("sft")
    params = [p for _, p in tuned.method.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tuned.train()
    for batch in batches[:2]:
        optimizer_step(tuned, objective, [batch], optimizer, params, 1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            optimizer_step(tuned, objective, [batch], optimizer, params, 1.0)
    totals: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total / 1e6
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b and b["attention_mask"].dim() == 2
                 else b["input_ids"].numel() for b in batches[2:])
    return dict(totals), sum(totals.values()), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=["alpaca_en_demo", "identity"])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    flags = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no native bf16"
    print(f"{os.cpu_count()} cores, {flags}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} profiled steps of 4 rows\n")
    results = {name: profile_rows(name, args.steps, args.data_dir) for name in args.rows}
    names = sorted({c for totals, _, _ in results.values() for c in totals}, key=lambda c: -sum(
        r[0].get(c, 0) for r in results.values()))
    print("| category | " + " | ".join(f"{n}: s (%)" for n in args.rows) + " |")
    print("|---|" + "---|" * len(args.rows))
    for c in names:
        cells = [f"{r[0].get(c, 0):.2f} ({100 * r[0].get(c, 0) / r[1]:.0f}%)" for r in results.values()]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("| total (tokens/s) | " + " | ".join(f"{r[1]:.2f} ({r[2] / r[1]:.0f} tok/s)" for r in results.values())
          + " |")


if __name__ == "__main__":
    main()
