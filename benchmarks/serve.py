"""Requests/s and tokens/s of `peftkit api`: smollm2-135m with two LoRA adapters, N concurrent clients alternating
the adapters and the base model, with same-adapter batching and without it (one request at a time).

    python benchmarks/serve.py                  # 16 requests, 32 new tokens each
    python benchmarks/serve.py --requests 32 --max-tokens 64

Writes benchmarks/results/serve.json. Greedy decoding, so both modes return the same texts (checked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_engine(tmp: Path):
    from peftkit import LoraConfig, TunedModel
    from peftkit.models import load_model_and_tokenizer
    from peftkit.serve import ChatEngine

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    tuned = TunedModel(model)
    for i, name in enumerate(("sql", "chat")):
        torch.manual_seed(i)
        donor = TunedModel(load_model_and_tokenizer("smollm2-135m")[0], LoraConfig(r=8, target_modules="all-linear"))
        with torch.no_grad():
            for t in donor.method.state_dict().values():
                t.add_(torch.randn_like(t) * 0.02)
        donor.save(tmp / name)
        tuned.load_adapter(tmp / name, name)
    return ChatEngine(tuned, tokenizer)


def run(engine, max_batch: int, requests: int, max_tokens: int) -> dict:
    import openai
    import uvicorn

    from peftkit.serve.api import build_app

    app = build_app(engine, "smollm2-135m")
    app.state.scheduler.max_batch = max_batch
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    models = [("smollm2-135m", "sql", "chat")[i % 3] for i in range(requests)]

    def ask(i: int):
        return client.chat.completions.create(model=models[i], max_tokens=max_tokens, messages=[
            {"role": "user", "content": f"Tell me a fact about the number {i}."}])

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        replies = list(pool.map(ask, range(requests)))
    seconds = time.perf_counter() - start
    server.should_exit = True
    tokens = sum(r.usage.completion_tokens for r in replies)
    return {"max_batch": max_batch, "seconds": round(seconds, 2), "requests_per_second": round(requests / seconds, 3),
            "completion_tokens_per_second": round(tokens / seconds, 2), "completion_tokens": tokens,
            "batches": app.state.scheduler.batches_run, "texts": [r.choices[0].message.content for r in replies]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(Path(tmp))
        batched = run(engine, 16, args.requests, args.max_tokens)
        single = run(engine, 1, args.requests, args.max_tokens)
    assert batched["texts"] == single["texts"], "batching changed an answer"
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
              "torch": torch.__version__, "requests": args.requests, "max_tokens": args.max_tokens,
              "batched": {k: v for k, v in batched.items() if k != "texts"},
              "one_at_a_time": {k: v for k, v in single.items() if k != "texts"}}
    out = REPO / "benchmarks" / "results" / "serve.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for mode in ("batched", "one_at_a_time"):
        r = record[mode]
        print(f"{mode:>14}: {r['requests_per_second']:.2f} requests/s, {r['completion_tokens_per_second']:.1f} "
              f"tokens/s, {r['batches']} batches, {r['seconds']:.1f} s")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
