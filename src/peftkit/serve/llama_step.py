"""A decode step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3: `ARCHITECTURES`) without transformers' per-call
plumbing, and, for plain fp32 or bf16 models, its decoder layers in one call of peftkit's decode kernel.

`LlamaStep` runs LlamaModel's, LlamaDecoderLayer's and LlamaAttention's forward, statement by statement, calling the
same functions with the same arguments (the mask builder, the rotary embedding, the attention function from
transformers' registry, `cache.update`), and every submodule as a module, so adapters, hooks and peftkit's decode
products on the linear layers work as before and the logits are the same to the bit (tested). It is used only where
that holds by construction: the classes' forward code is Llama's own (compared as bytecode, names and constants, as
`fused_ops` does), the attention is transformers' "sdpa" or "eager", no layer attends through a sliding window (the
decode cache's layers are then all full ones), and no hook sits on a module whose forward this replaces. Anything
else decodes through the model's own forward. Alone it saves little (~1.5 ms of a ~47 ms step).

`NativeLayers` is where the time goes: at batch 1 on a 2-core EPYC the ~60 small torch operators per layer around
the products (norms, rotary, cache writes, attention, SiLU, residual adds) and their Python took as long as the
products themselves (24 of 47 ms a token on smollm2-135m). The kernel (`gemv.c`, `peftkit_decode_layers`) does a
step's decoder layers in one call and one OpenMP region, with the same products as peftkit's small-batch kernel; its
norms, rotary and softmax accumulate in fp32 in their own order, so the logits equal torch's to fp32 rounding (tested
to 1e-4 relative; greedy tokens equal transformers' `generate` on SmolLM2, tested). In a bf16 model it rounds each
operator's result to bf16 where torch does, so its logits are torch's bf16 ones but for a rounding that its summation
order flips now and then (greedy tokens leave `generate`'s only at near-ties, tested). See docs/performance.md,
"Decode: the decoder layers in one kernel call" and "Decode: a bf16 model in the kernel".
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..methods.lora import LoraLinear
from . import gemv


def _code(fn: Any) -> tuple:
    """A function's bytecode, names and constants, less its docstring (the first constant), which differs between
    architectures whose code is the same."""
    code = inspect.unwrap(fn).__code__
    return code.co_code, code.co_consts[1:], code.co_names


# The architectures whose decode step this runs: module name -> class-name prefix. Their decoder layer, RMSNorm and
# MLP are Llama's code; their attention passes a sliding window (None here: see `_full_attention`), and Qwen3's
# normalises each head of q and k first.
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


@functools.lru_cache(maxsize=None)
def _references() -> dict[str, dict[str, tuple]]:
    """Per architecture, the code of each forward the step stands in for (or calls through, for the norm and MLP)."""
    out = {}
    for name, prefix in ARCHITECTURES.items():
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        classes = {"causal_lm": "ForCausalLM", "model": "Model", "layer": "DecoderLayer", "attention": "Attention",
                   "norm": "RMSNorm", "mlp": "MLP"}
        out[name] = {key: _code(getattr(module, prefix + suffix).forward) for key, suffix in classes.items()}
    return out


def _architecture(model: nn.Module, base: nn.Module, layers: list[nn.Module]) -> str | None:
    """Which of ARCHITECTURES `model` runs the code of (its causal LM's, base model's, layers' and attentions'
    forwards; Qwen3's model is Qwen2's code, its attention not), or None."""
    if not all(isinstance(getattr(layer, "self_attn", None), nn.Module) for layer in layers):
        return None
    codes = {"causal_lm": {_code(type(model).forward)}, "model": {_code(type(base).forward)},
             "layer": {_code(type(layer).forward) for layer in layers},
             "attention": {_code(type(layer.self_attn).forward) for layer in layers}}
    for name, ref in _references().items():
        if all(found == {ref[key]} for key, found in codes.items()):
            return name
    return None


def _full_attention(architecture: str, base: nn.Module, layers: list[nn.Module]) -> bool:
    """Whether every layer attends to the whole cache (no sliding window), as Llama's do: the step builds the one
    causal mask, and the decode cache's layers are all full ones."""
    config = base.config
    if architecture == "mistral":
        return getattr(config, "sliding_window", None) is None
    if architecture in ("qwen2", "qwen3"):
        return (not getattr(base, "has_sliding_layers", True)
                and all(getattr(layer.self_attn, "sliding_window", 0) is None for layer in layers))
    return True


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
                or "forward" in module.__dict__)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class LlamaStep:
    """The direct forward of one Llama-family causal LM (ARCHITECTURES); `build(model)` says whether it applies."""

    def __init__(self, causal_lm: nn.Module, architecture: str) -> None:
        self.causal_lm, self.base, self.architecture = causal_lm, causal_lm.model, architecture
        self.layers = list(self.base.layers[: self.base.config.num_hidden_layers])
        self.qk_norm = architecture == "qwen3"  # an RMSNorm on each head of q and k, before the rotary embedding
        # the sliding window these attentions pass (None: see `_full_attention`); Llama's pass none
        self.window: dict[str, Any] = {} if architecture == "llama" else {"sliding_window": None}
        model_globals = inspect.unwrap(type(self.base).forward).__globals__
        attention_globals = inspect.unwrap(type(self.layers[0].self_attn).forward).__globals__
        self.create_causal_mask: Callable = model_globals["create_causal_mask"]
        self.rotary: Callable = attention_globals["apply_rotary_pos_emb"]
        self.attention_functions = attention_globals["ALL_ATTENTION_FUNCTIONS"]
        self.eager: Callable = attention_globals["eager_attention_forward"]

    @classmethod
    def build(cls, model: nn.Module) -> LlamaStep | None:
        """The step for `model` (a transformers causal LM), or None where the direct forward would not be the
        model's own: another architecture or attention, a sliding window, a hook on a replaced module, or an
        instance forward."""
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if not isinstance(base, nn.Module) or not isinstance(layers, nn.ModuleList) or not len(layers):
            return None
        if getattr(base.config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return None
        architecture = _architecture(model, base, list(layers))
        if architecture is None:
            return None
        if not _full_attention(architecture, base, list(layers[: base.config.num_hidden_layers])):
            return None
        replaced = [model, base, *layers, *(layer.self_attn for layer in layers)]
        if _global_hooks() or any(_hooked(m) for m in replaced):
            return None
        return cls(model, architecture)

    def still_valid(self) -> bool:
        """Whether nothing since `build` put a hook or an instance forward on a module this step replaces."""
        replaced = [self.causal_lm, self.base, *self.layers, *(layer.self_attn for layer in self.layers)]
        return not (_global_hooks() or any(_hooked(m) for m in replaced)
                    or self.base.config._attn_implementation not in ("sdpa", "eager"))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """The logits of each row's last position, [rows, 1, vocabulary]: the causal LM's forward with
        `logits_to_keep=1` and `use_cache=True`."""
        base = self.base
        hidden = base.embed_tokens(input_ids)
        mask = self.create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                       cache=cache, position_ids=position_ids)
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        attend = self.attention_functions.get_interface(base.config._attn_implementation, self.eager)
        kwargs = {"position_ids": position_ids, "use_cache": True}
        for layer in self.layers:
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = self._attention(layer.self_attn, hidden, cos, sin, mask, cache, attend, kwargs)
            hidden = residual + hidden
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            hidden = layer.mlp(hidden)
            hidden = residual + hidden
        hidden = base.norm(hidden)
        return self.causal_lm.lm_head(hidden[:, -1:, :])

    def _attention(self, attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: Any, cache: Any, attend: Callable, kwargs: dict[str, Any]) -> torch.Tensor:
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(hidden_shape)
        if self.qk_norm:
            query = attention.q_norm(query)
        key = attention.k_proj(hidden).view(hidden_shape)
        if self.qk_norm:
            key = attention.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = attention.v_proj(hidden).view(hidden_shape).transpose(1, 2)
        query, key = self.rotary(query, key, cos, sin)
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
        dropout = attention.attention_dropout if attention.training else 0.0
        out, _ = attend(attention, query, key, value, mask, dropout=dropout, scaling=attention.scaling,
                        **self.window, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return attention.o_proj(out)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plain(module: Any, code: tuple | None = None) -> bool:
    """A module the kernel may stand in for: no hooks, no instance forward, and (given `code`) the class's forward
    being Llama's own."""
    return (isinstance(module, nn.Module) and not _hooked(module)
            and (code is None or _code(type(module).forward) == code))


_DTYPES = (torch.float32, torch.bfloat16)  # the model dtypes the kernel computes


def _plain_linear(module: Any) -> bool:
    """A plain nn.Linear with a contiguous 2-D fp32 or bf16 weight on the CPU (its bias, if any, of the same dtype)."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module) is nn.Linear and _plain(module) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.device.type == "cpu" and w.dtype in _DTYPES and w.is_contiguous()
            and (b is None or (b.dtype == w.dtype and b.is_contiguous())))


def _kernel_projection(module: Any) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor, float] | None] | None:
    """(the plain linear layer, its unmerged LoRA (A, B, scaling) or None) that the kernel computes for `module`; None
    where it cannot: another module, a hook, DoRA, LoRA dropout while training, adapter tensors off fp32 or the CPU. A
    LoRA layer with no active adapter (disabled, merged) is its base layer, as its forward is."""
    if _plain_linear(module):
        return module, None
    if type(module) is not LoraLinear or not _plain(module) or not _plain_linear(module.base_layer):
        return None
    if not module.use_adapter:
        return module.base_layer, None
    name = module.active_adapter
    A, B = module.lora_A[name], module.lora_B[name]
    if (name in module.lora_magnitude or (module.training and not isinstance(module.lora_dropout[name], nn.Identity))
            or any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 for t in (A, B))):
        return None
    return module.base_layer, (A, B, float(module.scaling[name]))


def _parts(layer: nn.Module, qk_norm: bool) -> list[tuple[nn.Module, str, Any]]:
    """(parent, name, module) for each module of `layer` that the kernel stands in for."""
    parts = [(layer, name, layer._modules.get(name))
             for name in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")]
    if qk_norm:
        parts += [(layer.self_attn, name, layer.self_attn._modules.get(name)) for name in ("q_norm", "k_norm")]
    parts.append((layer.mlp, "act_fn", layer.mlp._modules.get("act_fn")))
    for parent, name, module in _projection_slots(layer):
        parts.append((parent, name, module))
        if type(module) is LoraLinear:
            parts.append((module, "base_layer", module.base_layer))
    return parts


def _state(module: nn.Module) -> tuple:
    """What, beyond its tensors, decides what the kernel computes for `module`: the training flag (dropout) and, for a
    LoRA layer, its active adapter, whether it applies (not disabled or merged) and its scaling."""
    if type(module) is LoraLinear:
        return module.training, module.active_adapter, module.use_adapter, module.scaling.get(module.active_adapter)
    return (module.training,)


def _projection_slots(layer: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(parent, name, module) of a decoder layer's seven projections, in the kernel's order (None where one is
    missing)."""
    parents = [layer.self_attn] * 4 + [layer.mlp] * 3
    return [(parent, name, parent._modules.get(name)) for parent, name in zip(parents, _PROJECTIONS)]


def _projections(layer: nn.Module) -> list[Any]:
    """A decoder layer's seven projections, in the kernel's order (None where one is missing)."""
    return [module for _, _, module in _projection_slots(layer)]


def _norms(layer: nn.Module, qk_norm: bool) -> list[Any]:
    """The RMSNorms of `layer` that the kernel computes: its two, and Qwen3's on each head of q and k."""
    attention = layer.self_attn
    return [layer.input_layernorm, layer.post_attention_layernorm,
            *((attention._modules.get("q_norm"), attention._modules.get("k_norm")) if qk_norm else ())]


def _plain_layer(layer: nn.Module, dtype: torch.dtype, ref: dict[str, tuple], qk_norm: bool) -> bool:
    """Whether the kernel may stand in for every module of `layer`: Llama's RMSNorms and SiLU MLP (the code of `ref`,
    the architecture's references), and seven plain linear layers (with or without an unmerged LoRA adapter), none
    hooked, their weights all of the model's `dtype`."""
    projections = [_kernel_projection(m) for m in _projections(layer)]
    return (all(_plain(n, ref["norm"]) and isinstance(getattr(n, "weight", None), torch.Tensor)
                and n.weight.dtype == dtype and n.weight.is_contiguous() for n in _norms(layer, qk_norm))
            and _plain(layer.mlp, ref["mlp"]) and type(layer.mlp.act_fn).__name__ in ("SiLUActivation", "SiLU")
            and all(p is not None and p[0].weight.dtype == dtype for p in projections))


class NativeLayers:
    """The decoder layers of an fp32 or bf16 Llama model as one kernel call per decode step (gemv.c's
    peftkit_decode_layers), for up to 16 rows of one token each. The embedding, the rotary table, the final norm and
    the LM head stay in torch and peftkit's product; the cache is transformers' own, its new slot reserved by
    `cache.update` and filled by the kernel. Used where every module it stands in for is the plain one (nn.Linear
    without an adapter or a hook, Llama's RMSNorm and SiLU MLP), the weights all of the model's dtype, and the kernel
    faster than torch here (`gemv.faster`). An unmerged LoRA adapter on a projection is computed in the kernel too
    (A x, then scaling * B times it, in fp32), so `peftkit chat --adapter` and a server of several adapters decode at
    the base model's speed; a weight changed in place (an adapter merged) or another adapter made active is picked up
    at the next step.

    A bf16 model (what a CPU with native bf16 generates in): the kernel reads its bf16 weights and bf16 cache, computes
    in fp32, and rounds each operator's result to bf16 where torch's bf16 forward does, so it decodes at the speed of
    half the bytes on any AVX2 CPU and gives torch's bf16 numbers up to the summation order inside a product."""

    def __init__(self, step: LlamaStep, products: Any, kernels: gemv.Kernels) -> None:
        self.step, self.products, self.kernels = step, products, kernels
        first = step.layers[0]
        attention = first.self_attn
        self.dtype = step.base.embed_tokens.weight.dtype
        self.head_dim = attention.head_dim
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.intermediate = first.mlp.gate_proj.out_features
        self.hidden = attention.q_proj.in_features
        self.eps = float(first.input_layernorm.variance_epsilon)
        self.scaling = float(attention.scaling)
        # every tensor the kernel reads, with its version and address (an in-place change, or new data put in)
        self.tensors: list[tuple[torch.Tensor, int, int]] = []
        self.keep: list[torch.Tensor] = []  # the bf16 copies, fp32 copies, biases and LoRA tensors it reads
        self.parts = [part for layer in step.layers for part in _parts(layer, step.qk_norm)]
        self.states = [_state(module) for _, _, module in self.parts]
        self.max_rank = 0
        self.table = (gemv.Layer * len(step.layers))()
        for entry, layer in zip(self.table, step.layers):
            for i, module in enumerate(_projections(layer)):
                linear, lora = _kernel_projection(module)
                if linear.weight.dtype == torch.bfloat16:  # a bf16 model: its own weights
                    copy, read = None, linear.weight
                else:
                    copy = products.bf16_copy(linear.weight) if products is not None else None
                    read = linear.weight if copy is None else copy
                bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
                self.keep += [t for t in (read, bias) if t is not None]
                entry.w[i], entry.bf16[i] = read.data_ptr(), int(read.dtype == torch.bfloat16)
                entry.bias[i] = None if bias is None else bias.data_ptr()
                self.tensors += [(t, t._version, t.data_ptr()) for t in (linear.weight, linear.bias) if t is not None]
                if lora is not None:
                    A, B, scaling = lora
                    down, up = A.detach().contiguous(), (B.detach() * scaling).contiguous()
                    self.keep += [down, up]
                    entry.lora_a[i], entry.lora_b[i], entry.rank[i] = down.data_ptr(), up.data_ptr(), A.shape[0]
                    self.max_rank = max(self.max_rank, A.shape[0])
                    self.tensors += [(t, t._version, t.data_ptr()) for t in (A, B)]
            for name, norm in zip(("norm1", "norm2", "qnorm", "knorm"), _norms(layer, step.qk_norm)):
                weight = norm.weight.detach().float().contiguous()
                self.keep.append(weight)
                setattr(entry, name, weight.data_ptr())
                self.tensors.append((norm.weight, norm.weight._version, norm.weight.data_ptr()))

    @classmethod
    def build(cls, step: LlamaStep, products: Any) -> NativeLayers | None:
        """The kernel's plan for `step`'s model, or None where it would not stand in for the model's own modules."""
        kernels = gemv.kernel()
        if kernels is None or not gemv.faster():
            return None
        dtype = step.base.embed_tokens.weight.dtype
        if dtype not in _DTYPES:
            return None
        eps: set[float] = set()
        ref, head_dim = _references()[step.architecture], step.layers[0].self_attn.head_dim
        for layer in step.layers:
            if (not _plain_layer(layer, dtype, ref, step.qk_norm)
                    or (layer.self_attn.training and layer.self_attn.attention_dropout)):
                return None
            norms = _norms(layer, step.qk_norm)
            if any(n.weight.shape != (head_dim,) for n in norms[2:]):
                return None
            eps.update(float(n.variance_epsilon) for n in norms)
        if len(eps) != 1 or head_dim % 2 or head_dim > 512:
            return None
        return cls(step, products, kernels)

    def current(self) -> bool:
        """Whether the plan still stands: the same tensors, unchanged; the same modules, none hooked since; the same
        adapter state. It runs before every decode step, so it reads module dicts directly (re-running `build`'s
        checks through nn.Module's attribute lookup took 6 ms a token on smollm2-135m, 18 with an adapter)."""
        return (all(t._version == version and t.data_ptr() == address for t, version, address in self.tensors)
                and not _global_hooks()
                and all(parent._modules.get(name) is module and not _hooked(module) and _state(module) == state
                        for (parent, name, module), state in zip(self.parts, self.states)))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """LlamaStep's result ([rows, 1, vocabulary] logits) for one token per row."""
        base, rows = self.step.base, input_ids.shape[0]
        embedded = base.embed_tokens(input_ids)
        hidden = embedded.float().contiguous()  # a new tensor either way (the lookup's), updated in place by the kernel
        cos, sin = base.rotary_emb(embedded, position_ids=position_ids)  # in the model's dtype, as its forward's
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        blank = embedded.new_zeros(rows, self.kv_heads, 1, self.head_dim)
        length = 0
        for index, entry in enumerate(self.table):
            keys, values = cache.update(blank, blank, index)  # reserves the new position's slot (the kernel fills it)
            if keys.stride() != values.stride() or keys.stride(-1) != 1 or keys.dtype != self.dtype:
                raise RuntimeError("the decode cache's keys and values are not laid out alike")
            entry.keys, entry.values = keys.data_ptr(), values.data_ptr()
            entry.stride_b, entry.stride_h, entry.stride_t = keys.stride(0), keys.stride(1), keys.stride(2)
            length = keys.shape[2]
        if attention_mask is None:
            mask = torch.ones(rows, length, dtype=torch.long)
        else:
            mask = attention_mask.to(torch.long).contiguous()
            if mask.shape != (rows, length):
                raise RuntimeError(f"attention mask {tuple(mask.shape)} does not match the cache ({rows}, {length})")
        threads = torch.get_num_threads()
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        width = max(self.hidden, self.intermediate, q_width)
        scratch = torch.empty(rows * (2 * width + q_width + 2 * kv_width + q_width + self.intermediate
                                      + 3 * self.max_rank) + threads * length)
        status = self.kernels.layers(self.table, len(self.table), hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                     mask.data_ptr(), rows, length, self.hidden, self.heads, self.kv_heads,
                                     self.head_dim, self.intermediate, ctypes.c_float(self.eps),
                                     ctypes.c_float(self.scaling), self.max_rank, int(self.dtype == torch.bfloat16),
                                     scratch.data_ptr(), threads)
        if status != 0:
            raise RuntimeError(f"peftkit's decode kernel refused the step (status {status})")
        hidden = base.norm(hidden.to(self.dtype))[:, -1:, :]  # bf16 values already, in a bf16 model: exact
        head = self.step.causal_lm.lm_head
        return self._head(head, hidden) if _plain_linear(head) and head.weight.dtype == self.dtype else head(hidden)

    def _head(self, head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head through peftkit's product: fp32 weights (or their bf16 copies), or a bf16 model's own, whose
        logits are rounded to bf16 as torch's bf16 product rounds them."""
        weight = head.weight
        if weight.dtype == torch.float32 and self.products is not None:
            copy = self.products.bf16_copy(weight)
            weight = weight if copy is None else copy
        bias = None if head.bias is None else head.bias.detach().float()
        return gemv.linear(hidden.float(), weight, bias).to(self.dtype)
