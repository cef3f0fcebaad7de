"""Throughput of `peftkit api` (tokens/s): one client against 8 concurrent clients, and many clients spread over two
LoRA adapters and the base model, on smollm2-135m through the real HTTP server and the official `openai` client.

    python benchmarks/serve.py                      # 16 requests of 64 new tokens per scenario (~5 min, 2 cores)
    python benchmarks/serve.py --quick              # 8 requests of 32 tokens
    python benchmarks/serve.py --dtype bf16         # the base in bf16 (default: as `peftkit api` loads it)
    python benchmarks/serve.py --threads 1          # steadier while other work shares the cores

Scenarios, each on the same requests ("Tell me a fact about the number i."), greedy:
- one client: the requests one after another;
- 8 clients: 8 threads, each sending its share of the requests one after another (a closed loop), with continuous
  batching, and with the static batching of before (PEFTKIT_DECODE=generate: same-settings requests batched only
  when they arrive together, each batch run to its end);
- adapters: all requests at once, alternating base / sql / chat, with batching and with max_batch 1.
Each scenario starts with no prompt kept (serve/prefix.py): a request reuses only the prompts of the scenario's
earlier requests (the chat template's system prompt), as a fresh `peftkit api` would. Greedy answers do not depend on
the batch in float32, so every scenario's texts are compared with the one-client texts (bf16 rounding may part a few
at near ties: counted). Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
TARGET = 4.0  # from the issue: 8 concurrent clients >= 4x one client's tokens/s


def make_engine(tmp: Path, dtype: str | None = None) -> Any:
    from peftkit import LoraConfig, TunedModel
    from peftkit.models import load_model_and_tokenizer
    from peftkit.serve import ChatEngine

    model, tokenizer = load_model_and_tokenizer(MODEL, dtype=dtype)
    tuned = TunedModel(model)
    for i, name in enumerate(("sql", "chat")):
        torch.manual_seed(i)
        donor = TunedModel(load_model_and_tokenizer(MODEL)[0], LoraConfig(r=8, target_modules="all-linear"))
        with torch.no_grad():
            for t in donor.method.state_dict().values():
                t.add_(torch.randn_like(t) * 0.02)
        donor.save(tmp / name)
        tuned.load_adapter(tmp / name, name)
    return ChatEngine(tuned, tokenizer)


class Server:
    """The API on a free loopback port, in this process."""

    def __init__(self, engine: Any, max_batch: int | None = None) -> None:
        import uvicorn

        from peftkit.serve.api import build_app

        self.app = build_app(engine, MODEL)
        if max_batch is not None:
            self.app.state.scheduler.max_batch = max_batch
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True


def scenario(engine: Any, models: list[str], clients: int, max_tokens: int, max_batch: int | None = None,
             before: bool = False) -> dict[str, Any]:
    """`clients` threads share the requests (request i for `models[i]`), each sending its share one at a time."""
    import openai

    from peftkit.serve.prefix import PrefixCache

    if before:
        os.environ["PEFTKIT_DECODE"] = "generate"
    engine.prefixes = PrefixCache()  # no prompt kept from an earlier scenario (they send the same requests)
    server = Server(engine, max_batch)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=1200)
    replies: dict[int, Any] = {}

    def ask(i: int) -> None:
        replies[i] = client.chat.completions.create(model=models[i], max_tokens=max_tokens, temperature=0, messages=[
            {"role": "user", "content": f"Tell me a fact about the number {i}."}])

    def share(c: int) -> None:
        for i in range(c, len(models), clients):
            ask(i)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(share, range(clients)))
        seconds = time.perf_counter() - start
    finally:
        server.stop()
        os.environ.pop("PEFTKIT_DECODE", None)
    tokens = sum(r.usage.completion_tokens for r in replies.values())
    scheduler = server.app.state.scheduler
    return {"clients": clients, "requests": len(models), "seconds": round(seconds, 2),
            "completion_tokens": tokens, "tokens_per_second": round(tokens / seconds, 2),
            "requests_per_second": round(len(models) / seconds, 3), "batches": scheduler.batches_run,
            "decode_steps": scheduler.steps_run,
            "texts": [replies[i].choices[0].message.content for i in range(len(models))]}


def run(quick: bool = False, dtype: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Every scenario, as a dict (what `main` prints and writes)."""
    if threads:
        torch.set_num_threads(threads)
    requests, max_tokens = (8, 32) if quick else (16, 64)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(Path(tmp), dtype)
        engine.generate([engine.prompt_ids([{"role": "user", "content": "Hi"}])])  # warm-up (and weight packing)
        base = [MODEL] * requests
        mixed = [(MODEL, "sql", "chat")[i % 3] for i in range(requests)]
        runs = {"one client": scenario(engine, base, 1, max_tokens),
                "8 clients": scenario(engine, base, 8, max_tokens),
                "8 clients, static batching (before)": scenario(engine, base, 8, max_tokens, before=True),
                "adapters, all at once": scenario(engine, mixed, requests, max_tokens),
                "adapters, all at once, max_batch 1": scenario(engine, mixed, requests, max_tokens, max_batch=1)}
        model_dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    reference = {"base": runs["one client"]["texts"], "mixed": runs["adapters, all at once, max_batch 1"]["texts"]}
    for name, r in runs.items():
        texts = r.pop("texts")
        ref = reference["mixed" if name.startswith("adapters") else "base"]
        r["texts_differing_from_one_at_a_time"] = sum(a != b for a, b in zip(texts, ref))
    ratio = round(runs["8 clients"]["tokens_per_second"] / runs["one client"]["tokens_per_second"], 2)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "model": MODEL, "dtype": model_dtype,
            "requests": requests, "max_tokens": max_tokens, "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "scenarios": runs,
            "x_8_clients_over_one": ratio, "target_met": ratio >= TARGET}


def table(record: dict[str, Any]) -> str:
    lines = [f"{record['model']} ({record['dtype']}), {record['requests']} requests of up to {record['max_tokens']} "
             f"new tokens, {record['cores']} cores; load average {record['load_avg_before'][0]} -> "
             f"{record['load_avg_after'][0]}", "",
             "| scenario | tokens/s | requests/s | seconds | batches | decode steps | texts differing |",
             "|---|---|---|---|---|---|---|"]
    for name, r in record["scenarios"].items():
        lines.append(f"| {name} | {r['tokens_per_second']} | {r['requests_per_second']} | {r['seconds']} | "
                     f"{r['batches']} | {r['decode_steps']} | {r['texts_differing_from_one_at_a_time']} |")
    lines += ["", f"8 clients / one client: {record['x_8_clients_over_one']}x (target >= {TARGET}): "
                  f"{'met' if record['target_met'] else 'not met'}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 requests of 32 new tokens")
    p.add_argument("--dtype", default=None, help="the base model's dtype (default: as `peftkit api` loads it)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 is steadier on a machine shared with other work)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args()
    record = run(quick=args.quick, dtype=args.dtype, threads=args.threads)
    record["markdown"] = table(record)  # for `python -m benchmarks all`, which renders without importing torch
    print(record["markdown"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
