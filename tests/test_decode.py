"""peftkit's decode loop (serve/decode.py) against transformers' `model.generate`: the same tokens for greedy decoding
in float32 (batch 1, a left-padded batch, with a LoRA adapter, with prefix tuning), the same processing for sampling
settings, stop ids / strings / max_new_tokens / cancel as before, rows that join a running batch and leave it, bf16
weights packed bit-identically. Tiny random models with smollm2's tokenizer (real prompts), except the slow tests."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import randomize
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit import LoraConfig, PrefixTuningConfig, TunedModel
from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams, decode, fast_layers, gemv, kv, packed

QUESTIONS = ["Hi", "Who are you? Tell me all about yourself.", "What is one plus one?"]


@pytest.fixture(scope="module")
def engine(small_model_dir) -> ChatEngine:  # noqa: F811
    return ChatEngine(*load_model_and_tokenizer(str(small_model_dir)))


def prompts(engine: ChatEngine, questions: list[str] = QUESTIONS) -> list[list[int]]:
    return [engine.prompt_ids([{"role": "user", "content": q}]) for q in questions]


def hf_tokens(engine: ChatEngine, model, ps: list[list[int]], params: GenerationParams) -> list[list[int]]:
    """What `model.generate` writes for each row: its new tokens up to and including the first stop token."""
    if params.seed is not None:
        torch.manual_seed(params.seed)
    batch = engine._batch(ps)
    with torch.no_grad():
        out = model.generate(**batch, **engine._generate_kwargs(params))
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in engine.stop_ids), None)
        rows.append(row[:end + 1] if end is not None else row)
    return rows


def fast_tokens(engine: ChatEngine, model, ps: list[list[int]], params: GenerationParams) -> list[list[int]]:
    rows = engine.rows(ps, params, model)
    assert rows is not None
    engine.decoder(model).run(rows)
    return [r.tokens for r in rows]


def test_greedy_equals_generate_alone_and_left_padded(engine) -> None:
    ps = prompts(engine)
    assert len({len(p) for p in ps}) == 3  # different lengths: the batch is left-padded
    params = GenerationParams(max_new_tokens=24)
    assert fast_tokens(engine, engine.model, ps[1:2], params) == hf_tokens(engine, engine.model, ps[1:2], params)
    batched = fast_tokens(engine, engine.model, ps, params)
    assert batched == hf_tokens(engine, engine.model, ps, params)
    assert all(len(t) > 3 for t in batched)


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules="all-linear"),
                                    PrefixTuningConfig(num_virtual_tokens=3)], ids=["lora", "prefix"])
def test_greedy_equals_generate_with_an_adapter(small_model_dir, config) -> None:  # noqa: F811
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    tuned = TunedModel(model, config)
    randomize(tuned.method, 0.5)
    engine = ChatEngine(tuned, tokenizer)
    ps, params = prompts(engine), GenerationParams(max_new_tokens=16)
    with_adapter = fast_tokens(engine, tuned, ps, params)
    assert with_adapter == hf_tokens(engine, tuned, ps, params)
    with tuned.disable_adapter():
        assert fast_tokens(engine, tuned, ps, params) != with_adapter  # the adapter acts


@pytest.mark.parametrize("settings", [
    {"repetition_penalty": 1.5}, {"repetition_penalty": 0.2},
    {"temperature": 0.8, "top_p": 0.9, "seed": 3}, {"temperature": 1.3, "top_k": 20, "seed": 1},
    {"temperature": 1.0, "top_p": 0.0, "seed": 2}, {"temperature": 0.7, "repetition_penalty": 1.2, "seed": 4},
])
def test_sampling_settings_process_logits_as_generate(engine, settings) -> None:
    """Alone, a seeded sampled row draws what `generate` draws after torch.manual_seed(seed)."""
    ps, params = prompts(engine)[1:2], GenerationParams(max_new_tokens=16, **settings)
    assert fast_tokens(engine, engine.model, ps, params) == hf_tokens(engine, engine.model, ps, params)


def test_completions_are_the_same_through_either_path(engine, monkeypatch) -> None:
    ps = prompts(engine)
    full = engine.generate(ps[:1], GenerationParams(max_new_tokens=24))[0].text
    stop = full.split()[1] if len(full.split()) > 1 else full[2:4]
    for params in (GenerationParams(max_new_tokens=24), GenerationParams(max_new_tokens=5),
                   GenerationParams(max_new_tokens=24, stop=(stop,))):
        fast = engine.generate(ps, params)
        monkeypatch.setenv("PEFTKIT_DECODE", "generate")
        slow = engine.generate(ps, params)
        monkeypatch.delenv("PEFTKIT_DECODE")
        assert fast == slow, params
    cut = engine.generate(ps[:1], GenerationParams(max_new_tokens=24, stop=(stop,)))[0]
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert engine.generate(ps[:1], GenerationParams(max_new_tokens=5))[0].completion_tokens == 5


def test_stop_ids_end_a_row_and_count(engine) -> None:
    ps = prompts(engine)[1:2]
    free = engine.rows(ps, GenerationParams(max_new_tokens=12))
    engine.decoder(engine.model).run(free)
    third = free[0].tokens[2]
    rows = engine.rows(ps, GenerationParams(max_new_tokens=12))
    rows[0].stop_ids = frozenset({third})  # the model's own third token becomes an end token
    engine.decoder(engine.model).run(rows)
    assert rows[0].tokens == free[0].tokens[:free[0].tokens.index(third) + 1] and rows[0].done


def test_cancel_ends_generation_at_the_next_token(engine) -> None:
    cancel = threading.Event()
    rows = engine.rows(prompts(engine), GenerationParams(max_new_tokens=50), cancel=cancel)
    rows[0].stop_ids = rows[1].stop_ids = rows[2].stop_ids = frozenset()
    seen = []
    rows[0].on_token = lambda token: (seen.append(token), len(seen) == 4 and cancel.set())
    engine.decoder(engine.model).run(rows)
    assert [len(r.tokens) for r in rows] == [4, 4, 4]
    cancel = threading.Event()
    cancel.set()
    done = engine.generate(prompts(engine)[:1], GenerationParams(max_new_tokens=50), cancel=cancel)[0]
    assert done.completion_tokens == 0 and done.finish_reason == "stop"


def test_a_joining_row_gets_what_it_gets_alone_and_finished_rows_leave(engine) -> None:
    """Rows join a batch that has been decoding for a few steps (one prompt shorter, one longer than the batch's
    cache), rows finish at different lengths and leave at once: every row's tokens are its tokens alone."""
    ps = prompts(engine, ["Hi", "Tell me a story about a cat.", "What is one plus one? Answer in a long sentence.",
                          "Why?"])
    budgets = [30, 6, 20, 12]

    def row(i: int) -> decode.Row:
        r = engine.rows([ps[i]], GenerationParams(max_new_tokens=budgets[i]))[0]
        r.stop_ids = frozenset()  # run to the budget: lengths differ by design
        return r

    alone = []
    for i in range(4):
        r = row(i)
        engine.decoder(engine.model).run([r])
        alone.append(r.tokens)
    decoder = engine.decoder(engine.model)
    rows = [row(i) for i in range(4)]
    decoder.add(rows[:2])
    sizes = []
    for _ in range(3):
        decoder.step()
        sizes.append(len(decoder))
    decoder.add(rows[2:])  # one longer prompt than the batch's cache, one shorter
    while len(decoder):
        decoder.step()
        sizes.append(len(decoder))
        batch = decoder.cache.layers[0].keys.shape[0] if len(decoder) else 0
        assert batch == len(decoder) == decoder.mask.shape[0]  # finished rows have left the cache
    assert [r.tokens for r in rows] == alone
    assert sizes[:4] == [2, 2, 2, 4] and sizes[3:] == sorted(sizes[3:], reverse=True) and sizes[-1] == 0


def test_trim_drops_padding_no_row_uses(engine) -> None:
    ps = prompts(engine, ["Hi", "Tell me a long story about a cat and a dog."])
    rows = engine.rows(ps, GenerationParams(max_new_tokens=3))
    rows[1].max_new_tokens = 1  # the long prompt's row finishes at prefill and never joins
    decoder = engine.decoder(engine.model)
    decoder.add(rows)
    assert len(decoder) == 1 and decoder.mask.shape[1] == len(ps[0]) == kv.length(decoder.cache)  # no padding left


def test_models_and_settings_it_does_not_cover_use_generate(small_model_dir) -> None:  # noqa: F811
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    engine = ChatEngine(model, tokenizer)
    params = GenerationParams(max_new_tokens=12)
    assert engine.rows([[1, 2]], params) is not None
    model.generation_config.no_repeat_ngram_size = 2  # processing the loop does not do
    assert engine.rows([[1, 2]], params) is None
    ps = prompts(engine)
    assert [c.completion_tokens for c in engine.generate(ps, params)] == [len(t) for t in
                                                                          hf_tokens(engine, model, ps, params)]
    model.generation_config.no_repeat_ngram_size = None
    calls = []
    model.generate = lambda **kw: calls.append(kw) or torch.cat(  # a wrapper on the instance stays in charge
        [kw["input_ids"], torch.full((kw["input_ids"].shape[0], 1), engine.stop_ids[0])], dim=1)
    assert engine.rows([[1, 2]], params) is None and engine.generate(ps[:1], params)[0].completion_tokens == 1
    assert calls


def test_a_cache_grows_in_place_and_takes_row_surgery(engine) -> None:
    cache = kv.new_cache(engine.model)
    assert all(type(layer) is kv.GrowingLayer for layer in cache.layers) and kv.rows_supported(cache)
    layer = cache.layers[0]
    k = torch.randn(2, 2, 5, 8)
    layer.update(k, -k)
    step = torch.randn(2, 2, 1, 8)
    keys, values = layer.update(step, -step)
    assert torch.equal(keys, torch.cat([k, step], dim=2)) and torch.equal(values, -keys)
    kv.left_pad(cache, 2)
    kv.keep_rows(cache, torch.tensor([1]))
    keys, _ = layer.update(step[:1], -step[:1])
    assert torch.equal(keys, torch.cat([torch.zeros(1, 2, 2, 8), k[1:], step[1:], step[:1]], dim=2))


def test_packed_bf16_weights_give_the_same_logits(small_model_dir, monkeypatch) -> None:  # noqa: F811
    if not packed.exact():
        pytest.skip("oneDNN's packed bf16 product is not bit-identical on this CPU, so peftkit does not pack here")
    model = load_model_and_tokenizer(str(small_model_dir))[0].to(torch.bfloat16)
    weights = fast_layers.FastLayers()
    ids = torch.randint(0, 1000, (3, 7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with weights.active(model):
            assert "forward" in vars(model.model.layers[0].mlp.down_proj)
            assert torch.equal(model(input_ids=ids).logits, plain)
        assert "forward" not in vars(model.model.layers[0].mlp.down_proj)  # only while active
        model.lm_head.weight.mul_(2)  # a weight changed after packing (an adapter merged in): packed again
        changed = model(input_ids=ids).logits
        with weights.active(model):
            assert torch.equal(model(input_ids=ids).logits, changed)
    with weights.active(model):  # with gradients: the plain product, so training through it is unchanged
        out = model(input_ids=ids).logits
        assert out.requires_grad and torch.equal(out.detach(), changed)


def test_no_packing_where_the_packed_product_is_not_exact(small_model_dir, monkeypatch) -> None:  # noqa: F811
    """A CPU without AVX-512 (oneDNN refuses bf16 packing there, or rounds differently): bf16 layers run as they are
    (peftkit's kernel takes fp32 activations only)."""
    monkeypatch.setattr(packed, "exact", lambda: False)
    model = load_model_and_tokenizer(str(small_model_dir))[0].to(torch.bfloat16)
    weights = fast_layers.FastLayers()
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        for _ in range(2):  # the first entry decides; the second keeps to it
            with weights.active(model):
                assert "forward" not in vars(model.model.layers[0].mlp.down_proj)
                assert torch.equal(model(input_ids=ids).logits, plain)
    assert not weights.packs


# --- the real model ---
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_greedy_equals_transformers_generate(smollm2, dtype, monkeypatch) -> None:
    """On SmolLM2-135M, in float32 and in bf16 (packed weights there, the decode kernel off: see the next test), the
    decode loop writes exactly the tokens of transformers' own `generate` in the same dtype, alone and in a
    left-padded batch."""
    if dtype == torch.bfloat16:
        monkeypatch.setenv(decode.NATIVE_ENV, "0")
    model, tokenizer = load_model_and_tokenizer(smollm2)
    engine = ChatEngine(model.to(dtype), tokenizer)
    ps = prompts(engine, ["Who are you?", "Explain how a CPU cache works.", "List five fruits."])
    params = GenerationParams(max_new_tokens=48)
    assert fast_tokens(engine, engine.model, ps[:1], params) == hf_tokens(engine, engine.model, ps[:1], params)
    assert fast_tokens(engine, engine.model, ps, params) == hf_tokens(engine, engine.model, ps, params)


@pytest.mark.slow
def test_smollm2_in_bf16_through_the_kernel_leaves_generate_only_at_near_ties(smollm2, monkeypatch) -> None:
    """The decode kernel computes a bf16 model as torch rounds it but sums in its own order, so a bf16 rounding can
    fall the other way: greedy tokens are `generate`'s until two candidates' bf16 logits lie within a few bf16 steps
    of each other (0.125 apart at logits of 16 to 32), where either is the model's choice. A wrong kernel leaves at
    once, by whole logits."""
    if gemv.kernel() is None:
        pytest.skip(f"peftkit's decode kernel is not available here: {gemv.LIBRARY.why_not}")
    monkeypatch.setattr(gemv, "_faster", True)  # checked wherever it runs, whatever this process's speed probe said
    model, tokenizer = load_model_and_tokenizer(smollm2)
    engine = ChatEngine(model.to(torch.bfloat16), tokenizer)
    ps = prompts(engine, ["Who are you?", "Explain how a CPU cache works.", "List five fruits.",
                          "Write a haiku about the sea.", "What is 17 times 3?"])
    params = GenerationParams(max_new_tokens=48)
    decoder = engine.decoder(engine.model)
    rows = engine.rows(ps, params, engine.model)
    decoder.run(rows)
    assert decoder.native is not None  # the kernel decoded them
    ours, theirs = [r.tokens for r in rows], hf_tokens(engine, engine.model, ps, params)
    agreed = []
    for prompt, a, b in zip(ps, ours, theirs):
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        agreed.append(len(b) if at is None else at)
        if at is not None:
            with torch.no_grad():
                scores = engine.model(input_ids=torch.tensor([prompt + b[:at]])).logits[0, -1].float()
            assert scores[b[at]] - scores[a[at]] <= 0.375, (at, float(scores[b[at]]), float(scores[a[at]]))
    assert sum(agreed) >= len(ps) * 8, agreed  # mostly the same text
