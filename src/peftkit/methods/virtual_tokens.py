"""Virtual tokens: what prompt tuning, P-tuning, prefix tuning and P-tuning v2 share.

All four put P extra key/value pairs in front of every attention layer, as if P tokens came before the input:
- prefix tuning and P-tuning v2 learn those keys and values directly (Li & Liang 2021; Liu et al. 2022);
- prompt tuning and P-tuning learn P input embeddings (Lester et al. 2021; Liu et al. 2021). Attention is causal, so
  the hidden states of tokens placed first never depend on what follows: their keys and values at every layer are
  those of a forward pass over the P embeddings alone (`record_prefix`). Attending to them gives the logits PEFT gets
  from its longer input, to float rounding, with one P-token pass per batch instead of P more tokens per row.

The input therefore keeps its length, and the KV cache holds only real tokens: masks, labels, left padding and
generation need nothing special, and the prefix can never be counted twice. Three small pieces do the work:
- `VirtualTokenLayer`, on the input embedding: holds each adapter's prefix source, so adapters switch, disable, save
  and load like every other method's;
- `_pre_forward`, a forward pre-hook on the model: hands the active prefix to the attention layers as a forward
  keyword argument (transformers passes those down to the attention function, also when gradient checkpointing
  recomputes a layer) and shifts position ids by P, since real tokens sit after the virtual ones (PEFT's layout);
- `_attention`, registered in transformers' attention registry in front of the model's own "sdpa" or "eager": puts
  the layer's prefix before its keys and values and widens the mask (`with_prefix`).
Nothing here goes through the Cache API but `get_seq_length()` in `_positions`: the next Cache change touches one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..errors import AdapterLoadError, ConfigError
from ..settings import Setting
from .base import AdapterLayer, Method, MethodConfig, reject_adapter_keys

PREFIX_KWARG = "peftkit_prefix"  # forward kwarg: the active prefix, one (keys, values) per attention layer
RECORD_KWARG = "peftkit_record"  # forward kwarg: a dict the attention layers store their keys and values in
ATTN_PREFIX = "peftkit_prefix_"  # + the wrapped implementation, e.g. "peftkit_prefix_sdpa"
_WRAPPABLE = ("sdpa", "eager")

# One (keys, values) pair per attention layer, each [kv_heads, P, head_dim], shared by every row of a batch.
Prefix = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shapes a prefix must have for a model (PEFT's `token_dim`, `num_layers`, `num_attention_heads`)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def geometry(model: nn.Module) -> Geometry:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    hidden = config.hidden_size
    return Geometry(
        num_layers=config.num_hidden_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
    )


NUM_VIRTUAL_TOKENS = Setting("num_virtual_tokens", int, 20, "Virtual tokens put before every input.")
ENCODER_HIDDEN_SIZE = Setting("encoder_hidden_size", int | None, None,
                              "Width of the encoder (P-tuning) or MLP (prefix tuning). Empty: the model's own width.")


_PEFT_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
                "task_type")


@dataclasses.dataclass
class VirtualTokenConfig(MethodConfig):
    """PEFT's prompt-learning fields; the model's shapes are filled in on attach and checked when loading."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1
    # True for a loaded adapter: no reparameterisation and no initialisation, the saved values are the parameters
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")
        if self.num_transformer_submodules != 1:
            raise ConfigError("num_transformer_submodules must be 1: peftkit's virtual tokens are for decoder-only "
                              "models (encoder-decoder prompts have one set per stack).")
        if self.modules_to_save:
            raise ConfigError(f"{self.method} does not support modules_to_save (additional_target) yet.")
        reject_adapter_keys(self, "virtual tokens go before every input, in every attention layer; there is no "
                                  "module to target.", keys=("target_modules", "layers_to_transform", "layers_pattern"))

    def expected_shapes(self, geo: Geometry) -> dict[str, int]:
        """PEFT's record of the model; for input embeddings: the hidden size, layers and attention heads."""
        return {"token_dim": geo.hidden_size, "num_layers": geo.num_layers,
                "num_attention_heads": geo.num_attention_heads}

    def fill(self, geo: Geometry) -> None:
        """Record the model's shapes; a loaded adapter's recorded shapes must be this model's."""
        for key, value in self.expected_shapes(geo).items():
            if getattr(self, key) not in (None, value):
                raise ConfigError(f"This {self.method} adapter was made for a model with {key} {getattr(self, key)}; "
                                  f"this model has {value}. Load it onto the base model it was trained on.")
            setattr(self, key, value)

    # --- PEFT's prompt-learning formats: its PromptLearningConfig fields, plus each type's own ---
    peft_bare_keys = True  # one tensor, saved under the bare key "prompt_embeddings"

    def to_peft(self) -> dict[str, Any]:
        return {"modules_to_save": None, **{k: getattr(self, k) for k in _PEFT_FIELDS}}

    @classmethod
    def peft_fields(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """The PromptLearningConfig fields of a file, which must be for a causal language model."""
        if raw.get("task_type") not in (None, "CAUSAL_LM"):
            raise AdapterLoadError(f"{where} is a {cls.peft_type} adapter for task_type {raw['task_type']!r}; "
                                   "peftkit's virtual tokens are for causal language models (CAUSAL_LM).")
        return {k: raw[k] for k in _PEFT_FIELDS if raw.get(k) is not None}

    @classmethod
    def loaded(cls, where: str, **values: Any) -> VirtualTokenConfig:
        """The config of a loaded adapter: fixed values (PEFT's inference mode), as P-tuning's encoder and prefix
        tuning's MLP are not in the file, only their output."""
        try:
            return cls(**values, inference_mode=True)
        except ConfigError as e:
            raise AdapterLoadError(f"{where} holds a {cls.peft_type} config peftkit cannot use: {e}") from e


def choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    """`value` lower-cased (PEFT writes "MLP", "LSTM"), or a ConfigError naming the options."""
    value = str(value).lower()
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got '{value}'.")
    return value


def vocab_embeddings(model: nn.Module, n: int) -> torch.Tensor:
    """The input embeddings of `n` random vocabulary tokens [n, hidden], float32 on the CPU."""
    table = model.get_input_embeddings().weight.detach()
    ids = torch.randint(0, table.shape[0], (n,))
    return table[ids.to(table.device)].float().cpu()


def split_prefix(values: torch.Tensor, geo: Geometry) -> Prefix:
    """[P, num_layers * 2 * kv_dim] (PEFT's prefix layout: per layer keys then values) -> one pair per layer."""
    p = values.shape[0]
    per_layer = values.view(p, geo.num_layers * 2, geo.num_kv_heads, geo.head_dim).permute(1, 2, 0, 3)
    return [(per_layer[2 * i], per_layer[2 * i + 1]) for i in range(geo.num_layers)]


def record_prefix(model: nn.Module, embeddings: torch.Tensor) -> Prefix:
    """Every layer's keys and values for `embeddings` [P, hidden] placed at positions 0..P-1 with nothing before."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    p = embeddings.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    positions = torch.arange(p, device=embeddings.device)[None]
    model.base_model(inputs_embeds=embeddings[None].to(dtype), position_ids=positions, use_cache=False,
                     **{RECORD_KWARG: store})
    if sorted(store) != list(range(len(store))) or not store:
        raise RuntimeError(f"{type(model).__name__}'s attention layers did not report their keys and values; "
                           "prompt tuning needs a model whose attention goes through transformers' registry.")
    return [(store[i][0][0], store[i][1][0]) for i in range(len(store))]


class PrefixSource(nn.Module):
    """One adapter's parameters and how they become a prefix; each method's file defines its own."""

    num_virtual_tokens: int
    needs_model: bool = False  # whether the prefix also depends on the base model (prompt tuning's recorded pass)

    def prefix(self, model: nn.Module) -> Prefix:
        raise NotImplementedError

    def saved_values(self) -> torch.Tensor:
        """What PEFT saves as `prompt_embeddings`: the values after any reparameterisation."""
        raise NotImplementedError


class VirtualTokenLayer(AdapterLayer):
    """On the input embedding, which it leaves unchanged: holds each adapter's `PrefixSource`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.sources = nn.ModuleDict()
        self._memo: tuple[Any, Prefix] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The embedding matrix, for code that reads `get_input_embeddings().weight` (tying, generation)."""
        return self.base_layer.weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def add(self, name: str, source: PrefixSource) -> None:
        self.sources[name] = source

    def adapter_names(self) -> list[str]:
        return list(self.sources.keys())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.sources[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        del self.sources[name]
        self._memo = None
        if self.active_adapter == name:
            self.active_adapter = None

    def merge(self, name: str) -> None:
        raise NotImplementedError("Virtual tokens add keys and values to attention; no weight change reproduces them.")

    def active_prefix(self, model: nn.Module) -> Prefix:
        """The active adapter's prefix. Without gradients (evaluation, generation) it is computed once and reused
        until a parameter it depends on changes (PyTorch bumps `_version` on every in-place update)."""
        source = self.sources[self.active_adapter]
        params = list(source.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return source.prefix(model)
        watched = list(model.parameters()) if source.needs_model else params
        key = (self.active_adapter, source.training, tuple((p.data_ptr(), p._version) for p in watched))
        if self._memo is None or self._memo[0] != key:
            with torch.no_grad():
                self._memo = (key, source.prefix(model))
        return self._memo[1]


def _input_embedding_path(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    for path, module in model.named_modules():
        if module is embedding:
            return path
    raise ConfigError(f"{type(model).__name__} has no input embedding module; virtual tokens need one.")


class VirtualTokenMethod(Method):
    """Base of the four virtual-token methods: attaches a `VirtualTokenLayer` and the model hooks once."""

    mergeable = False

    def make_source(self, geo: Geometry) -> PrefixSource:
        raise NotImplementedError

    def attach(self) -> None:
        install(self.model)
        geo = geometry(self.model)
        self.config.fill(geo)
        path = _input_embedding_path(self.model)
        layer = self.wrap(path, VirtualTokenLayer, hint=" Virtual tokens attach to the input embedding, so they "
                          "cannot share a model with a method that adapts the embedding.")
        source = self.make_source(geo)
        source.to(self.model.get_input_embeddings().weight.device)
        layer.add(self.adapter_name, source)
        for p in source.parameters():
            p.requires_grad_(True)
        layer.set_active(self.adapter_name)

    def export_state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # as evaluation computes them (an LSTM picks another kernel when recording gradients)
            return {f"{path}.prompt_embeddings": layer.sources[self.adapter_name].saved_values()
                    for path, layer in self.layers()}

    def notes(self) -> list[str]:
        c = self.config
        return [f"{c.num_virtual_tokens} virtual tokens; the saved adapter holds their final values "
                f"(prompt_embeddings {tuple(next(iter(self.export_state().values())).shape)})"]


# --- the hooks ---
def install(model: nn.Module) -> None:
    """Route the model's attention through `_attention` and add the forward pre-hook (once per model)."""
    config = model.config
    impl = config._attn_implementation
    if impl.startswith(ATTN_PREFIX):
        return
    if impl not in _WRAPPABLE or not (getattr(model, "_supports_attention_backend", False)
                                      or getattr(model, "_supports_sdpa", False)):
        raise ConfigError(f"Virtual-token methods need a model whose attention runs through transformers' attention "
                          f"registry with attn_implementation 'sdpa' or 'eager'; {type(model).__name__} uses "
                          f"'{impl}'. Load it with attn_implementation='sdpa'.")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_PREFIX + impl, _attention(impl))
    AttentionMaskInterface.register(ATTN_PREFIX + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    config._attn_implementation = ATTN_PREFIX + impl
    model.register_forward_pre_hook(_pre_forward, with_kwargs=True)


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    if RECORD_KWARG in kwargs:
        return None  # the recording pass itself
    layer = model.get_input_embeddings()
    if not isinstance(layer, VirtualTokenLayer) or not layer.use_adapter:
        return None
    if args:  # model(input_ids, attention_mask): name them, to read and change them below
        names = [n for n, p in inspect.signature(model.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs = {**dict(zip(names, args)), **kwargs}
    prefix = layer.active_prefix(model)
    kwargs[PREFIX_KWARG] = prefix
    kwargs["position_ids"] = _positions(kwargs) + prefix[0][0].shape[1]
    return (), kwargs


def _positions(kwargs: dict[str, Any]) -> torch.Tensor:
    """The real tokens' position ids as the model would compute them (from the 2-D mask when there is one, so a
    left-padded row matches the same row unpadded)."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    n = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
    if kwargs.get("cache_position") is not None:
        past = int(kwargs["cache_position"][0])
    else:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" since transformers 5.25
        past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + n, device=tokens.device)[None]


def _inner_attention(impl: str, module: nn.Module) -> Callable[..., Any]:
    if impl == "eager":  # each modeling file has its own eager function
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward; load the model with "
                               "attn_implementation='sdpa'.")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _attention(impl: str) -> Callable[..., Any]:
    mask_kind = "bool" if impl == "sdpa" else "additive"

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        record = kwargs.pop(RECORD_KWARG, None)
        prefix = kwargs.pop(PREFIX_KWARG, None)
        if record is not None:
            record[module.layer_idx] = (key, value)
        elif prefix is not None:
            key, value, attention_mask = with_prefix(query, key, value, attention_mask, prefix[module.layer_idx],
                                                     kwargs.get("sliding_window"), kwargs.get("position_ids"),
                                                     mask_kind)
        return _inner_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    return attention


def with_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                layer_prefix: tuple[torch.Tensor, torch.Tensor], sliding_window: int | None,
                position_ids: torch.Tensor | None, mask_kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put the prefix before `key` / `value` ([B, kv_heads, K, D]) and give the mask P leading columns that every
    query may attend to, within the sliding window if the layer has one. `mask` is the model's own for the real keys:
    None (causal), boolean (True = attend) or additive (0 = attend); `mask_kind` says which to build from None."""
    pk, pv = layer_prefix
    b, p = key.shape[0], pk.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    key = torch.cat([pk.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
    device = query.device
    prefix_ok = torch.ones(1, q_len, p, dtype=torch.bool, device=device)
    if sliding_window:  # position of each query counted from the first virtual token (position ids are shifted)
        q_pos = position_ids if position_ids is not None and position_ids.shape[-1] == q_len else \
            (p + kv_len - q_len + torch.arange(q_len, device=device))[None]
        prefix_ok = (q_pos[:, :, None] - torch.arange(p, device=device)[None, None, :]) < sliding_window
    if mask is None:
        rows = kv_len - q_len + torch.arange(q_len, device=device)[:, None]
        cols = torch.arange(kv_len, device=device)[None, :]
        real_ok = cols <= rows
        if sliding_window:
            real_ok &= rows - cols < sliding_window
        allowed = torch.cat([prefix_ok, real_ok.expand(prefix_ok.shape[0], -1, -1)], dim=2)[:, None]
        if mask_kind == "bool":
            return key, value, allowed
        zero = torch.zeros((), dtype=query.dtype, device=device)
        return key, value, torch.where(allowed, zero, torch.finfo(query.dtype).min)
    bsz = max(mask.shape[0], prefix_ok.shape[0])
    mask = mask.expand(bsz, -1, -1, -1)
    prefix_ok = prefix_ok[:, None].expand(bsz, mask.shape[1], q_len, p)
    if mask.dtype == torch.bool:
        return key, value, torch.cat([prefix_ok, mask], dim=-1)
    columns = torch.where(prefix_ok, torch.zeros((), dtype=mask.dtype, device=device), torch.finfo(mask.dtype).min)
    return key, value, torch.cat([columns, mask], dim=-1)
