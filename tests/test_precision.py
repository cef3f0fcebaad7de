"""The base-weight dtype is chosen by measurement: bf16 only where it is faster."""

import warnings

import pytest
import torch

from peftkit import precision


@pytest.mark.parametrize("faster", [True, False])
def test_base_dtype(monkeypatch, faster: bool) -> None:
    monkeypatch.setattr(precision, "bf16_is_faster", lambda device: faster)
    assert precision.base_dtype(None, False, "cpu") == (torch.bfloat16 if faster else torch.float32)
    assert precision.base_dtype(False, False, "cpu") == torch.float32
    assert precision.base_dtype(None, True, "cpu") == torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = precision.base_dtype(True, False, "cpu")
    assert chosen == (torch.bfloat16 if faster else torch.float32)
    assert bool(caught) == (not faster)



@pytest.fixture
def fresh_probe():
    """`bf16_is_faster` measures again (its cached answer dropped) inside the test, and the real answer comes back
    after it."""
    precision.bf16_is_faster.cache_clear()
    yield
    precision.bf16_is_faster.cache_clear()


@pytest.mark.parametrize("fp32_s,bf16_s,faster,rounds", [
    ([1.0], [5.0], False, 2), ([1.0], [0.3], True, 2),  # two rounds decide where the dtypes differ several times over
    ([1.0], [0.7], True, 5), ([1.0], [0.9], False, 5), ([1.0], [1.5], False, 5),  # a close call takes the best of 5
    ([1.0], [2.5, 0.4], True, 2),  # one preempted bf16 product (2.5x fp32's) does not decide alone
    ([3.0, 1.0], [0.4], True, 2),  # nor a preempted fp32 one
    ([1.0], [0.9, 0.9, 0.45], True, 3)])  # stops once the best times decide
def test_the_dtype_probe_needs_two_rounds_and_stops_once_they_decide(monkeypatch, fresh_probe, fp32_s, bf16_s,
                                                                      faster, rounds) -> None:
    """Each list is the seconds of that dtype's successive products (its last value repeats)."""
    calls: list[torch.dtype] = []

    def seconds(operands: tuple[torch.Tensor, torch.Tensor]) -> float:
        dtype = operands[0].dtype
        times = bf16_s if dtype == torch.bfloat16 else fp32_s
        calls.append(dtype)
        return times[min(calls.count(dtype), len(times)) - 1]

    monkeypatch.setattr(precision, "_matmul_seconds", seconds)
    threads = torch.get_num_threads()
    assert precision.bf16_is_faster("cpu") is faster
    assert calls == [torch.float32, torch.bfloat16] * rounds
    assert torch.get_num_threads() == threads  # the probe's one thread is given back


def test_the_dtype_probe_times_one_thread(monkeypatch, fresh_probe) -> None:
    seen: list[int] = []
    monkeypatch.setattr(precision, "_matmul_seconds", lambda operands: seen.append(torch.get_num_threads()) or 1.0)
    precision.bf16_is_faster("cpu")
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("faster", [True, False])
def test_generation_dtype_of_a_bf16_checkpoint(monkeypatch, tmp_path, faster: bool) -> None:
    """A bf16 checkpoint generates in bf16 where bf16 is fast, else in fp32 on the same weight values; an explicit
    infer_dtype and $PEFTKIT_DTYPE are obeyed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import tuned

    monkeypatch.setattr(precision, "bf16_is_faster", lambda device: faster)
    monkeypatch.delenv(precision.DTYPE_ENV, raising=False)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    stored = LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").state_dict()
    loaded = tuned._in_inference_dtype(LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto"))
    assert loaded.dtype == (torch.bfloat16 if faster else torch.float32)
    assert all(torch.equal(t.float(), stored[name].float()) for name, t in loaded.state_dict().items())
    monkeypatch.setenv(precision.DTYPE_ENV, "bf16")
    assert precision.inference_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert precision.inference_dtype(torch.float32, "cpu") == torch.bfloat16
    monkeypatch.delenv(precision.DTYPE_ENV)
    assert precision.inference_dtype(torch.float32, "cpu") == torch.float32
    assert precision.inference_dtype(torch.bfloat16, "cuda") == torch.bfloat16
