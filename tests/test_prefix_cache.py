"""Prompts' keys and values kept between requests (serve/prefix.py): a prompt that begins as a kept one prefills only
the rest and gets the logits and greedy tokens of a full prefill; a server's adapters each use their own; a change to
any tensor drops the model's entries; the budget holds. Tiny random models (Llama with smollm2's tokenizer, GPT-2)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize, tiny_gpt2
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit import LoraConfig, TunedModel
from peftkit.errors import ConfigError
from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams, decode
from peftkit.serve.prefix import ENV, PrefixCache, budget_from_env, plan

BIG = 1 << 30


@pytest.fixture(scope="module")
def engine(small_model_dir) -> ChatEngine:  # noqa: F811
    return ChatEngine(*load_model_and_tokenizer(str(small_model_dir)))


def chat(engine: ChatEngine, question: str) -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": question}])


def prefill(model, prompts: list[list[int]], prefixes: PrefixCache, pad_id: int = 0) -> tuple[torch.Tensor, int]:
    """The first-token logits of `prompts` prefilled in one `Decoder.add`, and how many positions it computed."""
    decoder = decode.Decoder(model, None, pad_id, prefixes=prefixes)
    seen: dict[str, object] = {}
    forward, choose = decoder._forward, decoder._choose

    def counted(ids, *args):
        seen["width"] = ids.shape[1]
        return forward(ids, *args)

    def recorded(rows, logits):
        seen["logits"] = logits
        return choose(rows, logits)

    decoder._forward, decoder._choose = counted, recorded
    decoder.add([decode.Row(list(p), 1, frozenset()) for p in prompts])
    return seen["logits"], seen["width"]


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_prompt_that_begins_as_a_kept_one_prefills_only_the_rest(engine) -> None:
    kept = chat(engine, "Tell me a story about a cat.")
    other = chat(engine, "What is one plus one? Answer in a long sentence, please.")
    raw = engine.tokenizer.encode("Once upon a time")  # begins otherwise: nothing to reuse
    shared = common(kept, other)
    assert 10 < shared < len(other) - 5  # the template's system prompt and the user turn's start
    cache = PrefixCache(BIG)
    plain, full_width = prefill(engine.model, [kept], PrefixCache(0))
    first, width = prefill(engine.model, [kept], cache)
    assert width == full_width == len(kept) and torch.equal(first, plain) and len(cache.entries) == 1
    for batch, expected_width in (([other], len(other) - shared), ([kept], 1), ([other, kept], len(other) - shared),
                                  ([raw, other], max(len(raw), len(other) - shared))):
        reference, _ = prefill(engine.model, batch, PrefixCache(0))
        cache = PrefixCache(BIG)
        prefill(engine.model, [kept], cache)
        logits, width = prefill(engine.model, batch, cache)
        assert width == expected_width
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_with_kept_prompts_are_those_of_full_prefills(engine) -> None:
    """A batch of rows, some reusing kept prompts (one repeated whole, one sharing the system prompt), one not, one
    shorter than the others' computed part: every row's greedy tokens are those without reuse."""
    prompts = [chat(engine, "Tell me a story about a cat."), chat(engine, "Why is the sky blue? Say it in detail."),
               engine.tokenizer.encode("Hi"), chat(engine, "Tell me a story about a dog.")]
    params = GenerationParams(max_new_tokens=20)

    def tokens(prefixes: PrefixCache) -> list[list[int]]:
        engine.prefixes = prefixes
        rows = engine.rows(prompts, params)
        for r in rows:
            r.stop_ids = frozenset()  # run to the budget
        engine.decoder(engine.model).run(rows)
        return [r.tokens for r in rows]

    try:
        reference = tokens(PrefixCache(0))
        cache = PrefixCache(BIG)
        engine.prefixes = cache
        engine.generate([prompts[0]], GenerationParams(max_new_tokens=2))
        assert tokens(cache) == reference
        assert len(cache.entries) == 4  # the first prompt, kept whole, is covered; the three others were kept
    finally:
        engine.prefixes = PrefixCache()


def test_a_model_with_absolute_positions_reuses_prompts_exactly() -> None:
    """GPT-2 (learned absolute positions, transformers' own forward for every step): the kept positions and the
    computed ones line up."""
    model = tiny_gpt2(seed=3)
    first, second = [5, 9, 11, 40, 41, 42, 7, 8], [5, 9, 11, 40, 41, 42, 60, 61, 62, 63]

    def tokens(prefixes: PrefixCache) -> list[list[int]]:
        decoder = decode.Decoder(model, None, 0, prefixes=prefixes)
        decoder.add([decode.Row(first, 1, frozenset())])
        rows = [decode.Row(second, 12, frozenset()), decode.Row([3, 4], 12, frozenset())]
        decoder.run(rows)
        return [r.tokens for r in rows]

    reference, reference_logits = tokens(PrefixCache(0)), prefill(model, [second], PrefixCache(0))[0]
    assert tokens(PrefixCache(BIG)) == reference
    cache = PrefixCache(BIG)
    prefill(model, [first], cache)
    logits, width = prefill(model, [second], cache)
    assert width == 4
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)


def test_each_adapter_reuses_its_own_and_a_changed_tensor_drops_the_models_entries(small_model_dir) -> None:  # noqa: F811
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    tuned = TunedModel(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize(tuned.method, 0.5)
    engine = ChatEngine(tuned, tokenizer)
    questions = ["Tell me a story about a cat.", "Tell me a story about a dog."]
    params = GenerationParams(max_new_tokens=12)

    def replies(prefixes: PrefixCache) -> tuple[list[str], list[str]]:
        engine.prefixes = prefixes
        def reply(question: str, adapter: str | None) -> str:
            return engine.complete([{"role": "user", "content": question}], params, adapter).text

        return [reply(q, tuned.active_adapter) for q in questions], [reply(q, None) for q in questions]

    reference = replies(PrefixCache(0))
    assert reference[0] != reference[1]  # the adapter acts
    cache = PrefixCache(BIG)
    assert replies(cache) == reference
    assert len(cache.scopes) == 2 and len({n for n, _ in cache.entries.values()}) == 2
    randomize(tuned.method, 0.5, seed=1)  # in place: the version counters move
    changed = replies(PrefixCache(0))
    assert changed != reference
    assert replies(cache) == changed
    assert len(cache.scopes) == 2 and len(cache.entries) == 4  # the stale scopes went with their entries


def fake(n: int, tokens: list[int]) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    layers = [(torch.full((1, len(tokens), 2), float(n)), torch.zeros(1, len(tokens), 2)) for _ in range(2)]
    return tokens, layers


def test_the_budget_holds_and_a_longer_prompt_covers_its_prefix() -> None:
    per_token = 2 * 2 * 2 * 4  # two layers of keys and values, 2 floats each
    cache = PrefixCache(budget=10 * per_token)
    model = torch.nn.Linear(2, 2)
    scope = cache.scope(model)
    cache.keep(scope, *fake(0, [1, 2, 3]))
    cache.keep(scope, *fake(1, [1, 2, 3, 4]))  # covers [1, 2, 3]: that one goes
    cache.keep(scope, *fake(2, [1, 2]))  # covered: nothing new
    assert [e.tokens.tolist() for _, e in cache.entries.values()] == [[1, 2, 3, 4]] and cache.nbytes == 4 * per_token
    cache.keep(scope, *fake(3, [7, 8, 9]))
    assert [n for n, _ in cache.match(scope, [[1, 2, 5], [7, 8, 9, 10], [4]])] == [2, 3, 0]
    cache.keep(scope, *fake(4, [5, 6, 7, 8]))  # over budget: the least recently used ([1, 2, 3, 4]) goes
    assert [e.tokens.tolist() for _, e in cache.entries.values()] == [[7, 8, 9], [5, 6, 7, 8]]
    assert cache.nbytes == 7 * per_token <= cache.budget
    cache.keep(scope, *fake(5, list(range(20, 31))))  # larger than the whole budget: not kept
    assert len(cache.entries) == 2
    with torch.no_grad():
        model.weight.add_(1)
    assert cache.scope(model) != scope and not cache.entries and cache.nbytes == 0


def test_the_plan_prefills_at_least_the_last_token_and_leaves_no_gap() -> None:
    prompts = [[1] * 10, [2] * 10, [3] * 3]
    assert plan(prompts, [10, 6, 0]) == ([6, 6, 0], 4)  # the first row could take 9; all compute 4 positions
    assert plan(prompts[:1], [10]) == ([9], 1)
    assert plan(prompts, [0, 0, 0]) == ([0, 0, 0], 10)


def test_the_budget_comes_from_the_environment(engine, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "0")
    assert not PrefixCache().enabled and engine.decoder(engine.model).prefixes is not None
    assert decode.Decoder(engine.model, None, 0, prefixes=PrefixCache()).prefixes is None
    monkeypatch.setenv(ENV, "1.5")
    assert budget_from_env() == 3 << 19
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ConfigError, match=ENV):
        budget_from_env()


def test_a_buffer_made_in_inference_mode_counts_by_its_identity() -> None:
    """Dynamic RoPE replaces its inv_freq inside the decode loop's inference mode: such a tensor has no version
    counter; the scope still tells a replaced one apart."""
    model, cache = torch.nn.Linear(2, 2), PrefixCache(BIG)
    with torch.inference_mode():
        model.register_buffer("inv_freq", torch.ones(2))
    scope = cache.scope(model)
    assert cache.scope(model) == scope
    with torch.inference_mode():
        model.inv_freq = torch.full((2,), 2.0)
    assert cache.scope(model) != scope


def test_a_bf16_model_reuses_its_own_bf16_keys_and_values(small_model_dir) -> None:  # noqa: F811
    """What a CPU with native bf16 (or a GPU) generates in: kept keys and values stay in the model's dtype and give
    the full prefill's logits to bf16 rounding."""
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    engine = ChatEngine(model, tokenizer)
    kept, other = chat(engine, "Tell me a story about a cat."), chat(engine, "Why is the sky blue?")
    reference, _ = prefill(model, [other], PrefixCache(0))
    cache = PrefixCache(BIG)
    prefill(model, [kept], cache)
    logits, width = prefill(model, [other], cache)
    assert width == len(other) - common(kept, other)
    assert all(k.dtype == torch.bfloat16 for _, e in cache.entries.values() for k, _ in e.layers)
    torch.testing.assert_close(logits, reference, rtol=2e-2, atol=2e-2)
