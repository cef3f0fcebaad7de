"""The direct decode step (serve/llama_step.py) against the model's own forward: the same logits and cache to the bit,
alone and in a left-padded batch, with GQA, attention biases, eager attention and a LoRA adapter; where it would not be
the model's own forward (another architecture, a hook, virtual tokens), the decode loop does not take it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from peftkit import LoraConfig, PrefixTuningConfig, TunedModel
from peftkit.serve import decode, gemv, kv
from peftkit.serve.fast_layers import FastLayers
from peftkit.serve.llama_step import LlamaStep, NativeLayers


def llama(**overrides) -> LlamaForCausalLM:
    return family("llama", **overrides)


FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def family(architecture: str, **overrides):
    """A small random model of a Llama-family architecture (Qwen2: q/k/v biases; Qwen3: an RMSNorm on each head of q
    and k; Mistral: no sliding window unless asked)."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, head_dim=16)
    if architecture == "mistral":
        settings["sliding_window"] = None
    config_class, model_class = FAMILIES[architecture]
    model = model_class(config_class(**{**settings, **overrides})).eval()
    if architecture == "qwen3":  # norms that are not all ones, so that they show
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(0.5, 1.5)
    return model


def steps(model, direct: LlamaStep | None, prompts: list[list[int]], count: int = 6,
          layers: FastLayers | None = None, fed: list[torch.Tensor] | None = None,
          chosen: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Prefill `prompts` left-padded, then `count` greedy decode steps through `direct` (None: the model's forward);
    each step's logits and, last, every layer's cached keys and values. `chosen` collects the token fed to each step;
    `fed` replaces them (another run's `chosen`, so that a near-tie decided the other way does not change the
    inputs)."""
    ids, mask = decode.left_padded(prompts, 0)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = kv.new_cache(model)
    padded = None if bool(mask.all()) else mask
    out = []
    with torch.inference_mode():
        token = model(input_ids=ids, attention_mask=padded, position_ids=positions, past_key_values=cache,
                      use_cache=True).logits[:, -1].argmax(-1)
        next_pos = mask.sum(-1)
        for i in range(count):
            if fed is not None:
                token = fed[i]
            if chosen is not None:
                chosen.append(token)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            padded = None if bool(mask.all()) else mask
            args = (token[:, None], padded, next_pos[:, None], cache)
            with layers.active(model) if layers is not None else torch.inference_mode():
                if direct is None:
                    logits = model(input_ids=args[0], attention_mask=args[1], position_ids=args[2],
                                   cache=cache, use_cache=True, logits_to_keep=1).logits
                else:
                    logits = direct(*args)
            out.append(logits.clone())
            token, next_pos = logits[:, -1].argmax(-1), next_pos + 1
    for layer in cache.layers:
        out += [layer.keys.clone(), layer.values.clone()]
    return out


def assert_bit_equal(model, prompts: list[list[int]], layers: FastLayers | None = None) -> None:
    direct = LlamaStep.build(model)
    assert direct is not None
    theirs = steps(model, None, prompts, layers=layers)
    ours = steps(model, direct, prompts, layers=layers)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


PROMPTS = [[5, 9, 17, 3, 44, 12], [7, 2], [100, 101, 102, 103]]


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}, {"num_key_value_heads": 4},
                                       {"attn_implementation": "eager"}],
                         ids=["gqa", "biases", "mha", "eager"])
def test_same_logits_and_cache_as_the_models_forward(overrides) -> None:
    model = llama(**overrides)
    assert_bit_equal(model, PROMPTS[:1])  # one row, no mask
    assert_bit_equal(model, PROMPTS)  # left-padded rows


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "mistral"])
def test_same_logits_and_cache_for_the_other_llama_family_architectures(architecture) -> None:
    model = family(architecture)
    assert LlamaStep.build(model).architecture == architecture
    assert_bit_equal(model, PROMPTS[:1])
    assert_bit_equal(model, PROMPTS)


@pytest.mark.parametrize("architecture, overrides", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("mistral", {"sliding_window": 4})], ids=["qwen2", "qwen3", "mistral"])
def test_a_sliding_window_keeps_the_models_forward(architecture, overrides) -> None:
    assert LlamaStep.build(family(architecture)) is not None
    assert LlamaStep.build(family(architecture, **overrides)) is None


def test_same_with_a_lora_adapter_and_the_decode_products() -> None:
    tuned = TunedModel(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: its product shows in the logits
    assert decode._direct_step(tuned) is not None
    assert_bit_equal(tuned.model, PROMPTS, layers=FastLayers())


def test_the_decode_loop_takes_it_only_where_it_is_the_models_own_forward(monkeypatch) -> None:
    assert decode._direct_step(tiny_llama()) is not None
    assert decode._direct_step(tiny_qwen2()) is not None  # Llama's code but for the (here unused) sliding window
    assert decode._direct_step(tiny_gpt2()) is None
    prefix = TunedModel(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))  # routes attention, adds a hook
    assert decode._direct_step(prefix) is None
    monkeypatch.setenv(decode.DIRECT_ENV, "0")
    assert decode._direct_step(tiny_llama()) is None


def test_a_hook_added_later_sends_steps_back_to_the_models_forward() -> None:
    model = llama()
    direct = LlamaStep.build(model)
    assert direct is not None and direct.still_valid()
    handle = model.model.layers[1].register_forward_hook(lambda *_: None)
    assert not direct.still_valid() and LlamaStep.build(model) is None
    handle.remove()
    assert direct.still_valid()
    model.model.layers[0].self_attn.forward = lambda *a, **k: None  # an instance forward replaces the class's
    assert not direct.still_valid()


@pytest.fixture(autouse=True)
def kernel_chosen(monkeypatch):
    """The kernel's results are checked wherever it can run, not only where this process's speed probe chose it
    (a busy machine can make the probe say no)."""
    if gemv.kernel() is not None:
        monkeypatch.setattr(gemv, "_faster", True)


# --- the decode kernel standing in for the decoder layers (NativeLayers) ---
def native_for(model, products: FastLayers | None = None) -> NativeLayers:
    if gemv.kernel() is None:
        pytest.skip(f"peftkit's decode kernel is not available here: {gemv.LIBRARY.why_not}")
    native = NativeLayers.build(LlamaStep.build(model), products if products is not None else FastLayers())
    assert native is not None
    return native


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}, {"num_key_value_heads": 1},
                                       {"bf16_values": True}],
                         ids=["gqa", "biases", "one-kv-head", "bf16-copies"])
def test_the_kernel_gives_the_layers_results_to_fp32_rounding(overrides) -> None:
    bf16_values = overrides.pop("bf16_values", False)
    model = llama(**overrides)
    if bf16_values:  # a bf16 checkpoint generated from in fp32: the kernel reads bf16 copies of the weights
        model = model.to(torch.bfloat16).to(torch.float32)
    products = FastLayers()
    native = native_for(model, products)
    assert all(e.bf16[0] == int(bf16_values) for e in native.table)
    for prompts in (PROMPTS[:1], PROMPTS):
        theirs = steps(model, None, prompts)
        ours = steps(model, native, prompts)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert ours[0].abs().max() > 1  # logits that mean something: the comparison is not of near-zeros


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "mistral"])
def test_the_kernel_computes_the_other_llama_family_architectures(architecture) -> None:
    model = family(architecture)
    native = native_for(model)
    assert all(bool(e.qnorm) == (architecture == "qwen3") for e in native.table)
    for prompts in (PROMPTS[:1], PROMPTS):
        theirs = steps(model, None, prompts)
        ours = steps(model, native, prompts)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bf16 = family(architecture).to(torch.bfloat16)
    native = native_for(bf16)
    fed: list[torch.Tensor] = []
    theirs = steps(bf16, None, PROMPTS, chosen=fed)
    ours = steps(bf16, native, PROMPTS, fed=fed)
    assert max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, theirs)) <= 0.125
    if architecture == "qwen3":  # the per-head norms are modules the kernel stands in for: a hook keeps torch's
        model.model.layers[1].self_attn.k_norm.register_forward_hook(lambda *_: None)
        assert NativeLayers.build(LlamaStep.build(model), FastLayers()) is None


def trained_lora(model, names=("default",), **settings) -> TunedModel:
    """`model` with LoRA adapters on every projection whose B is not zero (a trained adapter shows in the logits)."""
    tuned = None
    for i, name in enumerate(names):
        cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **settings})
        if tuned is None:
            tuned = TunedModel(model, cfg, adapter_name=name)
        else:
            tuned.add_adapter(name, cfg)
        g = torch.Generator().manual_seed(i)
        for key, p in tuned.named_parameters():
            if f"lora_B.{name}" in key:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return tuned.eval()


def assert_kernel_matches(model, native) -> None:
    for prompts in (PROMPTS[:1], PROMPTS):
        theirs = steps(model, None, prompts)
        ours = steps(model, native, prompts)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16_values", [False, True], ids=["fp32", "bf16-copies"])
def test_the_kernel_computes_an_unmerged_lora_adapter(bf16_values) -> None:
    """`peftkit chat --adapter` and a server of several adapters: LoRA on all seven projections, in the kernel."""
    base = llama(attention_bias=True)
    if bf16_values:
        base = base.to(torch.bfloat16).to(torch.float32)
    tuned = trained_lora(base)
    native = native_for(tuned.model)
    assert native.max_rank == 4 and all(list(e.rank) == [4] * 7 for e in native.table)
    plain = steps(llama(attention_bias=True), None, PROMPTS[:1])
    assert not torch.allclose(steps(tuned.model, None, PROMPTS[:1])[0], plain[0], atol=1e-2)  # the adapter shows
    assert_kernel_matches(tuned.model, native)


def test_the_kernel_follows_the_active_adapter() -> None:
    """Switching adapters (the API between batches), disabling them and merging one each make a new plan."""
    tuned = trained_lora(llama(), names=("one", "two"), target_modules=["q_proj", "v_proj", "down_proj"])
    model = tuned.model
    native = native_for(model)
    assert_kernel_matches(model, native)
    tuned.set_adapter("two")
    assert not native.current()
    native = native_for(model)
    assert_kernel_matches(model, native)
    with tuned.disable_adapter():
        assert not native.current()
        native = native_for(model)
        assert native.max_rank == 0
        assert_kernel_matches(model, native)
    tuned.merge_adapter("two")
    assert not native.current()
    native = native_for(model)
    assert native.max_rank == 0  # merged: the base weights hold it
    assert_kernel_matches(model, native)


def test_the_kernel_stands_in_only_for_plain_modules() -> None:
    model = llama()
    native_for(model)
    dora = TunedModel(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True))
    assert NativeLayers.build(LlamaStep.build(dora.model), FastLayers()) is None
    dropout = TunedModel(llama(), LoraConfig(r=4, target_modules=["v_proj"], lora_dropout=0.1))
    dropout.train()  # dropout on the adapter's input: torch's forward
    assert NativeLayers.build(LlamaStep.build(dropout.model), FastLayers()) is None
    dropout.eval()
    assert NativeLayers.build(LlamaStep.build(dropout.model), FastLayers()) is not None
    mixed = llama().to(torch.bfloat16)
    mixed.model.layers[1].mlp.up_proj.float()  # one fp32 layer in a bf16 model: torch's forward
    assert NativeLayers.build(LlamaStep.build(mixed), FastLayers()) is None
    half = llama().to(torch.float16)
    assert NativeLayers.build(LlamaStep.build(half), FastLayers()) is None
    model.model.layers[2].mlp.register_forward_hook(lambda *_: None)
    assert NativeLayers.build(LlamaStep.build(model), FastLayers()) is None


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}, {"num_key_value_heads": 1},
                                       {"lora": True}],
                         ids=["gqa", "biases", "one-kv-head", "lora"])
def test_the_kernel_computes_a_bf16_model_as_torch_rounds_it(overrides) -> None:
    """A bf16 model (what a CPU with native bf16 generates in): bf16 weights and cache, each operator's result rounded
    to bf16 where torch's bf16 forward rounds it. The logits are torch's bf16 logits up to a rounding flipped by the
    summation order (a bf16 step of 1/32 at these magnitudes), and much closer to them than the same weights
    evaluated in fp32 are, which the kernel without its roundings would be."""
    lora = overrides.pop("lora", False)
    model = llama(**overrides).to(torch.bfloat16)
    if lora:  # fp32 adapters on a bf16 base, as peftkit and PEFT load them
        model = trained_lora(model).model
        assert model.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == torch.float32
    native = native_for(model)
    assert all(list(e.bf16) == [1] * 7 for e in native.table) and native.max_rank == (4 if lora else 0)
    fp32 = copy.deepcopy(model).float()  # the same weights, evaluated in fp32
    for prompts in (PROMPTS[:1], PROMPTS):
        fed: list[torch.Tensor] = []
        theirs = steps(model, None, prompts, chosen=fed)
        ours, exact = steps(model, native, prompts, fed=fed), steps(fp32, None, prompts, fed=fed)
        assert all(t.dtype == torch.bfloat16 for t in ours)  # logits, then the cache's keys and values
        ours_off = [(a.float() - b.float()).abs() for a, b in zip(ours, theirs)]
        exact_off = [(a.float() - b.float()).abs() for a, b in zip(exact, theirs)]
        assert max(float(d.max()) for d in ours_off) <= 0.125  # four bf16 steps at these magnitudes (4 to 8)
        assert sum(float(d.mean()) for d in ours_off) < 0.7 * sum(float(d.mean()) for d in exact_off)
        assert theirs[0].abs().max() > 1


def test_a_weight_changed_in_place_is_picked_up_and_the_loop_uses_the_kernel() -> None:
    model = llama()
    native = native_for(model)
    assert native.current()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(2)  # what merging an adapter does
    assert not native.current()

    def tokens(direct: bool) -> list[list[int]]:
        """Two decode steps, a weight changed between them (a fresh model each time, of bf16 values: the kernel reads
        bf16 copies of its weights, which must be made again)."""
        model = llama().to(torch.bfloat16).to(torch.float32)
        decoder = decode.Decoder(model, None, 0, FastLayers(), direct=direct)
        rows = [decode.Row(list(p), 5, frozenset()) for p in PROMPTS]
        decoder.add(rows)
        decoder.step()
        assert (decoder.native is not None and decoder.native.current()) == direct
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.mul_(-2)
        decoder.step()  # with the kernel: a fresh plan, over the changed weights
        assert (decoder.native is not None and decoder.native.current()) == direct
        return [r.tokens for r in rows]

    assert tokens(True) == tokens(False)


def test_the_decode_loop_decodes_a_bf16_model_through_the_kernel() -> None:
    native_for(llama().to(torch.bfloat16))  # skips where the kernel is not used

    def tokens(direct: bool) -> tuple[list[list[int]], decode.Decoder]:
        decoder = decode.Decoder(llama().to(torch.bfloat16), None, 0, FastLayers(), direct=direct)
        rows = [decode.Row(list(p), 6, frozenset()) for p in PROMPTS]
        decoder.run(rows)
        return [r.tokens for r in rows], decoder

    ours, decoder = tokens(True)
    assert decoder.native is not None and decoder.native.dtype == torch.bfloat16
    theirs, decoder = tokens(False)
    assert decoder.native is None
    assert ours == theirs  # no near-tie on this model and prompts: torch's bf16 tokens

