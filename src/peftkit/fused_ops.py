"""A decoder layer's RMSNorms and SwiGLU as one pass each (fused_ops.c), for fp32 and bf16 training on CPU.

Why: in fp32 on a CPU without native bf16, a LoRA step of SmolLM2-135M spent ~11% of its time in elementwise
operators, most of them the pieces of transformers' RMSNorm (to, pow, mean, add, rsqrt, mul, mul) and of
silu(gate) * up, each a pass over memory with its own output. One pass each for forward and backward is 4-9x faster
on those operators and keeps fewer tensors for backward (docs/performance.md, "Fused RMSNorm and SwiGLU").

`fused_layers(model)` swaps them in for the modules that compute exactly Llama's RMSNorm and SwiGLU MLP (Llama, Qwen2,
Qwen3, Mistral, ...: their forward is the same code), for fp32 tensors on the CPU and, on a bf16 base, for bf16 ones
(rounded as torch's bf16 operators round); anything else, and everything when the kernels cannot be built or
PEFTKIT_FUSED_OPS=0, runs torch's operators as before. The attention kernel takes bf16 q, k and v on AVX512_BF16's dot
products where the CPU has them, else widened to fp32 for the fp32 kernel, its results rounded back.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import types
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

from . import native

FUSED_ENV = "PEFTKIT_FUSED_OPS"  # "0": torch's operators (to compare)
# Longer examples take SDPA's flash kernel: the attention kernel holds a whole score matrix per thread, and at 1,000
# tokens (4 MB) its backward falls out of the core's cache and behind flash's.
ATTENTION_MAX_LEN = 512
_SOURCE = Path(__file__).with_name("fused_ops.c")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    p, n, t = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.peftkit_swiglu_forward.argtypes = [p, p, p, n, t]
    library.peftkit_swiglu_backward.argtypes = [p, p, p, p, p, n, t]
    library.peftkit_rms_norm_forward.argtypes = [p, p, p, p, n, n, ctypes.c_float, t]
    library.peftkit_rms_norm_backward.argtypes = [p, p, p, p, p, n, n, t]
    library.peftkit_swiglu_forward_bf16.argtypes = [p, p, p, n, t]
    library.peftkit_swiglu_backward_bf16.argtypes = [p, p, p, p, p, n, t]
    library.peftkit_rms_norm_forward_bf16.argtypes = [p, p, p, p, n, n, ctypes.c_float, t]
    library.peftkit_rms_norm_backward_bf16.argtypes = [p, p, p, p, p, n, n, t]
    library.peftkit_rope.argtypes = library.peftkit_rope_bf16.argtypes = [p, p, p, p, n, n, n, n, t, t]
    sizes = [n] * 12  # examples, tokens, heads, kv_heads, dim, the six strides, max_len (see fused_ops.c)
    library.peftkit_attention_forward.argtypes = [p] * 6 + sizes + [ctypes.c_float, t]
    library.peftkit_attention_backward.argtypes = [p] * 10 + sizes + [ctypes.c_float, t]
    library.peftkit_attention_forward.restype = library.peftkit_attention_backward.restype = t  # 0, or -1: no memory
    library.peftkit_has_bf16_dot.argtypes, library.peftkit_has_bf16_dot.restype = [], t
    if library.peftkit_has_bf16_dot():  # else not built (an older compiler) or not for this CPU
        library.peftkit_attention_forward_bf16.argtypes = [p] * 6 + sizes + [ctypes.c_float, t]
        library.peftkit_attention_backward_bf16.argtypes = [p] * 10 + sizes + [ctypes.c_float, t]
        library.peftkit_attention_forward_bf16.restype = library.peftkit_attention_backward_bf16.restype = t
    library.peftkit_exp_columns.argtypes = [p, n, n, n, p, p, t]
    library.peftkit_exp_columns.restype = t
    return library


LIBRARY = native.Library(_SOURCE, FUSED_ENV, _declare)


def kernels() -> Any:
    """The loaded library, or None (see `LIBRARY.why_not`)."""
    return LIBRARY.load()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the attention kernel could not allocate its scratch memory: free memory, lower the batch "
                          f"size or cutoff_len, or set {FUSED_ENV}=0 (torch's SDPA)")


def _fits(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Plain CPU tensors (not a DTensor's shard, not a subclass) of one of `dtypes`, all of the same, the kind the
    kernels read by pointer."""
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.dtype == tensors[0].dtype and t.device.type == "cpu"
               for t in tensors) and tensors[0].dtype in dtypes


_ELEMENTWISE = (torch.float32, torch.bfloat16)  # the norm and SwiGLU kernels' dtypes


def _suffix(t: torch.Tensor) -> str:
    """The C functions' name ending for `t`'s dtype"""
    return "_bf16" if t.dtype == torch.bfloat16 else ""


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        forward = getattr(LIBRARY.loaded, "peftkit_swiglu_forward" + _suffix(gate))
        forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        backward = getattr(LIBRARY.loaded, "peftkit_swiglu_backward" + _suffix(gate))
        backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), d_gate.data_ptr(), d_up.data_ptr(), gate.numel(),
                 torch.get_num_threads())
        return d_gate, d_up


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        width = x.shape[-1]
        rows = x.numel() // width
        y = torch.empty_like(x)
        rstd = x.new_empty(rows, dtype=torch.float32)
        forward = getattr(LIBRARY.loaded, "peftkit_rms_norm_forward" + _suffix(x))
        forward(x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, width, eps,
                torch.get_num_threads())
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        width = x.shape[-1]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            backward = getattr(LIBRARY.loaded, "peftkit_rms_norm_backward" + _suffix(x))
            backward(grad.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                     rstd.numel(), width, torch.get_num_threads())
        d_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm (full fine-tuning): sum over rows of grad * xhat, in fp32
            xhat = (x.reshape(-1, width).float() * rstd[:, None]).to(x.dtype)
            d_weight = (grad.reshape(-1, width).float() * xhat.float()).sum(0).to(weight.dtype)
        return dx, d_weight, None


def _fp32_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as the attention kernel reads it: fp32 (a bf16 tensor widened, its strides kept), head dim contiguous."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def has_bf16_dot() -> bool:
    """Whether this CPU has AVX512_BF16's dot products (`vdpbf16ps`), for the bf16 attention kernel; asked once."""
    return kernels() is not None and bool(LIBRARY.loaded.peftkit_has_bf16_dot())


def _dot_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """bf16 q, k and v as the bf16 kernel reads them (head dim contiguous, a multiple of 16, even token and head
    strides: two dims are one 32-bit word), or None where it does not apply: the fp32 kernel on widened copies."""
    if q.dtype != torch.bfloat16 or q.shape[-1] % 16 or not has_bf16_dot():
        return None
    views = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return views if all(t.stride(1) % 2 == 0 and t.stride(2) % 2 == 0 for t in views) else None


def _attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, direction: str
                      ) -> tuple[tuple[torch.Tensor, ...], Callable[..., int]]:
    """q, k and v as the attention kernel reads them, and its `direction` ("forward" or "backward") function: the bf16
    one on bf16 dot products where it applies, else the fp32 one on fp32 (for bf16, widened) copies."""
    views = _dot_views(q, k, v)
    inputs = views or tuple(_fp32_view(t) for t in (q, k, v))
    return inputs, getattr(LIBRARY.loaded, f"peftkit_attention_{direction}" + ("_bf16" if views else ""))


class _Attention(torch.autograd.Function):
    """Causal attention of every example of a padding-free row, in one kernel call each way (fused_ops.c).

    fp32 q, k and v take the fp32 kernel. bf16 ones take the bf16 kernel where the CPU has AVX512_BF16 (products of
    bf16 pairs into fp32 sums; P and dS rounded to bf16 for the products that read them, as in torch's bf16 flash
    attention), else the fp32 kernel on widened copies (again in the backward, rather than kept: half the saved
    memory). Either way the output and gradients are rounded to bf16 once, and the fp32 output is kept for the
    backward's rowsum(dO * O) (docs/performance.md, "The attention kernel in bf16 steps" and "The attention kernel
    on bf16 dot products").
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, max_len: int,
                scale: float) -> torch.Tensor:
        qk_v, run = _attention_kernel(q, k, v, "forward")
        _, heads, tokens, dim = q.shape
        out = q.new_empty(1, tokens, heads, dim, dtype=torch.float32)
        lse = q.new_empty(heads, tokens, dtype=torch.float32)
        _check(run(*(t.data_ptr() for t in qk_v), out.data_ptr(), lse.data_ptr(), bounds.data_ptr(),
                   bounds.numel() - 1, tokens, heads, k.shape[1], dim, *_strides(*qk_v), max_len, scale,
                   torch.get_num_threads()))
        ctx.save_for_backward(q, k, v, out, lse, bounds)
        ctx.settings = (max_len, scale)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, bounds = ctx.saved_tensors
        max_len, scale = ctx.settings
        qk_v, run = _attention_kernel(q, k, v, "backward")
        grad = grad.to(qk_v[0].dtype).contiguous()
        _, heads, tokens, dim = q.shape
        kv_heads = k.shape[1]
        dq = out.new_empty(1, tokens, heads, dim)
        dk, dv = (out.new_zeros(1, tokens, kv_heads, dim) for _ in range(2))
        _check(run(grad.data_ptr(), *(t.data_ptr() for t in qk_v), out.data_ptr(), lse.data_ptr(),
                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), bounds.data_ptr(), bounds.numel() - 1, tokens, heads,
                   kv_heads, dim, *_strides(*qk_v), max_len, scale, torch.get_num_threads()))
        return tuple(d.to(t.dtype).transpose(1, 2) for d, t in zip((dq, dk, dv), (q, k, v))) + (None, None, None)


class _Rope(torch.autograd.Function):
    """transformers' `apply_rotary_pos_emb` on a layer's q and k, one kernel pass each way per tensor (fused_ops.c).
    q and k come as their projections write them, [batch, heads, tokens, dim] views of [batch, tokens, heads, dim]
    memory, and leave in that layout, as torch's elementwise operators leave them."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx: Any, d_q: torch.Tensor, d_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(d_q, cos, sin, True), _rotate(d_k, cos, sin, True), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The rotation (or, `backward`, its gradient) of x [batch, heads, tokens, dim], computed in and returned as a view
    of [batch, tokens, heads, dim] memory."""
    # no copy for the layout `rotary` accepts (and the attention kernel's gradients come in); any other gradient
    # layout is copied once
    rows_first = x.transpose(1, 2).contiguous()
    out = torch.empty_like(rows_first)
    batch, tokens, heads, dim = rows_first.shape
    kernel = getattr(LIBRARY.loaded, "peftkit_rope" + _suffix(x))
    kernel(rows_first.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), batch * tokens,
           cos.shape[0] * tokens, heads, dim, int(backward), torch.get_num_threads())
    return out.transpose(1, 2)


@functools.cache
def rotary(original: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for transformers' `apply_rotary_pos_emb` (the function `original`, Llama's code) that runs the
    kernel where it applies: inside a training step's `fused_layers` block, outside a torch.compile trace, fp32 or
    bf16 q, k, cos and sin on the CPU in the projections' layout (cos and sin per row or one for all rows), the head
    size a multiple of 16, no gradient wanted for cos and sin. Elsewhere it calls `original`. The numbers are the same
    either way. One stand-in per `original`, so that torch.compile's guard on the global sees the same object each
    step."""

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if (not torch.compiler.is_compiling() and _active and unsqueeze_dim == 1 and LIBRARY.loaded is not None
                and _fits(q, k, cos, sin, dtypes=_ELEMENTWISE)
                and q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
                and q.shape[-1] % 16 == 0 and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0])
                and q.shape[2] == k.shape[2] == cos.shape[1] and q.shape[3] == k.shape[3] == cos.shape[2]
                and q.transpose(1, 2).is_contiguous() and k.transpose(1, 2).is_contiguous()
                and cos.is_contiguous() and sin.is_contiguous() and not (cos.requires_grad or sin.requires_grad)):
            return _Rope.apply(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """(token, head) strides of q, k and v, each [1, heads, tokens, dim]"""
    return q.stride(2), q.stride(1), k.stride(2), k.stride(1), v.stride(2), v.stride(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float,
              sliding_window: int | None = None) -> torch.Tensor | None:
    """Causal attention of each example of a padding-free row, [1, tokens, heads, dim]; None where the kernel does
    not apply (among others, an example longer than `sliding_window`), and outside a `fused_layers` block (a training
    step's, or the RL stages' log-probs between steps, which must match it), so evaluation keeps torch's SDPA. `q` is
    [1, heads, tokens, dim], `k` and `v` [1, kv_heads, tokens, dim] (grouped-query heads share theirs), all fp32 or
    all bf16; `bounds` are the examples' cumulative lengths, 0 first, tokens last."""
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    if not (_active and LIBRARY.loaded is not None and _fits(q, k, v, dtypes=_ELEMENTWISE)
            and q.dim() == 4 and q.shape[0] == 1 and q.shape[-1] % 8 == 0 and q.shape[1] % k.shape[1] == 0
            and k.shape == v.shape and k.shape[2] == q.shape[2] and bounds[0] == 0 and bounds[-1] == q.shape[2]
            and longest <= ATTENTION_MAX_LEN and (sliding_window is None or longest <= sliding_window)):
        return None
    return _Attention.apply(q, k, v, torch.tensor(bounds, dtype=torch.int64), longest, scale)


def exp_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a [rows, cols] fp32 CPU tensor with unit column stride (the fused LM head's transposed logits): its column
    maxima `peak`, then x = exp(x - peak) in place; returns (peak, column sums of the new x). Two passes where torch's
    amax, sub_, exp_ and sum take four over a chunk's 50-75 MB (docs/performance.md, "The fused head's softmax in two
    passes"). None where the kernel does not apply: the caller runs torch's operators."""
    if (x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32 or x.stride(1) != 1 or x.numel() == 0
            or kernels() is None):
        return None
    peak, sums = x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
    if LIBRARY.loaded.peftkit_exp_columns(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], peak.data_ptr(),
                                          sums.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("the fused head's softmax kernel could not allocate its partial sums: free memory, or set "
                          f"{FUSED_ENV}=0 (torch's operators)")
    return peak, sums


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; one pass where the kernels apply."""
    if LIBRARY.loaded is not None and _fits(gate, up, dtypes=_ELEMENTWISE) and gate.shape == up.shape:
        return _SwiGLU.apply(gate, up)
    return nn.functional.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama's RMSNorm of `x` (x and weight both fp32 or both bf16); None where the kernels do not apply."""
    if (LIBRARY.loaded is not None and _fits(x, weight, dtypes=_ELEMENTWISE) and weight.dim() == 1
            and x.shape[-1] == weight.shape[0]):
        return _RMSNorm.apply(x, weight, eps)
    return None


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return out if out is not None else type(self).forward(self, hidden_states)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _code(fn: Any) -> tuple:
    code = getattr(fn, "__code__", None)  # None: not a Python function, matches no reference
    return (code.co_code, code.co_consts, code.co_names) if code is not None else ()


def _references() -> tuple[tuple, tuple]:
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    return _code(LlamaRMSNorm.forward), _code(LlamaMLP.forward)


def _plain_function(obj: Any) -> Any:
    """The Python function behind `obj`: past transformers' `functools.wraps` decorators, and past the `nn.Module`
    that `kernels` (a dependency of transformers since 5.25) makes of a function decorated with
    `use_kernel_forward_from_hub`, whose forward calls the function it closes over."""
    if isinstance(obj, nn.Module):
        cells = getattr(type(obj).forward, "__closure__", None) or ()
        inner = [c.cell_contents for c in cells if inspect.isfunction(c.cell_contents)]
        obj = inner[0] if len(inner) == 1 else obj
    return inspect.unwrap(obj) if callable(obj) else obj


def _rotary_namespaces(model: nn.Module) -> list[dict[str, Any]]:
    """The module globals from which `model`'s attention layers call `apply_rotary_pos_emb`, where it and its
    `rotate_half` are Llama's code (Llama, Mistral, Qwen2, Qwen3, ... copy them); swapping the name there for
    `rotary`'s stand-in is the one way into the middle of transformers' attention forward."""
    from transformers.models.llama import modeling_llama as llama

    reference = (_code(_plain_function(llama.apply_rotary_pos_emb)), _code(llama.rotate_half))
    if not all(reference):  # Llama's own function not found (a transformers we cannot read): swap nothing
        return []
    found: dict[int, dict[str, Any]] = {}
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        forward = inspect.unwrap(forward) if forward is not None else None  # past transformers' kwarg decorators
        if not hasattr(forward, "__code__") or "apply_rotary_pos_emb" not in forward.__code__.co_names:
            continue
        names = forward.__globals__
        function = names.get("apply_rotary_pos_emb")
        function = getattr(function, "original", function)  # another model's step may have it swapped now
        if (callable(function) and callable(names.get("rotate_half"))
                and (_code(_plain_function(function)), _code(names["rotate_half"])) == reference):
            found[id(names)] = names
    return list(found.values())


def _swappable(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, fused forward) for each module whose class runs Llama's RMSNorm or SwiGLU MLP code: a model family
    that copies Llama's (transformers' "Copied from") has the same bytecode, names and constants; a variant (Gemma's
    1 + weight, another activation) does not, or fails the activation check."""
    norm_code, mlp_code = _references()
    found = []
    for module in model.modules():
        own = module.__dict__.get("forward")
        if own is not None and getattr(own, "__func__", None) not in (_norm_forward, _mlp_forward):
            continue  # someone else's per-instance forward: leave it alone
        forward = getattr(type(module), "forward", None)
        if not hasattr(forward, "__code__"):
            continue
        code = _code(forward)
        if code == norm_code and isinstance(getattr(module, "weight", None), torch.Tensor):
            found.append((module, _norm_forward))
        elif code == mlp_code and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            found.append((module, _mlp_forward))
    return found


_found: "weakref.WeakKeyDictionary[nn.Module, tuple[list[tuple[nn.Module, Any]], list[dict[str, Any]]]]" = (
    weakref.WeakKeyDictionary())


def _swappable_cached(model: nn.Module) -> tuple[list[tuple[nn.Module, Any]], list[dict[str, Any]]]:
    """(`_swappable(model)`, `_rotary_namespaces(model)`), found once per model"""
    if model not in _found:
        _found[model] = _swappable(model), _rotary_namespaces(model)
    return _found[model]


_active = 0  # fused_layers blocks open now (a training step's forward and backward)
_traced: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # modules torch.compile traces now (train/compile.py)


@contextmanager
def left_to_compiler(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, `fused_layers` leaves these modules on torch's operators: torch.compile traces them and fuses
    them itself, where the kernels' ctypes calls would split its graphs."""
    modules = [m for m in modules if m not in _traced]
    _traced.update(modules)
    try:
        yield
    finally:
        for module in modules:
            _traced.discard(module)


@contextmanager
def fused_layers(model: nn.Module) -> Iterator[None]:
    """Inside the block (a training step's forward and backward), the model's Llama-style RMSNorms, SwiGLU MLPs and
    rotary embeddings run the fused kernels wherever their tensors are fp32 or bf16 on the CPU; torch's operators
    elsewhere. Nested blocks over the same modules leave them to the outer one."""
    global _active
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or kernels() is None:
        yield
        return
    modules, namespaces = _swappable_cached(model)
    swapped = [(module, forward) for module, forward in modules
               if "forward" not in module.__dict__ and module not in _traced]
    for module, forward in swapped:
        module.forward = types.MethodType(forward, module)
    rotated = [names for names in namespaces if not hasattr(names["apply_rotary_pos_emb"], "original")]
    for names in rotated:
        names["apply_rotary_pos_emb"] = rotary(names["apply_rotary_pos_emb"])
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        for module, _ in swapped:
            module.__dict__.pop("forward", None)
        for names in rotated:
            names["apply_rotary_pos_emb"] = names["apply_rotary_pos_emb"].original


def like_the_step(model: nn.Module) -> ContextManager[None]:
    """`fused_layers(model)` while a training step runs fused, nothing otherwise: a separate reference model then
    takes the same kernels as the policy in the same step, so before the first update their log-probabilities agree
    to the last bit (objectives/reference.py)."""
    return fused_layers(model) if _active else nullcontext()
