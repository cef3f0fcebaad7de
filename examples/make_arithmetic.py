"""Write the arithmetic prompts that examples/grpo.yaml trains on: `python examples/make_arithmetic.py`.

Each row is an alpaca prompt (`instruction`: "What is 13 + 14?") with its `answer` column ("27"), which the built-in
`accuracy` reward compares with the last number (or \\boxed{} / <answer> content) of each completion. Seeded, so the
files in examples/data are exactly what this script writes; the test and train problems never overlap.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Think inside <think> </think>, then give the final number inside <answer> </answer>."


def problems(seed: int = 0, low: int = 1, high: int = 20) -> list[tuple[int, str, int]]:
    """Every a + b and a - b (a >= b) with 1 <= a, b <= 20, in a seeded order."""
    out = [(a, op, b) for a in range(low, high + 1) for b in range(low, high + 1) for op in "+-" if op == "+" or a >= b]
    random.Random(seed).shuffle(out)
    return out


def row(a: int, op: str, b: int) -> dict[str, str]:
    return {"system": SYSTEM, "instruction": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"), help="the dataset folder to write to")
    parser.add_argument("--test", type=int, default=64, help="held-out problems (the rest are for training)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [row(*p) for p in problems()]
    files = {"arithmetic": rows[args.test:], "arithmetic_test": rows[:args.test]}
    for name, data in files.items():
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    for name in files:
        info[name] = {"file_name": f"{name}.json", "columns": {"prompt": "instruction", "system": "system"}}
        # the same problems as SFT data (examples/dmt.yaml): the answer column is the reply, with no system prompt
        info[name.replace("arithmetic", "arithmetic_sft")] = {
            "file_name": f"{name}.json", "columns": {"prompt": "instruction", "response": "answer"}}
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {', '.join(f'{n} ({len(d)} rows)' for n, d in files.items())} to {out}")


if __name__ == "__main__":
    main()
