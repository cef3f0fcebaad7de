"""The chunked LM head + cross-entropy gives the plain loss and gradients (fp32: <= 1e-5), and stands aside where it
cannot stand in for the model's head."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM

import peftkit.objectives.sft as sft
from peftkit import LoraConfig, TunedModel
from peftkit.objectives import fused_head
from peftkit.objectives.fused_head import fusable_head, linear_cross_entropy_sum


def loss_and_grads(model: torch.nn.Module, batch: dict, fused: bool, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(sft, "fusable_head", lambda model: None)
        loss, units = sft.token_loss_sum(model, batch)
    loss.backward()
    return loss.item(), units, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def padded_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 60), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100  # prompts
    labels[1, 45:] = -100  # a shorter row: ignored rows inside the kept columns
    mask = torch.ones_like(ids)
    mask[1, 45:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
def test_full_model_loss_and_gradients_equal_the_plain_path(make, monkeypatch) -> None:
    monkeypatch.setattr(fused_head, "CHUNK_ROWS", 32)  # several chunks, one partial
    model = make()
    assert fusable_head(model) is not None
    batch = padded_batch(model.config.vocab_size)
    fused = loss_and_grads(copy.deepcopy(model), batch, True, monkeypatch)
    plain = loss_and_grads(copy.deepcopy(model), batch, False, monkeypatch)
    assert fused[1] == plain[1] and fused[0] == pytest.approx(plain[0], rel=1e-6)
    assert fused[2].keys() == plain[2].keys()
    for key, grad in plain[2].items():
        assert (fused[2][key] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, key


def test_lora_gradients_equal_the_plain_path(monkeypatch) -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    batch = padded_batch(tuned.model.config.vocab_size, seed=1)
    fused = loss_and_grads(copy.deepcopy(tuned), batch, True, monkeypatch)
    plain = loss_and_grads(copy.deepcopy(tuned), batch, False, monkeypatch)
    assert fused[0] == pytest.approx(plain[0], rel=1e-6) and fused[2].keys() == plain[2].keys()
    assert all((fused[2][k] - g).norm() <= 1e-5 * g.norm() for k, g in plain[2].items())


def test_the_plain_path_where_the_head_is_not_a_plain_linear() -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert fusable_head(tuned) is None  # a trained copy of the head: the adapter's module, not nn.Linear
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert fusable_head(gemma) is None  # final_logit_softcapping after the head


def test_rows_all_ignored_and_no_grad() -> None:
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.full((5,), -100)
    loss = linear_cross_entropy_sum(hidden, head, targets, -100)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and head.weight.grad.abs().sum() == 0
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head(hidden), torch.arange(5), reduction="sum")
        assert linear_cross_entropy_sum(hidden, head, torch.arange(5), -100).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("bias", [False, True])
def test_linear_log_probs_equal_log_softmax_with_any_row_weights(bias) -> None:
    """DPO/KTO weigh each row's log-prob by a factor known only after forward: values and gradients (hidden, weight,
    bias) equal the plain log_softmax path in fp32, chunks spanning several CHUNK_ROWS."""
    from peftkit.objectives.fused_head import CHUNK_ROWS, linear_log_probs

    g = torch.Generator().manual_seed(0)
    rows, width, vocab = CHUNK_ROWS + 37, 16, 50
    head = torch.nn.Linear(width, vocab, bias=bias)
    hidden = torch.randn(rows, width, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100
    weights = torch.randn(rows, generator=g)

    ours = linear_log_probs(hidden, head, targets, -100)
    (ours * weights).sum().backward()
    mine = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()
    plain = torch.log_softmax(head(hidden).float(), -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    plain = plain * (targets != -100)
    (plain * weights).sum().backward()
    theirs = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert (ours - plain).abs().max() <= 1e-5 and ours[::7].abs().max() == 0
    for a, b in zip(mine, theirs):
        assert (a - b).abs().max() <= 1e-5


def test_chunks_are_equal_and_cover_every_row(monkeypatch) -> None:
    monkeypatch.setattr(fused_head, "CHUNK_ROWS", 100)
    for rows in (0, 1, 99, 100, 101, 250, 301):
        chunks = fused_head._chunks(rows)
        sizes = [c.stop - c.start for c in chunks]
        assert sum(sizes) == rows and max(sizes) <= 100 and max(sizes) - min(sizes) < len(chunks)
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert [c.stop - c.start for c in fused_head._chunks(101)] == [51, 50]


@pytest.mark.parametrize("bias", [False, True])
def test_half_precision_head_rounds_its_logits_like_the_plain_path(bias, monkeypatch) -> None:
    """bf16 weights: the logits are rounded to bf16 before the fp32 softmax, as `head(hidden).float()` does."""
    monkeypatch.setattr(fused_head, "CHUNK_ROWS", 24)
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(32, 300, bias=bias).to(torch.bfloat16)
    hidden = torch.randn(70, 32, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 300, (70,), generator=g)
    targets[::5] = -100
    ours = linear_cross_entropy_sum(hidden, head, targets, -100)
    ours.backward()
    mine = hidden.grad.clone()
    hidden.grad = None
    plain = torch.nn.functional.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")
    plain.backward()
    assert ours.item() == pytest.approx(plain.item(), rel=1e-4)
    assert (mine.float() - hidden.grad.float()).norm() <= 1e-2 * hidden.grad.float().norm()
    assert mine[::5].abs().max() == 0


@pytest.mark.parametrize("train_head", [True, False], ids=["head-trained", "frozen-head"])
@pytest.mark.parametrize("kernels", ["1", "0"], ids=["kernels", "torch-ops"])
def test_fp32_chunks_with_a_padded_row_stride_give_the_plain_gradients(monkeypatch, train_head, kernels) -> None:
    """A chunk of 22 rows keeps their transposed logits at a row stride of 24 (ALIGN): loss and every gradient as the
    plain path's, <= 1e-5; with a frozen head (LoRA's case) the softmax's scale and the one-hot target are applied to
    the hidden states' gradient instead of the logits; the softmax's numerators by the kernel or torch's operators."""
    monkeypatch.setattr(fused_head, "CHUNK_ROWS", 24)
    if kernels == "0":
        monkeypatch.setattr(fused_head, "exp_columns", lambda x: None)
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(32, 300, bias=True).requires_grad_(train_head)
    hidden = torch.randn(70, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (70,), generator=g)
    targets[::6] = -100
    assert [c.stop - c.start for c in fused_head._chunks(70)] == [24, 24, 22]
    params = [hidden, head.weight, head.bias] if train_head else [hidden]
    ours = linear_cross_entropy_sum(hidden, head, targets, -100)
    ours.backward()
    mine = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, ignore_index=-100, reduction="sum")
    plain.backward()
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, p in zip(mine, params):
        assert (a - p.grad).abs().max() <= 1e-5


def test_cpu_scratch_buffers_grow_by_doubling_up_to_the_largest_need() -> None:
    """A kept buffer too small is replaced by one twice its size (never more than `most`, never less than asked), so
    chunks that grow a few rows at a time do not map and touch a new buffer each step."""
    import threading

    from peftkit.objectives import fused_head

    sizes: list[int] = []

    def grow() -> None:
        like = torch.zeros(1)
        for size in (100, 120, 150, 210, 260, 300, 500):
            sizes.append(fused_head._scratch(like, size, torch.float32, most=300).numel())
            sizes.append(fused_head._kept.buffers[torch.float32].numel())

    thread = threading.Thread(target=grow)  # its own kept buffers: other tests' leave this thread's alone
    thread.start()
    thread.join()
    assert sizes[0::2] == [100, 120, 150, 210, 260, 300, 500]  # each call gets the size it asked for
    assert sizes[1::2] == [100, 200, 200, 300, 300, 300, 500]  # kept: doubled, capped at `most`, or what is asked


def test_cpu_scratch_buffers_are_kept_per_thread() -> None:
    """The head's CPU buffers are reused by the next call of the same thread, never shared with another thread."""
    import threading

    from peftkit.objectives import fused_head

    like = torch.zeros(1)
    first = fused_head._scratch(like, 100, torch.float32)
    assert fused_head._scratch(like, 60, torch.float32).data_ptr() == first.data_ptr()
    assert fused_head._scratch(like, 60, torch.bfloat16).dtype == torch.bfloat16
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(fused_head._scratch(like, 100, torch.float32)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != first.data_ptr()
