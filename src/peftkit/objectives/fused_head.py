"""The LM head and the cross-entropy in one pass over chunks of rows, never holding every logit at once.

A plain loss keeps the logits of every label position in the model's dtype, their fp32 copy and the softmax
gradient: (2 + 4 + 4) bytes x positions x vocabulary, 0.5 GB for 1,000 positions of a 49k vocabulary. Here each chunk's
logits are made, turned into its loss and its gradients (softmax minus the one-hot target), and dropped; backward only
scales the stored gradients. Same arithmetic as the plain path (logits in the model's dtype, softmax in fp32), so the
results agree to rounding.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..fused_ops import exp_columns

CHUNK_ROWS = 384  # the most rows a chunk holds: 384 x 49k fp32 logits = 75 MB at a time
ALIGN = 8  # the transposed logits' row stride, in elements: a multiple of 8 floats (32 bytes) keeps MKL's fast path


def _chunks(rows: int) -> list[slice]:
    """At most CHUNK_ROWS rows each, of equal size: the vocabulary product runs best on a few large chunks, and a
    small remainder chunk would run at half the speed."""
    if rows == 0:
        return [slice(0, 0)]
    count = -(-rows // CHUNK_ROWS)
    size = -(-rows // count)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _stride(rows: int) -> int:
    return -(-rows // ALIGN) * ALIGN


_kept = threading.local()  # each thread's CPU scratch buffers, by dtype, kept from one step to the next


def _scratch(like: torch.Tensor, size: int, dtype: torch.dtype, most: int | None = None) -> torch.Tensor:
    """A flat scratch tensor of `size` elements. On the CPU it is kept for the thread's next call: a fresh 37-75 MB
    buffer is mapped anew by the allocator each time, and its first touch (page faults) took 25-125 ms, as long as
    the head's softmax. Other devices' allocators cache memory themselves.

    A kept buffer too small for `size` is replaced by one of twice its size, up to `most` elements (what the largest
    call can need): chunks grow by a few rows at a time over a job's first steps, and the README benchmark's job
    allocated each buffer 5 times (~500 MB of first touches in all) where doubling allocates it twice."""
    if like.device.type != "cpu":
        return like.new_empty(size, dtype=dtype)
    buffers = _kept.__dict__.setdefault("buffers", {})
    kept = buffers.get(dtype)
    if kept is None or kept.numel() < size:
        grown = size if kept is None else max(size, min(2 * kept.numel(), most or size))
        buffers[dtype] = kept = like.new_empty(grown, dtype=dtype)
    return kept[:size]


def _logits_t(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor,
              half: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's logits, transposed ([vocabulary, rows]) and in fp32, in `buffer` (flat, reused), and, in half
    precision, the same logits in the model's dtype in `half` (flat, reused too; the logits are rounded to the model's
    dtype as the plain path does); (fp32 logits, their half-precision copy or None).

    Why transposed: MKL computes weight @ hidden^T at ~110 GFLOP/s in fp32 on an AVX2 EPYC and hidden @ weight^T at
    ~75 (a [256, 576] x [576, 49152] product; docs/performance.md, "Fused LM head + cross-entropy"). Why a row stride
    rounded up to ALIGN: with 343 rows the same product runs at ~73 GFLOP/s, with a stride of 344 at ~95, and the
    backward's product from it at 115 against 125. Why reused buffers (`_scratch`): a fresh 50-75 MB tensor per chunk
    costs page faults on every first touch, as much as the softmax's arithmetic (in bf16, a [49152, 344] product into
    a fresh tensor took 67 ms against 51 into a reused one, a conversion to fp32 25 ms against 4 ms)."""
    rows = hidden.shape[0]
    stride = _stride(rows)
    fp32 = buffer[:weight.shape[0] * stride].view(weight.shape[0], stride)[:, :rows]
    logits = fp32 if half is None else half[:weight.shape[0] * stride].view(weight.shape[0], stride)[:, :rows]
    if bias is None:
        torch.mm(weight, hidden.t(), out=logits)
    else:
        torch.addmm(bias.to(logits.dtype)[:, None], weight, hidden.t(), out=logits)
    if half is None:
        return fp32, None
    return fp32.copy_(logits), logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        want = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and want[2] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        chunks = _chunks(hidden.shape[0])
        size = weight.shape[0] * _stride(chunks[0].stop - chunks[0].start)
        most = weight.shape[0] * _stride(CHUNK_ROWS)
        buffer = _scratch(hidden, size, torch.float32, most)
        half = _scratch(hidden, size, hidden.dtype, most) if hidden.dtype != torch.float32 else None  # logits, gradient
        for rows in chunks:
            t = targets[rows]
            logits_t, half_t = _logits_t(hidden[rows], weight, bias, buffer, half)  # [vocabulary, rows]
            counted = t != ignore_index
            safe = torch.where(counted, t, 0)
            columns = torch.arange(len(t), device=t.device)
            picked = logits_t[safe, columns]
            # log-sum-exp and softmax in place: the shifted logits become exp(.), then the softmax itself
            reduced = exp_columns(logits_t)  # two passes over the logits where the kernels apply
            if reduced is None:
                peak = logits_t.amax(0)
                reduced = peak, logits_t.sub_(peak).exp_().sum(0)
            peak, sums = reduced
            total += ((peak + sums.log() - picked) * counted).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            scale = counted / sums  # each row's softmax normaliser; rows without a target zeroed
            if half_t is None and grad_weight is None and grad_bias is None:
                # fp32, the hidden states' gradient alone: (softmax - one-hot) W = scale * (exp W) - W[target], the
                # scale and the target applied to the [rows, hidden] product, not to the [vocabulary, rows] logits
                out = grad_hidden[rows]
                torch.mm(logits_t.t(), weight, out=out)
                out.mul_(scale[:, None]).sub_(weight[safe] * counted[:, None])
                continue
            logits_t.mul_(scale)  # softmax, rows without a target zeroed
            logits_t[safe, columns] -= counted.float()  # minus the one-hot target: d loss / d logits, transposed
            # in the hidden states' dtype, as autograd would hand it back through `.float()`
            grad_t = logits_t if half_t is None else half_t.copy_(logits_t)
            if grad_hidden is not None:
                torch.mm(grad_t.t(), weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_t.float(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias += grad_t.float().sum(1)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight,
                                                                                   grad_bias)))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.has
        return (grad_hidden * grad_out if has_hidden else None,
                (grad_weight * grad_out).to(ctx.dtypes[0]) if has_weight else None,
                (grad_bias * grad_out).to(ctx.dtypes[1]) if has_bias else None, None, None)


class _LinearLogProbs(torch.autograd.Function):
    """Each row's log-probability of its target, chunk by chunk. A sequence-level loss (DPO, KTO) weighs each row's
    gradient by its own factor, known only after forward; so forward keeps d logp / d logits = onehot - softmax per
    row, in the hidden states' dtype (what the plain path hands back through `.float()`), instead of the logits, their
    fp32 copy and the log-softmax output, and backward scales it by each row's incoming gradient.

    Its logits keep the untransposed product (not `_logits_t`): the RL stages compare log-probs of the same rows
    computed in batches of different sizes (rollout, update). A row of hidden @ weight^T does not depend on the rows
    beside it; a column of weight @ hidden^T does (by ~1e-5 through MKL's blocking), which moved PPO's learning curve
    in `tests/test_ppo.py`."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, entropy_out: torch.Tensor | None) -> torch.Tensor:
        keep = any(ctx.needs_input_grad[:3])
        out = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        direction = hidden.new_empty(hidden.shape[0], weight.shape[0]) if keep else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            t = targets[start:start + CHUNK_ROWS]
            logits = nn.functional.linear(hidden[start:start + CHUNK_ROWS], weight, bias).float()
            counted = t != ignore_index
            safe = torch.where(counted, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + CHUNK_ROWS] = (logits.gather(1, safe[:, None]).squeeze(1) - lse) * counted
            if entropy_out is not None:  # -sum p log p, from the logits already made
                logp = logits - lse[:, None]
                entropy_out[start:start + CHUNK_ROWS] = -(logp.exp() * logp).sum(-1)
            if direction is not None:
                grad = torch.exp(logits.sub_(lse[:, None])).neg_()  # -softmax, in place of the logits
                grad[torch.arange(len(t)), safe] += 1.0
                grad *= counted[:, None]
                direction[start:start + CHUNK_ROWS] = grad
        ctx.save_for_backward(hidden, weight, direction if direction is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, direction = ctx.saved_tensors
        want = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (
            ctx.has_bias and want[2]) else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            g = (direction[rows].float() * grad_out[rows, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = g @ weight
            if grad_weight is not None:
                grad_weight += g.t().float() @ hidden[rows].float()
            if grad_bias is not None:
                grad_bias += g.float().sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(weight.dtype) if grad_bias is not None else None, None, None, None)


def linear_log_probs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, ignore_index: int,
                     entropy_out: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(head(hidden))[target] of each row [rows], float32; 0 where the target is `ignore_index`.
    `entropy_out` [rows], when given, receives each row's entropy (no graph): the RL stages log it for free."""
    return _LinearLogProbs.apply(hidden, head.weight, head.bias, targets, ignore_index, entropy_out)


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                             ignore_index: int) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden), targets), rows whose target is `ignore_index` left out.
    `hidden` is [rows, hidden size]."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, ignore_index)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model that owns the output layer, through DDP's wrapper and peftkit's TunedModel."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "get_output_embeddings") else getattr(inner, "model", inner)


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the fused loss can stand in for it: a plain linear layer with float weights
    (not an adapter's, not quantized, not partitioned by ZeRO-3) and no soft-capping of the logits after it; None
    otherwise."""
    inner = _causal_lm(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(inner, "config", None)
    # FSDP holds the weight sharded (a DTensor) here, and whole, as a plain parameter, after the model's forward, when
    # the fused loss reads it; its gradient is then reduce-scattered with the rest of the root's
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return None
    if type(head.weight) is not nn.Parameter and not isinstance(head.weight, DTensor):
        return None
    if hasattr(head.weight, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: whole only while the layer itself runs
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


@contextmanager
def hidden_instead_of_logits(model: nn.Module, head: nn.Linear) -> Iterator[None]:
    """While inside, the model's forward returns the output layer's input (the final hidden states at the positions
    `logits_to_keep` selects) as its `logits`."""
    inner = _causal_lm(model)
    inner.set_output_embeddings(nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)
