"""The RL examples on the real model (slow): GRPO on the arithmetic problems raises the held-out accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.models import load_model_and_tokenizer
from peftkit.objectives.rewards import accuracy
from peftkit.serve.chat import ChatEngine, GenerationParams

ROOT = Path(__file__).resolve().parents[1]


def test_the_arithmetic_data_is_what_the_script_writes(tmp_path) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_arithmetic.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("arithmetic.json", "arithmetic_test.json"):
        assert (tmp_path / name).read_text() == (ROOT / "examples" / "data" / name).read_text()
    train = {r["instruction"] for r in json.loads((tmp_path / "arithmetic.json").read_text())}
    test = {r["instruction"] for r in json.loads((tmp_path / "arithmetic_test.json").read_text())}
    assert not train & test and len(test) == 64


def held_out_accuracy(max_new_tokens: int) -> float:
    """The base model's greedy accuracy on the 64 held-out problems, prompted as the run prompts them."""
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    engine = ChatEngine(model, tokenizer)
    rows = json.loads((ROOT / "examples" / "data" / "arithmetic_test.json").read_text())
    prompts = [engine.prompt_ids([{"role": "system", "content": r["system"]},
                                  {"role": "user", "content": r["instruction"]}]) for r in rows]
    done = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens))
    scores = accuracy([], [d.text for d in done], answer=[r["answer"] for r in rows])
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_grpo_example_raises_held_out_accuracy(tmp_path) -> None:
    before = held_out_accuracy(32)
    out = tmp_path / "grpo"
    subprocess.run([sys.executable, "-m", "peftkit", "train", "examples/grpo.yaml", f"output_dir={out}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=900)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    after = log[-1]["eval_rewards/accuracy"]
    assert after > before + 0.05, (before, after)
