"""The API's continuous batching (serve/api.py BatchScheduler), without HTTP: a request that arrives while a batch
runs joins it at the next step and gets exactly what it gets alone (greedy, float32), rows with different settings
share a batch, finished rows leave at once, streams take part, a cancelled row leaves, and models the decode loop
does not cover still get the static batches of before."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams
from peftkit.serve.api import BatchScheduler


@pytest.fixture(scope="module")
def engine(small_model_dir) -> ChatEngine:  # noqa: F811
    return ChatEngine(*load_model_and_tokenizer(str(small_model_dir)))


def prompt(engine: ChatEngine, text: str) -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": text}])


def slowed(engine: ChatEngine, seconds: float):
    """Every forward of the engine's model takes `seconds` longer, so requests surely overlap; returns the forwards'
    batch sizes as they happen."""
    sizes: list[int] = []

    def hook(_module, _args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        time.sleep(seconds)

    return sizes, engine.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_request_joins_a_running_batch_and_gets_what_it_gets_alone(engine) -> None:
    texts = ["Tell me a long story.", "Hi", "What is one plus one?"]
    params = [GenerationParams(max_new_tokens=40), GenerationParams(max_new_tokens=6),
              GenerationParams(max_new_tokens=12)]
    alone = [engine.generate([prompt(engine, t)], p)[0] for t, p in zip(texts, params)]
    scheduler = BatchScheduler(engine)
    sizes, handle = slowed(engine, 0.01)
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(scheduler.submit, prompt(engine, texts[0]), params[0], None)
            while scheduler.steps_run < 3:  # the first request is decoding alone
                time.sleep(0.005)
            later = [pool.submit(scheduler.submit, prompt(engine, t), p, None) for t, p in zip(texts[1:], params[1:])]
            got = [first.result(), *(f.result() for f in later)]
    finally:
        handle.remove()
    assert got == alone
    assert scheduler.batches_run == 1  # the later requests joined the running batch instead of waiting for its end
    decode_sizes = [s for s in sizes if s > 0]
    assert max(decode_sizes) >= 2 and decode_sizes[-1] == 1  # they shared steps, and left before the long one ended
    assert scheduler.steps_run < sum(p.max_new_tokens for p in params)  # fewer steps than one request at a time


def test_different_settings_share_a_batch(engine) -> None:
    """Greedy, seeded sampling, repetition penalty and a stop string, all in one batch: each as alone."""
    full = engine.generate([prompt(engine, "Hi")], GenerationParams(max_new_tokens=16))[0].text
    stop = full.split()[1] if len(full.split()) > 1 else full[2:4]
    jobs = [("Hi", GenerationParams(max_new_tokens=16, stop=(stop,))),
            ("Who are you?", GenerationParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)),
            ("Who are you?", GenerationParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=8)),
            ("Count to five.", GenerationParams(max_new_tokens=16, repetition_penalty=1.4)),
            ("Count to five.", GenerationParams(max_new_tokens=16))]
    alone = [engine.generate([prompt(engine, t)], p)[0] for t, p in jobs]
    scheduler = BatchScheduler(engine)
    sizes, handle = slowed(engine, 0.01)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: scheduler.submit(prompt(engine, job[0]), job[1], None), jobs))
    finally:
        handle.remove()
    assert got == alone
    assert max(sizes) >= 3  # they did share steps
    assert stop not in got[0].text and got[1].text != got[2].text  # the seeds are the rows' own


def test_streams_share_the_batch_and_a_cancelled_row_leaves(engine) -> None:
    scheduler = BatchScheduler(engine)
    params = GenerationParams(max_new_tokens=30)
    expected = engine.generate([prompt(engine, "Tell me a long story.")], params)[0]
    sizes, handle = slowed(engine, 0.01)
    try:
        pieces, future = scheduler.stream(prompt(engine, "Tell me a long story."), params, None, threading.Event())
        cancel = threading.Event()
        dropped, dropped_future = scheduler.stream(prompt(engine, "Hi"), GenerationParams(max_new_tokens=200), None,
                                                   cancel)
        deadline = time.time() + 20
        while 2 not in sizes and time.time() < deadline:  # the two share decode steps
            time.sleep(0.005)
        cancel.set()  # the client went away
        text = "".join(pieces)
        list(dropped)  # its stream ends too
    finally:
        handle.remove()
    done = future.result(timeout=10)
    assert done == expected and text.strip() == expected.text
    assert dropped_future.result(timeout=10).completion_tokens < 200
    assert max(sizes) == 2 and sizes[-1] == 1  # both streams decoded together until the cancelled one left
    assert scheduler.steps_run < 60  # and the cancelled one did not go on to its 200 tokens


def test_models_the_loop_does_not_cover_get_static_batches(small_model_dir) -> None:  # noqa: F811
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    model.generation_config.no_repeat_ngram_size = 3  # processing the decode loop does not do
    engine = ChatEngine(model, tokenizer)
    scheduler = BatchScheduler(engine)
    params = GenerationParams(max_new_tokens=8)
    texts = ["Hi", "Who are you?", "Count to three."]
    alone = [engine.generate([prompt(engine, t)], params)[0].text for t in texts]
    assert scheduler.stream(prompt(engine, "Hi"), params, None, threading.Event()) is None  # ChatEngine.stream then
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda t: scheduler.submit(prompt(engine, t), params, None).text, texts))
    assert got == alone


def test_a_failing_request_fails_alone_and_the_scheduler_goes_on(engine) -> None:
    scheduler = BatchScheduler(engine)
    with pytest.raises(Exception):
        scheduler.submit([engine.tokenizer.vocab_size + 10**6], GenerationParams(max_new_tokens=4), None)
    assert scheduler.submit(prompt(engine, "Hi"), GenerationParams(max_new_tokens=4), None).completion_tokens > 0


def test_idle_openmp_threads_are_let_go_and_work_goes_on(engine) -> None:
    """The scheduler lets the OpenMP workers of its creator and of its own idle worker go (native.py), so a thread's
    parallel regions are not slowed by another's idle pool; requests after an idle spell decode as before."""
    from peftkit import native

    x = torch.randn(256, 256)
    assert native.release_openmp_threads()  # torch's OpenMP runtime is loaded, so it is found and paused
    assert torch.equal(x @ x, x @ x)  # parallel work starts new threads afterwards
    scheduler = BatchScheduler(engine)
    first = scheduler.submit(engine.prompt_ids([{"role": "user", "content": "Hi"}]), GenerationParams(max_new_tokens=8),
                             None)
    time.sleep(0.2)  # the worker blocks on its queue, its threads let go
    again = scheduler.submit(engine.prompt_ids([{"role": "user", "content": "Hi"}]), GenerationParams(max_new_tokens=8),
                             None)
    assert again.text == first.text and again.completion_tokens == first.completion_tokens
