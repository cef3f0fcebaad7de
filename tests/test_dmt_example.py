"""examples/dmt.yaml on the real model (slow): both phases run end to end in under 10 minutes, each ability is
evaluated apart, and phase 2's general data lowers the general held-out loss that phase 1 left."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def evaluations(folder: Path) -> list[dict]:
    lines = (folder / "trainer_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "eval_loss" in e]


def native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls there are ~2.5x faster than fp32; without them peftkit trains in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Ten minutes on 2 cores with native bf16 (262 s measured there); a CPU without it trains in fp32 and took over 600 s
# (AMD EPYC, AVX2 only, 2026-12-01), so it gets twice the time, as the quickstart's target doubles there.
LIMIT = 600 if native_bf16() else 1200


@pytest.mark.slow
def test_dmt_example_runs_both_phases_in_under_ten_minutes(tmp_path) -> None:
    out = tmp_path / "dmt"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftkit", "train", "examples/dmt.yaml", f"output_dir={out}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=LIMIT)
    seconds = time.perf_counter() - start
    assert seconds < LIMIT
    one, two = evaluations(out / "phase-1")[-1], evaluations(out / "phase-2")[-1]
    for e in (one, two):
        assert e["eval_loss"] == pytest.approx(
            (e["eval_arithmetic_sft_test_loss"] + e["eval_alpaca_general_test_loss"]) / 2, abs=1e-5)
    assert two["eval_alpaca_general_test_loss"] < one["eval_alpaca_general_test_loss"] - 0.02, (one, two)
    final = load_file(out / "adapter_model.safetensors")
    last_phase = load_file(out / "phase-2" / "adapter_model.safetensors")
    assert final.keys() == last_phase.keys() and all((final[k] == last_phase[k]).all() for k in final)
    results = json.loads((out / "train_results.json").read_text())
    assert [p["phase"] for p in results["phases"]] == [1, 2]
