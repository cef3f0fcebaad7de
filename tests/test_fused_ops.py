"""peftkit's fused RMSNorm and SwiGLU kernels (fused_ops.c): equal to torch's operators to fp32 rounding (in bf16:
rounded where torch's bf16 operators round), forward and backward, whatever the thread count; swapped in only for
Llama-style modules, only inside `fused_layers`, and the model left as it was after. No timings are asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama
from transformers import GemmaConfig, GemmaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftkit import LoraConfig, TunedModel, fused_ops, native


@pytest.fixture(autouse=True)
def kernels():
    if fused_ops.kernels() is None:
        pytest.skip(f"the kernels are not available here: {fused_ops.LIBRARY.why_not}")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def swiglu_both_ways(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(output, d gate, d up) of the kernel and of torch's silu(gate) * up, on the same random inputs"""
    g = torch.Generator().manual_seed(len(shape))
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=g).to(dtype)
    results = []
    for swiglu in (fused_ops.swiglu, lambda a, b: torch.nn.functional.silu(a) * b):
        out = swiglu(gate, up)
        out.backward(grad)
        results.append((out.detach(), gate.grad, up.grad))
        gate.grad = up.grad = None
    return tuple(results)


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 1536), (1, 4099), (9000,)])
def test_swiglu_equals_silu_times_up(shape) -> None:
    ours, theirs = swiglu_both_ways(shape, torch.float32)
    assert all(relative(a, b) <= 1e-6 for a, b in zip(ours, theirs))


def test_swiglu_extremes_and_nan() -> None:
    gate = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("nan")] * 2)
    up = torch.ones_like(gate)
    ours = fused_ops.swiglu(gate, up)
    theirs = torch.nn.functional.silu(gate)
    assert torch.isnan(ours[7]) and torch.isnan(ours[15])
    finite = ~torch.isnan(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_rms_norm_equals_llamas(trained_weight) -> None:
    ours, theirs = norm_both_ways(trained_weight, torch.float32)
    assert relative(ours[0], theirs[0]) <= 1e-6 and relative(ours[1], theirs[1]) <= 1e-5
    if trained_weight:
        assert relative(ours[2], theirs[2]) <= 1e-5
    x = torch.randn(2, 576).to(torch.bfloat16)
    assert fused_ops.rms_norm(x, torch.ones(576), 1e-5) is None  # mixed dtypes


def norm_both_ways(trained_weight: bool, dtype: torch.dtype) -> tuple[tuple[torch.Tensor | None, ...], ...]:
    """(output, dx, d weight or None) of the kernel and of Llama's RMSNorm, on the same random inputs"""
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(576, generator=g).to(dtype)
    norm.weight.requires_grad_(trained_weight)
    x = (torch.randn(2, 37, 576, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(2, 37, 576, generator=g).to(dtype)
    results = []
    for forward in (lambda v: fused_ops.rms_norm(v, norm.weight, norm.variance_epsilon), norm):
        out = forward(x)
        out.backward(grad)
        results.append((out.detach(), x.grad, norm.weight.grad))
        x.grad = norm.weight.grad = None
    return tuple(results)


def test_results_do_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(2)
    gate, up, x = torch.randn(64, 1536, generator=g), torch.randn(64, 1536, generator=g), torch.randn(64, 576)
    weight = torch.randn(576, generator=g)
    cos, sin = torch.randn(1, 64, 64, generator=g), torch.randn(1, 64, 64, generator=g)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append((fused_ops.swiglu(gate, up), fused_ops.rms_norm(x, weight, 1e-6),
                            fused_ops.swiglu(gate.bfloat16(), up.bfloat16()),
                            fused_ops.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-6),
                            fused_ops._rotate(x.view(1, 64, 9, 64).transpose(1, 2), cos, sin, False),
                            fused_ops._rotate(x.view(1, 64, 9, 64).transpose(1, 2), cos, sin, True)))
    finally:
        torch.set_num_threads(before)
    for results in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results, outputs[0]))


def loss_and_grads(tuned: TunedModel, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, tuned.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    context = fused_ops.fused_layers(tuned) if fused else torch.enable_grad()
    with context:
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in tuned.named_parameters() if p.grad is not None}


def test_fused_layers_train_like_torch_and_leave_the_model_as_it_was() -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    swapped = fused_ops._swappable(tuned)
    layers = tuned.model.config.num_hidden_layers
    assert len(swapped) == 2 * layers + 1 + layers  # two norms a layer, the final norm, one MLP a layer
    fused = loss_and_grads(copy.deepcopy(tuned), True)
    plain = loss_and_grads(copy.deepcopy(tuned), False)
    assert fused[0].item() == pytest.approx(plain[0].item(), rel=1e-6) and fused[1].keys() == plain[1].keys()
    for key, grad in plain[1].items():
        assert (fused[1][key] - grad).norm() <= 1e-5 * grad.norm(), key
    with fused_ops.fused_layers(tuned):
        assert all("forward" in module.__dict__ for module, _ in swapped)
    assert not any("forward" in module.__dict__ for module in tuned.modules())


def test_only_llamas_code_is_swapped() -> None:
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert fused_ops._swappable(gemma) == []  # its norm scales by 1 + weight; its MLP's activation is GELU


def test_left_out_when_switched_off(monkeypatch) -> None:
    monkeypatch.setattr(fused_ops, "LIBRARY", native.Library(fused_ops._SOURCE, fused_ops.FUSED_ENV,
                                                             fused_ops._declare))
    monkeypatch.setenv(fused_ops.FUSED_ENV, "0")
    assert fused_ops.kernels() is None and fused_ops.FUSED_ENV in fused_ops.LIBRARY.why_not
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with fused_ops.fused_layers(tuned):
        assert not any("forward" in module.__dict__ for module in tuned.modules())
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(fused_ops.swiglu(gate, up), torch.nn.functional.silu(gate) * up)


def test_nested_blocks_and_a_reference_model_follow_the_step() -> None:
    """A separate reference model takes the fused kernels only while a step runs them (the DPO reference's log-probs
    then equal the policy's to the bit before the first update); a nested block leaves the outer one's modules."""
    policy = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    reference = tiny_llama()
    with fused_ops.like_the_step(reference):
        assert not any("forward" in module.__dict__ for module in reference.modules())
    with fused_ops.fused_layers(policy):
        with fused_ops.fused_layers(policy), fused_ops.like_the_step(reference):
            assert any("forward" in module.__dict__ for module in reference.modules())
        assert not any("forward" in module.__dict__ for module in reference.modules())
        assert all("forward" in module.__dict__ for module, _ in fused_ops._swappable_cached(policy)[0])
    assert not any("forward" in module.__dict__ for module in policy.modules())


def within_a_bf16_step(ours: torch.Tensor, theirs: torch.Tensor, equal: float = 0.99) -> None:
    """bf16 results as torch's bf16 operators': each at most one bf16 step (2^-7 relative) away, most bit-equal (the
    kernels' fp32 arithmetic sums and approximates in another order, so a rounding sometimes falls the other way)."""
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape
    a, b = ours.double(), theirs.double()
    assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-6 * b.abs().max()).all()
    assert (a == b).double().mean().item() >= equal


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 1536), (1, 4099)])
def test_bf16_swiglu_rounds_as_torch(shape) -> None:
    for ours, theirs in zip(*swiglu_both_ways(shape, torch.bfloat16)):
        within_a_bf16_step(ours, theirs)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_bf16_rms_norm_rounds_as_llamas(trained_weight) -> None:
    ours, theirs = norm_both_ways(trained_weight, torch.bfloat16)
    within_a_bf16_step(ours[0], theirs[0])
    within_a_bf16_step(ours[1], theirs[1], equal=0.9)  # torch's backward rounds its pieces in bf16 twice more
    if trained_weight:  # summed over 74 rows: ours in fp32, torch's in bf16
        assert ours[2].dtype == torch.bfloat16 and relative(ours[2], theirs[2]) <= 2e-2


def test_bf16_extremes_and_nan() -> None:
    gate = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("nan")] * 2).to(torch.bfloat16)
    up = torch.ones_like(gate)
    ours, theirs = fused_ops.swiglu(gate, up), torch.nn.functional.silu(gate) * up
    assert torch.isnan(ours[7]) and torch.isnan(ours[15])
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite], theirs[finite])
    x = torch.tensor([[1.0, float("nan")] + [2.0] * 14, [3e38, -3e38] + [1.0] * 14]).to(torch.bfloat16)
    norm = fused_ops.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), 1e-6)
    assert torch.isnan(norm[0]).all() and torch.equal(torch.isfinite(norm[1]),
                                                      torch.isfinite(LlamaRMSNorm(16, 1e-6).to(torch.bfloat16)(x)[1]))


def test_a_bf16_model_trains_like_torch_through_the_kernels() -> None:
    """A bf16 base (as peftkit trains on a CPU with native bf16) runs the kernels: loss and LoRA gradients as torch's
    bf16 operators give them, to bf16 rounding."""
    torch.manual_seed(0)
    tuned = TunedModel(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear",
                                                                    init_lora_weights="gaussian"))
    with fused_ops.fused_layers(tuned):
        assert all("forward" in module.__dict__ for module, _ in fused_ops._swappable(tuned))
    fused = loss_and_grads(copy.deepcopy(tuned), True)
    plain = loss_and_grads(copy.deepcopy(tuned), False)
    assert fused[0].item() == pytest.approx(plain[0].item(), rel=1e-3) and fused[1].keys() == plain[1].keys()
    assert any(grad.norm() > 0 for grad in plain[1].values())
    for key, grad in plain[1].items():
        assert (fused[1][key] - grad).norm() <= 2e-2 * grad.norm(), key
    assert not any("forward" in module.__dict__ for module in tuned.modules())


def test_mixed_dtypes_keep_torchs_operators() -> None:
    """A bf16 activation against an fp32 norm weight (or gate and up of two dtypes) is not a kernel's case."""
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert fused_ops.rms_norm(x, torch.ones(16), 1e-6) is None
    assert torch.equal(fused_ops.swiglu(x, x.float()), torch.nn.functional.silu(x) * x.float())


def per_example_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float):
    parts = [torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                              scale=scale, enable_gqa=True)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, 2).transpose(1, 2)


def row_of_examples(lengths: list[int], heads: int, kv_heads: int, dim: int, seed: int = 0):
    """q [1, heads, tokens, dim], k and v [1, kv_heads, ...] as transformers' attention hands them over (transposed
    views of [tokens, heads, dim]), the bounds, and an incoming gradient [1, tokens, heads, dim]."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    leaves = [torch.randn(1, tokens, n, dim, generator=g).requires_grad_() for n in (heads, kv_heads, kv_heads)]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return leaves, bounds, torch.randn(1, tokens, heads, dim, generator=g)


@pytest.mark.parametrize("lengths,heads,kv_heads,dim", [
    ([5, 17, 33, 1, 64], 4, 2, 16), ([100, 7, 250], 9, 3, 64), ([300], 2, 2, 32), ([9, 40, 3], 4, 2, 8)])
def test_attention_equals_sdpa_per_example(lengths, heads, kv_heads, dim) -> None:
    """Forward and every gradient as causal SDPA run example by example, to fp32 rounding (<= 1e-5 relative);
    grouped-query heads, a one-token example, a head dim of 8 (the 16-wide products' tail)."""
    leaves, bounds, grad = row_of_examples(lengths, heads, kv_heads, dim)
    q, k, v = (t.transpose(1, 2) for t in leaves)
    plain = per_example_sdpa(q, k, v, bounds, 0.3)
    plain.backward(grad)
    expected = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with fused_ops.fused_layers(TunedModel(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))):
        ours = fused_ops.attention(q, k, v, bounds, 0.3)
    assert ours is not None and ours.shape == (1, sum(lengths), heads, dim)
    ours.backward(grad)
    assert relative(ours, plain) <= 1e-5
    for leaf, want in zip(leaves, expected):
        assert relative(leaf.grad, want) <= 1e-5


def test_bf16_attention_is_the_fp32_kernel_on_the_widened_inputs_rounded_once(monkeypatch) -> None:
    """On a bf16 base without AVX512_BF16 the kernel reads q, k and v widened to fp32 and rounds its output and
    gradients to bf16 once: to the bit the fp32 kernel's results on the same (bf16-valued) inputs, rounded; within
    bf16 rounding of SDPA's."""
    leaves, bounds, grad = row_of_examples([37, 5, 90], 6, 2, 16, seed=3)
    monkeypatch.setattr(fused_ops, "_active", 1)
    monkeypatch.setattr(fused_ops, "has_bf16_dot", lambda: False)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        inputs = [t.detach().to(torch.bfloat16).to(dtype).requires_grad_() for t in leaves]
        out = fused_ops.attention(*(t.transpose(1, 2) for t in inputs), bounds, 0.25)
        assert out.dtype == dtype
        out.backward(grad.to(torch.bfloat16).to(dtype))
        results[dtype] = [out.detach()] + [t.grad for t in inputs]
    for half, full in zip(results[torch.bfloat16], results[torch.float32]):
        assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
    exact = [t.detach().to(torch.bfloat16).float().requires_grad_() for t in leaves]
    plain = per_example_sdpa(*(t.transpose(1, 2) for t in exact), bounds, 0.25)
    plain.backward(grad.to(torch.bfloat16).float())
    for half, want in zip(results[torch.bfloat16], [plain.detach()] + [t.grad for t in exact]):
        assert relative(half.float(), want) <= 1e-2


def kernel_attention(leaves: list[torch.Tensor], bounds: list[int], grad: torch.Tensor, scale: float,
                     dtype: torch.dtype = torch.bfloat16):
    """The kernel's output and q, k, v gradients for `dtype` copies of `leaves` (inside a step's block)."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    fused_ops._active += 1
    try:
        out = fused_ops.attention(*(t.transpose(1, 2) for t in inputs), bounds, scale)
    finally:
        fused_ops._active -= 1
    out.backward(grad.to(dtype))
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.skipif(not fused_ops.has_bf16_dot(), reason="this CPU has no AVX512_BF16 (or no C compiler)")
@pytest.mark.parametrize("lengths,heads,kv_heads,dim", [
    ([37, 5, 90], 6, 2, 16), ([100, 7, 250], 9, 3, 64), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33], 4, 2, 32),
    ([300], 2, 2, 48)])
def test_bf16_attention_on_dot_products_is_as_exact_as_torch_bf16_sdpa(lengths, heads, kv_heads, dim) -> None:
    """With AVX512_BF16, bf16 attention multiplies in bf16 pairs (P and dS rounded to bf16): output and gradients
    within bf16 rounding of exact SDPA on the same bf16 values, no further from it than torch's own bf16 SDPA (2x its
    error, 1e-3 slack for one rounding step), for odd lengths, one-token examples and 16-wide head dims (the products'
    column tails)."""
    leaves, bounds, grad = row_of_examples(lengths, heads, kv_heads, dim, seed=3)
    ours = kernel_attention(leaves, bounds, grad, 0.25)
    exact = [t.detach().to(torch.bfloat16).float().requires_grad_() for t in leaves]
    want = per_example_sdpa(*(t.transpose(1, 2) for t in exact), bounds, 0.25)
    want.backward(grad.to(torch.bfloat16).float())
    halves = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
    torch_bf16 = per_example_sdpa(*(t.transpose(1, 2) for t in halves), bounds, 0.25)
    torch_bf16.backward(grad.to(torch.bfloat16))
    for mine, theirs, truth in zip(ours, [torch_bf16.detach()] + [t.grad for t in halves],
                                   [want.detach()] + [t.grad for t in exact]):
        assert mine.dtype == torch.bfloat16
        assert relative(mine.float(), truth) <= min(1e-2, 2 * relative(theirs.float(), truth) + 1e-3)


@pytest.mark.parametrize("dtype,dot", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_attention_does_not_depend_on_the_thread_count(monkeypatch, dtype, dot) -> None:
    """The fp32 kernel and both bf16 ones (widened to fp32, or on dot products where the CPU has them): bit-equal
    results on 1, 2 and 3 threads."""
    if dot and not fused_ops.has_bf16_dot():
        pytest.skip("this CPU has no AVX512_BF16 (or no C compiler)")
    monkeypatch.setattr(fused_ops, "has_bf16_dot", lambda: dot)
    leaves, bounds, grad = row_of_examples([70, 3, 130, 41], 6, 2, 32, seed=1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kernel_attention(leaves, bounds, grad, 0.25, dtype))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_exp_columns_is_amax_sub_exp_sum_in_two_passes_whatever_the_thread_count() -> None:
    """The fused head's softmax numerators: column maxima, exp(x - peak) in place and the column sums, as torch's
    amax, sub_, exp_ and sum compute them to fp32 rounding, at a padded row stride (37 of 40 columns: a scalar tail)
    over several row blocks; bit-equal on 1, 2 and 3 threads; columns past the view untouched."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(700, 40, generator=g) * 8
    logits[650, 3] = 50.0  # a peak in the last, partial block
    peak = logits[:, :37].amax(0)
    want = (logits[:, :37] - peak).exp()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            buffer = logits.clone()
            ours_peak, sums = fused_ops.exp_columns(buffer[:, :37])
            assert torch.equal(ours_peak, peak) and torch.equal(buffer[:, 37:], logits[:, 37:])
            results.append((buffer[:, :37], sums))
    finally:
        torch.set_num_threads(before)
    assert relative(results[0][0], want) <= 1e-6
    assert relative(results[0][1], want.double().sum(0).float()) <= 1e-5
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
    assert fused_ops.exp_columns(logits.t()) is None  # not unit column stride: torch's operators instead


def test_attention_stands_aside_outside_a_step_and_where_it_does_not_apply(monkeypatch) -> None:
    leaves, bounds, _ = row_of_examples([20, 30], 4, 2, 16)
    q, k, v = (t.transpose(1, 2) for t in leaves)
    assert fused_ops.attention(q, k, v, bounds, 0.25) is None  # no step's fused_layers block is open
    monkeypatch.setattr(fused_ops, "_active", 1)
    assert fused_ops.attention(q, k, v, bounds, 0.25) is not None
    assert fused_ops.attention(*(t.to(torch.bfloat16) for t in (q, k, v)), bounds, 0.25) is not None
    assert fused_ops.attention(q.half(), k.half(), v.half(), bounds, 0.25) is None  # fp16: the matmul attention
    assert fused_ops.attention(q, k.to(torch.bfloat16), v, bounds, 0.25) is None  # mixed dtypes
    assert fused_ops.attention(q[..., :12], k[..., :12], v[..., :12], bounds, 0.25) is None  # head dim 12
    assert fused_ops.attention(q, k, v, bounds, 0.25, sliding_window=25) is None  # an example wider than the window
    assert fused_ops.attention(q, k, v, bounds, 0.25, sliding_window=30) is not None
    monkeypatch.setattr(fused_ops, "ATTENTION_MAX_LEN", 25)  # an example longer than the kernel takes
    assert fused_ops.attention(q, k, v, bounds, 0.25) is None


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_padding_free_step_trains_like_sdpa(dtype, tolerance, monkeypatch) -> None:
    """A LoRA step's loss and gradients through the trainer's objective on a padding-free batch, with the attention
    kernel and without it (fp32: SDPA per example; loss within 1e-6, gradients within 1e-5 relative; on a bf16 base:
    the batched bf16 matmuls, which round the scores, so within bf16 rounding)."""
    from peftkit.data import SFTCollator
    from peftkit.objectives.sft import token_loss_sum

    tuned = TunedModel(tiny_llama().to(dtype), LoraConfig(r=4, target_modules="all-linear",
                                                          init_lora_weights="gaussian"))
    tuned.train()
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
            for ids in (torch.randint(0, tuned.model.config.vocab_size, (n,), generator=g).tolist()
                        for n in (19, 40, 7, 33))]
    batch = SFTCollator(pad_token_id=0, padding_free=True)(rows)
    calls = []
    apply = fused_ops._Attention.apply
    monkeypatch.setattr(fused_ops._Attention, "apply", lambda *a: calls.append(1) or apply(*a))
    results = []
    for longest in (fused_ops.ATTENTION_MAX_LEN, 0):  # 0: every example too long for the kernel
        monkeypatch.setattr(fused_ops, "ATTENTION_MAX_LEN", longest)
        model = copy.deepcopy(tuned)
        with fused_ops.fused_layers(model):
            loss, _ = token_loss_sum(model, batch)
            loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused), (plain_loss, plain) = results
    assert len(calls) == tuned.model.config.num_hidden_layers  # the kernel ran in every layer, then not at all
    assert fused_loss == pytest.approx(plain_loss, rel=tolerance / 10) and fused.keys() == plain.keys()
    for key, grad in plain.items():
        assert (fused[key] - grad).norm() <= tolerance * grad.norm(), key


def rotary_inputs(batch: int, tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                  shared: bool = False):
    """q and k leaves as a layer's projections write them ([batch, tokens, heads * dim]), Llama's cos and sin for
    positions that differ per row (`shared`: one set for all rows, as a padded batch has them), and incoming gradients
    [batch, heads, tokens, dim]"""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    g = torch.Generator().manual_seed(tokens)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads))
    q = torch.randn(batch, tokens, heads * dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, tokens, kv_heads * dim, generator=g).to(dtype).requires_grad_()
    positions = torch.arange(tokens)[None] + (0 if shared else 7 * torch.arange(batch)[:, None])
    cos, sin = rope(q, positions)
    grads = [torch.randn(batch, n, tokens, dim, generator=g).to(dtype) for n in (heads, kv_heads)]
    return q, k, cos, sin, grads


def rotated(apply, q, k, cos, sin, grads) -> list[torch.Tensor]:
    """apply's rotated q and k, and the gradients of q's and k's leaves"""
    dim = cos.shape[-1]
    q.grad = k.grad = None
    out = apply(*(t.view(*t.shape[:2], -1, dim).transpose(1, 2) for t in (q, k)), cos, sin)
    torch.autograd.backward(list(out), grads)
    return [t.detach() for t in out] + [q.grad, k.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,dim,shared", [
    (1, 300, 9, 3, 64, False), (2, 17, 4, 2, 16, False), (3, 11, 4, 2, 16, True), (1, 5, 2, 2, 128, False)])
def test_rotary_equals_transformers_to_the_bit(dtype, batch, tokens, heads, kv_heads, dim, shared) -> None:
    """The kernel's rotation and its gradient are transformers' apply_rotary_pos_emb's to the bit, in fp32 and in bf16
    (each product and sum rounded where torch rounds it), in the projections' layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inputs = rotary_inputs(batch, tokens, heads, kv_heads, dim, dtype, shared)
    assert inputs[2].shape[0] == (1 if shared else batch)
    fused_ops._active += 1  # as inside a step's fused_layers
    try:
        calls = []
        apply = fused_ops._Rope.apply
        ours = rotated(lambda *a: calls.append(1) or apply(*a), *inputs)
        stand_in = rotated(fused_ops.rotary(apply_rotary_pos_emb), *inputs)
    finally:
        fused_ops._active -= 1
    theirs = rotated(apply_rotary_pos_emb, *inputs)
    assert calls and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(a, b) for a, b in zip(stand_in, theirs))
    assert ours[0].stride() == theirs[0].stride()  # the layout torch's operators leave


def test_rotary_stands_aside_outside_a_step_and_where_it_does_not_apply(monkeypatch) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    calls = []
    stand_in = fused_ops.rotary(lambda *a: calls.append(1) or apply_rotary_pos_emb(*a))
    q, k, cos, sin, _ = rotary_inputs(1, 12, 4, 2, 16, torch.float32)
    q, k = (t.view(1, 12, -1, 16).transpose(1, 2) for t in (q, k))
    stand_in(q, k, cos, sin)
    assert len(calls) == 1  # no step's fused_layers block is open
    monkeypatch.setattr(fused_ops, "_active", 1)
    stand_in(q, k, cos, sin)
    assert len(calls) == 1
    cases = [(q.contiguous(), k, cos, sin),  # another layout
             (q, k, cos.double(), sin.double()),  # mixed dtypes
             (q[..., :8], k[..., :8], cos[..., :8], sin[..., :8]),  # head size 8
             (q, k, cos.requires_grad_(), sin)]  # a trained embedding
    for case in cases:
        stand_in(*case)
    stand_in(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)  # the other unsqueeze_dim
    assert len(calls) == 1 + len(cases) + 1


def test_the_rotary_reference_is_found_behind_a_hub_kernel_module() -> None:
    """transformers 5.25 with `kernels` installed turns `apply_rotary_pos_emb` into an nn.Module whose forward calls
    the function it closes over (kernels' `use_kernel_forward_from_hub`): the kernel's check looks through it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def plain(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    def make(func):
        class Func(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return func(*args, **kwargs)

        return Func()

    assert fused_ops._plain_function(make(plain)) is plain
    assert fused_ops._plain_function(plain) is plain
    found = fused_ops._plain_function(apply_rotary_pos_emb)
    assert found.__name__ == "apply_rotary_pos_emb" and fused_ops._code(found)  # whichever transformers is installed
    assert fused_ops._code(torch.nn.Identity()) == ()  # no Python code: matches no reference


def test_no_rotary_swap_where_llamas_own_function_cannot_be_read(monkeypatch) -> None:
    from transformers.models.llama import modeling_llama

    model = rotary_model("llama")
    assert len(fused_ops._rotary_namespaces(model)) == 1
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", torch.nn.Identity())  # neither a function nor a wrapper
    assert fused_ops._rotary_namespaces(model) == []


def rotary_model(family: str) -> torch.nn.Module:
    """A tiny model of `family` whose head size (16) the rotary kernel takes"""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_step_through_the_rotary_kernel_trains_as_without_it(family, monkeypatch) -> None:
    """Swapped in for the step's forward and backward in the module the model's attention calls it from (Qwen3 norms
    q and k before rotating them), put back after; the step's loss and LoRA gradients equal to the bit."""
    tuned = TunedModel(rotary_model(family), LoraConfig(r=4, target_modules="all-linear",
                                                        init_lora_weights="gaussian"))
    plain = copy.deepcopy(tuned)
    modules, namespaces = fused_ops._swappable_cached(plain)
    assert len(namespaces) == 1
    original = namespaces[0]["apply_rotary_pos_emb"]
    monkeypatch.setitem(fused_ops._found, plain, (modules, []))  # the same step without the rotary kernel
    calls = []
    apply = fused_ops._Rope.apply
    monkeypatch.setattr(fused_ops._Rope, "apply", lambda *a: calls.append(1) or apply(*a))
    with_kernel = loss_and_grads(tuned, True)
    assert len(calls) == 2 and namespaces[0]["apply_rotary_pos_emb"] is original
    without = loss_and_grads(plain, True)
    assert len(calls) == 2
    assert torch.equal(with_kernel[0], without[0]) and with_kernel[1].keys() == without[1].keys()
    assert all(torch.equal(with_kernel[1][key], grad) for key, grad in without[1].items())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_padding_free_step_through_the_rotary_kernel_trains_as_without_it(checkpointing, monkeypatch) -> None:
    """Padding-free rows (positions restart at each example; the attention kernel after the rotation), with and
    without gradient checkpointing (the backward recomputes the rotation): loss and LoRA gradients equal to the bit."""
    from peftkit.data import SFTCollator
    from peftkit.objectives.sft import token_loss_sum
    from peftkit.varlen import attention_for

    tuned = TunedModel(rotary_model("llama"), LoraConfig(r=4, target_modules="all-linear",
                                                         init_lora_weights="gaussian"))
    if checkpointing:
        if hasattr(tuned.model, "activation_checkpointing_enable"):  # transformers' newer name, as the trainer
            tuned.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            tuned.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned.train()
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
            for ids in (torch.randint(0, 64, (n,), generator=g).tolist() for n in (19, 40, 7, 33))]
    batch = SFTCollator(pad_token_id=0, padding_free=True)(rows)
    calls = []
    apply = fused_ops._Rope.apply
    monkeypatch.setattr(fused_ops._Rope, "apply", lambda *a: calls.append(1) or apply(*a))
    results = []
    for kernel in (True, False):
        model = copy.deepcopy(tuned)
        if not kernel:
            modules, _ = fused_ops._swappable_cached(model)
            monkeypatch.setitem(fused_ops._found, model, (modules, []))
        with attention_for(model, batch), fused_ops.fused_layers(model):  # over the backward too, as the trainer
            loss, _ = token_loss_sum(model, batch)
            loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == (4 if checkpointing else 2)  # two layers, each recomputed in the backward
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.equal(ours, theirs) and our_grads.keys() == their_grads.keys()
    assert all(torch.equal(our_grads[k], grad) for k, grad in their_grads.items())
