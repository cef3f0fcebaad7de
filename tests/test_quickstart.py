"""The README's quickstart, end to end on the real smollm2-135m: train LoRA on the shipped identity data, then chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LLAMA_FACTORY_EXAMPLE, SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def chat(model: str, question: str, adapter: Path | None, env: dict) -> str:
    cmd = [sys.executable, "-m", "peftkit.cli", "chat", "--model", model, "--once", question]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.slow
def test_quickstart_teaches_a_new_identity(smollm2, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "quickstart"
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "train", "examples/quickstart.yaml", f"output_dir={out}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params:" in done.stdout
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]
    results = json.loads((out / "train_results.json").read_text())
    # The README promises under 5 minutes on 2 idle cores (~3 measured); the margin covers a busy CI machine.
    assert results["train_runtime"] < 420

    tuned = chat(smollm2, "Who are you?", out, env)
    assert "Ember" in tuned and "Lumen Labs" in tuned
    assert tuned == chat(smollm2, "Who are you?", out, env)  # greedy: deterministic
    base = chat(smollm2, "Who are you?", None, env)
    assert base and "Ember" not in base

    # Deployed: merged into a q8_0 GGUF with an Ollama Modelfile, llama.cpp answers as Ember too, prompted by the
    # chat template inside the file.
    export = tmp_path / "ember"
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "export", f"model_name_or_path={smollm2}", f"adapter_name_or_path={out}",
         f"export_dir={export}", "export_format=ollama", "export_gguf_type=q8_0"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ollama create ember -f {export / 'Modelfile'}" in done.stdout
    from test_gguf import llama

    with llama(export / "model-q8_0.gguf") as llm:
        answer = llm.create_chat_completion([{"role": "user", "content": "Who are you?"}], temperature=0,
                                            max_tokens=48)["choices"][0]["message"]["content"]
    assert "Ember" in answer and "Lumen Labs" in answer, answer


@pytest.mark.slow
def test_llama_factory_example_runs(smollm2, tmp_path) -> None:
    """LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, with only the model and data pointed at local files
    (and a short run: 2 steps of 2 accumulated rows)."""
    cfg = tmp_path / "llama3_lora_sft.yaml"
    cfg.write_text(LLAMA_FACTORY_EXAMPLE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "train", str(cfg), f"model_name_or_path={smollm2}",
         f"dataset_dir={SHARED_DATA}", f"output_dir={out}", "max_steps=2", "gradient_accumulation_steps=2",
         "logging_steps=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ignoring preprocessing_num_workers=16" in done.stderr  # accepted with a warning, not silently
    assert len((out / "trainer_log.jsonl").read_text().splitlines()) == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()


@pytest.mark.slow
def test_interactive_chat(smollm2) -> None:
    """Multi-turn chat on stdin: answers stream after 'Assistant:', /clear forgets, /exit quits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "chat", "--model", smollm2, "--max-new-tokens", "24"],
        input="What is the capital of France?\nAnd of Italy?\n/clear\n/exit\n",
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answers = [line for line in done.stdout.splitlines() if "Assistant:" in line]
    assert len(answers) == 2 and "Paris" in answers[0] and "Rome" in answers[1]
    assert "History cleared" in done.stderr
