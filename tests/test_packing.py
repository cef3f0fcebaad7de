"""Packing: the packed loss equals the unpacked loss, because the 4-D mask keeps examples from seeing each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, VOCAB, tiny_llama

from peftkit import ConfigError
from peftkit.data import IGNORE_INDEX, SFTCollator, check_packing_support, pack

CUTOFF = 48


def synthetic_examples(n: int = 14, seed: int = 0) -> list[dict]:
    """Tokenizer-free examples: random ids, loss on the last two thirds, labels[0] = -100 as `encode` makes it."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        prompt = length // 3
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * max(1, prompt) + ids[max(1, prompt):]})
    return rows


def token_loss(model, batch: dict) -> tuple[float, int]:
    """Sum of per-token cross-entropies over label tokens (shifted: logits at t predict labels at t+1), and count."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((labels != IGNORE_INDEX).sum())


def test_pack_is_complete_bounded_and_deterministic() -> None:
    examples = synthetic_examples(40)
    rows = pack(examples, CUTOFF)
    assert rows == pack(examples, CUTOFF)
    assert len(rows) < len(examples) and all(len(r["input_ids"]) <= CUTOFF for r in rows)
    assert sum(len(r["seq_lens"]) for r in rows) == len(examples)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    for r in rows:
        assert sum(r["seq_lens"]) == len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        assert r["position_ids"] == [p for n in r["seq_lens"] for p in range(n)]
        starts = [sum(r["seq_lens"][:i]) for i in range(len(r["seq_lens"]))]
        assert all(r["labels"][s] == IGNORE_INDEX for s in starts)  # no example learns to predict the next one
    with pytest.raises(ConfigError, match="cutoff_len"):
        pack([{"input_ids": [1] * 10, "labels": [1] * 10}], 8)


def test_collator_pads_and_builds_block_diagonal_mask() -> None:
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "position_ids": [0, 1, 0, 1, 2],
             "seq_lens": [2, 3]},
            {"input_ids": [3, 4], "labels": [-100, 4], "position_ids": [0, 1], "seq_lens": [2]}]
    batch = SFTCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][1].tolist() == [3, 4, 0, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 4] + [-100] * 6
    assert batch["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed[:5] == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0],
                           [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    assert (mask[0, 0, :, 5:] == torch.finfo(torch.float32).min).all()  # nobody attends to padding
    plain = SFTCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [-100, 2]},
                                         {"input_ids": [3], "labels": [-100]}])
    assert plain["attention_mask"].tolist() == [[1, 1], [1, 0]] and "position_ids" not in plain


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(arch: str, attn: str) -> None:
    """Llama, Qwen2 and GPT-2 in transformers 5 take the 4-D float mask as is; the losses agree to 1e-4."""
    model = TINY_MODELS[arch]()
    model.config._attn_implementation = attn
    check_packing_support(model)
    examples = synthetic_examples()
    packed_rows = pack(examples, CUTOFF)
    assert len(packed_rows) < len(examples)
    collate = SFTCollator(pad_token_id=0)
    loss_sum, count = token_loss(model, collate(examples))
    packed_sum, packed_count = token_loss(model, collate(packed_rows))
    assert packed_count == count
    assert abs(packed_sum / packed_count - loss_sum / count) < 1e-4
    # The model's own shifted loss agrees too, so the trainer may use `model(**batch).loss`.
    with torch.no_grad():
        assert abs(float(model(**collate(packed_rows)).loss) - loss_sum / count) < 1e-4


def test_second_example_sees_only_itself() -> None:
    """Logits of a packed row's second example equal its logits alone; a plain causal mask (the control) leaks."""
    model, collate = tiny_llama(), SFTCollator(pad_token_id=0)
    first, second = synthetic_examples(2)
    n1, n2 = len(first["input_ids"]), len(second["input_ids"])
    row = {"input_ids": first["input_ids"] + second["input_ids"], "labels": first["labels"] + second["labels"],
           "position_ids": [*range(n1), *range(n2)], "seq_lens": [n1, n2]}

    def logits(rows: list[dict]) -> torch.Tensor:
        with torch.no_grad():
            return model(**{k: v for k, v in collate(rows).items() if k != "labels"}).logits[0]

    alone = logits([second])
    assert (logits([row])[n1:] - alone).abs().max() < 1e-5
    leaky = logits([{"input_ids": row["input_ids"], "labels": row["labels"]}])
    assert (leaky[n1:] - alone).abs().max() > 1e-3


def test_half_precision_mask_and_unsupported_attention() -> None:
    model = tiny_llama().to(torch.bfloat16)
    rows = pack(synthetic_examples(), CUTOFF)
    batch = SFTCollator(pad_token_id=0, mask_dtype=torch.bfloat16)(rows)
    assert batch["attention_mask"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        check_packing_support(model)


# --- padding-free batches: one flattened row, per-example causal attention ---

def loss_and_grads(model, batch: dict) -> tuple[float, int, list[torch.Tensor]]:
    from peftkit.train.trainer import token_loss_sum

    model.zero_grad()
    total, count = token_loss_sum(model, batch)
    total.backward()
    return total.item(), count, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_padding_free_equals_padded(arch: str) -> None:
    """The same examples, padded or flattened (and packed, then flattened): same loss sum, count and gradients."""
    from peftkit.varlen import supports_padding_free

    model = TINY_MODELS[arch]()
    assert supports_padding_free(model)
    examples = synthetic_examples(8)
    padded = SFTCollator(pad_token_id=0)(examples)
    flat = SFTCollator(pad_token_id=0, padding_free=True)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert "attention_mask" not in flat and flat["cu_seq_lens_q"][-1] == flat["input_ids"].shape[1]
    ref_sum, ref_count, ref_grads = loss_and_grads(model, padded)
    for batch in (flat, SFTCollator(pad_token_id=0, padding_free=True)(pack(examples, CUTOFF))):
        total, count, grads = loss_and_grads(model, batch)
        assert count == ref_count and abs(total - ref_sum) / ref_count < 1e-5
        assert len(grads) == len(ref_grads)
        assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-4) for g, r in zip(grads, ref_grads))
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward


def test_padding_free_marks_example_starts_and_keeps_sliding_windows() -> None:
    """Each example's first token is never a target, even in rows whose labels did not say so; a sliding window
    shorter than an example is honoured (Mistral-style), matching the model's own masked attention."""
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    flat = SFTCollator(pad_token_id=0, padding_free=True)(rows)
    assert flat["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and flat["cu_seq_lens_q"].tolist() == [0, 3, 5]

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=5)).eval()
    examples = synthetic_examples(6, seed=3)
    ref_sum, ref_count, _ = loss_and_grads(model, SFTCollator(pad_token_id=0)(examples))
    total, count, _ = loss_and_grads(model, SFTCollator(pad_token_id=0, padding_free=True)(examples))
    assert count == ref_count and abs(total - ref_sum) / count < 1e-5
