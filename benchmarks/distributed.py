"""One process x 2 threads vs 2 processes x 1 thread (DDP) vs 2 processes with FSDP, on this machine's CPU cores.

Same model (smollm2-135m), data (alpaca_en_demo), global batch (4 rows) and steps for every run; LoRA (q,v) and full
fine-tuning. Each run is a real `peftkit train` (under torchrun for 2 processes); the table reports tokens/s, the peak
RSS of each process and the final loss. Run it alone on an idle machine:

    python benchmarks/distributed.py                 # ~15 min on 2 cores
    python benchmarks/distributed.py --steps 4       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (avx512_bf16)" if "avx512_bf16" in flags else "")
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, method: str, processes: int, fsdp: bool, args: argparse.Namespace, work: Path) -> dict:
    out = work / name
    settings = [f"model_name_or_path={args.model}", "dataset=alpaca_en_demo", f"dataset_dir={args.data_dir}",
                "cutoff_len=256", f"max_steps={args.steps}", "logging_steps=1", "learning_rate=1e-4",
                f"finetuning_type={method}", f"per_device_train_batch_size={4 // processes}", f"output_dir={out}",
                "lora_target=q_proj,v_proj", "save_steps=100000", *(["fsdp=full_shard"] if fsdp else [])]
    if processes == 1:
        command = [sys.executable, "-m", "peftkit", "train", "/dev/null", *settings]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", "-m", "peftkit", "train", "/dev/null", *settings]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "train_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {"run": name, "method": method, "processes": processes, "engine": "fsdp" if fsdp else (
        "ddp" if processes > 1 else "one process"), "tokens_per_second": results["train_tokens_per_second"],
            "peak_rss_mb_per_rank": results.get("peak_memory_mb_per_rank", [results["peak_memory_mb"]]),
            "final_loss": log[-1]["loss"], "wall_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    args = parser.parse_args()
    os.environ.setdefault("PEFTKIT_DTYPE", "float32")  # one dtype for all runs, whatever the CPU prefers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "full"):
            rows.append(run(f"{method}-1x2threads", method, 1, False, args, Path(tmp)))
            rows.append(run(f"{method}-ddp-2x1thread", method, 2, False, args, Path(tmp)))
            rows.append(run(f"{method}-fsdp-2x1thread", method, 2, True, args, Path(tmp)))
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    print(f"\n{time.strftime('%Y-%m-%d')} on {machine}; {args.steps} steps, global batch 4, cutoff 256, fp32\n")
    print("| run | engine | tokens/s | peak RSS per rank (MB) | final loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        rss = " / ".join(f"{m:,.0f}" for m in r["peak_rss_mb_per_rank"])
        print(f"| {r['method']} | {r['engine']} ({r['processes']} x {2 // r['processes']} threads) | "
              f"{r['tokens_per_second']:,.0f} | {rss} | {r['final_loss']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "steps": args.steps,
                                          "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
