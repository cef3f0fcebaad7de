"""`peftkit predict`: generate answers for `eval_dataset` and score them; `peftkit eval`: loss and perplexity.

Outputs follow LLaMA-Factory: `generated_predictions.jsonl` (prompt, predict, label per row; then the prompt's
`messages`, and `tools` where it has some, so `peftkit data from-predictions` can make the answers a dataset) and
`predict_results.json` (`predict_bleu-4`, `predict_rouge-1/2/l`, `predict_model_preparation_time`, runtime and
throughput; sorted keys, as transformers' `Trainer.save_metrics` writes them), so numbers and scripts compare.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import SFTCollator, build_sft_dataset, load_conversations
from ..errors import ConfigError
from ..io.atomic import atomic_write
from ..io.run_config import read_train_config
from ..objectives import get_objective
from ..quantization import trained_quantization
from ..serve import ChatEngine, GenerationParams
from ..tuned import load_for_inference
from .metrics import similarity

PREDICTIONS_NAME = "generated_predictions.jsonl"
RESULTS_NAME = "predict_results.json"


def load_evaluated(cfg: Any) -> tuple[Any, Any]:
    """The config's base model (quantized as the config says, else as the adapter was trained) with its adapter."""

    return load_for_inference(cfg.model_name_or_path, cfg.adapter_name_or_path,
                              quantization=cfg.quantization() or trained_quantization(cfg.adapter_name_or_path),
                              trust_remote_code=cfg.trust_remote_code, dtype=cfg.infer_dtype)


def _eval_names(cfg: Any) -> list[str]:
    names = cfg.eval_dataset or cfg.dataset
    if not names:
        raise ConfigError("predict and eval need data: set eval_dataset (names in dataset_dir/dataset_info.json).")
    return names


def inference_template(cfg: Any) -> str | None:
    """The config's template, else the one the adapter was trained with (its train_config.json), else None (the
    tokenizer's own): an adapter answers best in the format it learnt."""
    return cfg.template or read_train_config(cfg.adapter_name_or_path).get("template")


def run_predict(cfg: Any, model: Any = None, tokenizer: Any = None) -> dict[str, float]:
    """Generate for every row of `eval_dataset` (its last assistant turn is the label), write both files to
    `output_dir`, and return the metrics."""

    if model is None:
        model, tokenizer = load_evaluated(cfg)
    # transformers' Trainer reports readying the loaded model (its device placement) apart from predict_runtime;
    # here that is the engine: eval mode, template, stop tokens
    prepared = time.perf_counter()
    engine = ChatEngine(model, tokenizer, inference_template(cfg), enable_thinking=cfg.enable_thinking)
    preparation = time.perf_counter() - prepared
    conversations, _ = load_conversations(_eval_names(cfg), cfg.dataset_dir, max_samples=cfg.max_samples, seed=cfg.seed)
    rows, asked = [], []
    for conv in conversations:
        messages = conv.messages
        label = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        asked.append(_asked(messages[:-1] if label else messages, conv.tools))
        prompt = engine.prompt_ids(asked[-1]["messages"], conv.tools)[-cfg.cutoff_len:]
        rows.append((prompt, label))
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, do_sample=cfg.do_sample,
                              seed=cfg.seed)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    bs = cfg.per_device_eval_batch_size
    predictions: dict[int, str] = {}
    start = time.perf_counter()
    steps = math.ceil(len(order) / bs)
    for step in tqdm(range(steps), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = order[step * bs:(step + 1) * bs]
        for i, done in zip(chunk, engine.generate([rows[i][0] for i in chunk], params, engine.default_adapter)):
            predictions[i] = done.text
    runtime = time.perf_counter() - start
    preds = [predictions[i] for i in range(len(rows))]
    labels = [label for _, label in rows]
    scores = similarity(preds, labels)
    results = {f"predict_{k}": v for k, v in scores.items()}
    results.update(predict_model_preparation_time=round(preparation, 4), predict_runtime=round(runtime, 4),
                   predict_samples_per_second=round(len(rows) / runtime, 3),
                   predict_steps_per_second=round(steps / runtime, 3))
    results = dict(sorted(results.items()))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": tokenizer.decode(prompt), "predict": pred, "label": label, **extra},
                        ensure_ascii=False) for (prompt, label), pred, extra in zip(rows, preds, asked)]
    atomic_write(out / PREDICTIONS_NAME, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    text = json.dumps(results, indent=4, sort_keys=True) + "\n"
    atomic_write(out / RESULTS_NAME, lambda tmp: Path(tmp).write_text(text))
    return results


def _asked(messages: list[dict[str, str]], tools: str | None) -> dict[str, Any]:
    """A row's extra keys: the messages its prompt was built from (and its tools), as the teacher saw them, so its
    answer can become a training row again (sequence-level distillation)."""
    extra: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if tools:
        extra["tools"] = tools
    return extra


def run_eval(cfg: Any) -> dict[str, float]:
    """Mean token loss on the answers of `eval_dataset` (as training computes it) and its perplexity, exp(loss)."""

    model, tokenizer = load_evaluated(cfg)
    rows, _ = build_sft_dataset(tokenizer, _eval_names(cfg), cfg.dataset_dir, template=inference_template(cfg),
                                cutoff_len=cfg.cutoff_len, max_samples=cfg.max_samples,
                                train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history,
                                enable_thinking=cfg.enable_thinking, seed=cfg.seed)
    collate = SFTCollator(tokenizer.pad_token_id)
    objective = get_objective(cfg.stage)  # the loss training reports, by the same code
    device = next(model.parameters()).device
    total = count = 0.0
    bs = cfg.per_device_eval_batch_size
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), bs), desc="eval", unit="batch", dynamic_ncols=True):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + bs]).items()}
            total += objective.loss(model, batch).item()
            count += objective.units(batch)
    loss = total / max(count, 1)
    results = {"eval_loss": round(loss, 6), "eval_perplexity": round(math.exp(loss), 4), "eval_samples": len(rows),
               "eval_tokens": int(count)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
