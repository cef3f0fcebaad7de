"""peftkit's small-batch decode kernel (serve/gemv.c) and the decode-time products built on it (serve/fast_layers.py):
equal to torch's products to fp32 rounding (1e-5 relative), a row's result the same alone, in a batch and on any
thread count, bf16 copies only of weights that are bf16 values, torch's product wherever the kernel does not apply
(bf16 models, prefills, gradients). No timings are asserted."""

from __future__ import annotations

import pytest
import torch
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit import native
from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams, fast_layers, gemv


@pytest.fixture(autouse=True)
def kernel():
    if gemv.kernel() is None:
        pytest.skip(f"the kernel is not available here: {gemv.LIBRARY.why_not}")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("k", [576, 1536, 37, 100])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 16])
def test_fp32_product_equals_f_linear(k: int, rows: int) -> None:
    g = torch.Generator().manual_seed(k * rows)
    w, b = torch.randn(300, k, generator=g), torch.randn(300, generator=g)
    x = torch.randn(rows, k, generator=g)
    for bias in (None, b):
        assert relative(gemv.linear(x, w, bias), torch.nn.functional.linear(x, w, bias)) <= 1e-5
    # an fp32 x against a bf16 weight multiplies in fp32: torch's product on the weight's fp32 values
    half = w.to(torch.bfloat16)
    assert relative(gemv.linear(x, half, b), torch.nn.functional.linear(x, half.float(), b)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(97, 576, generator=g).to(dtype)  # fp32, or a bf16 copy of bf16 values
    x = torch.randn(11, 576, generator=g)
    batch = gemv.linear(x, w, None)
    assert torch.equal(torch.cat([gemv.linear(x[i:i + 1], w, None) for i in range(11)]), batch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(gemv.linear(x, w, None), batch)
    finally:
        torch.set_num_threads(threads)


def test_more_rows_than_the_kernel_takes_go_to_torch() -> None:
    w, x = torch.randn(8, 16), torch.randn(65, 16)  # the kernel's own bound is 64 rows
    assert torch.equal(gemv.linear(x, w, None), torch.nn.functional.linear(x, w))


def model_with(small_model_dir, bf16_values: bool):  # noqa: F811
    model = load_model_and_tokenizer(str(small_model_dir))[0]
    if bf16_values:  # a bf16 checkpoint loaded in fp32
        model = model.to(torch.bfloat16).to(torch.float32)
    return model.eval()


@pytest.mark.parametrize("bf16_values", [True, False])
def test_fast_layers_read_bf16_copies_only_of_bf16_values(small_model_dir, monkeypatch,  # noqa: F811
                                                          bf16_values: bool) -> None:
    monkeypatch.setattr(gemv, "faster", lambda: True)  # whatever this machine measures
    model = model_with(small_model_dir, bf16_values)
    products = fast_layers.FastLayers()
    ids = torch.randint(0, 1000, (1, gemv.MAX_ROWS + 4))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        step = model(input_ids=ids[:, :1]).logits  # one row: the kernel's case
        with products.active(model):
            assert "forward" in vars(model.model.layers[0].self_attn.q_proj)
            assert torch.equal(model(input_ids=ids).logits, plain)  # a prefill over MAX_ROWS rows: torch's product
            fast_step = model(input_ids=ids[:, :1]).logits
    assert relative(fast_step, step) <= 1e-5
    copies = [entry[2] for entry in products.halves.values()]
    assert copies and all((c is not None) == bf16_values for c in copies)
    if bf16_values:
        assert all(c.dtype == torch.bfloat16 for c in copies)


def test_greedy_decoding_through_the_kernel_equals_generate(small_model_dir, monkeypatch) -> None:  # noqa: F811
    from test_decode import QUESTIONS, fast_tokens, hf_tokens, prompts

    monkeypatch.setattr(gemv, "faster", lambda: True)
    engine = ChatEngine(*load_model_and_tokenizer(str(small_model_dir)))
    engine.model = model_with(small_model_dir, True)
    ps, params = prompts(engine, QUESTIONS), GenerationParams(max_new_tokens=24)
    assert fast_tokens(engine, engine.model, ps, params) == hf_tokens(engine, engine.model, ps, params)
    assert engine.layers.halves  # through the kernel, on bf16 copies


def test_built_on_first_use_and_left_out_without_a_compiler(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(gemv, "LIBRARY", native.Library(gemv._SOURCE, gemv.GEMV_ENV, gemv._declare))
    monkeypatch.setattr(gemv, "_faster", None)
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    assert gemv.kernel() is not None
    assert len(list((tmp_path / "kernels").glob("gemv-*.so"))) == 1

    monkeypatch.setattr(gemv, "LIBRARY", native.Library(gemv._SOURCE, gemv.GEMV_ENV, gemv._declare))
    monkeypatch.setattr(gemv, "_faster", None)
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert gemv.kernel() is None and "compiler" in gemv.LIBRARY.why_not
    assert not gemv.faster()
    w = torch.randn(8, 16)
    products = fast_layers.FastLayers()
    assert products._forward(w, None) is None  # nothing to swap in: the layer runs as it is
