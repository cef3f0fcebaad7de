"""The decode loop: prefill each prompt once, then one-token forwards through the model's own cache.

Why not `model.generate`: at batch 1 on a CPU its per-step bookkeeping and bf16 weight reordering cost more than the
model's arithmetic, and it cannot take a request into a batch that is already running. This loop keeps exactly what
makes the tokens (the model's own forward and DynamicCache, the position ids and masks `generate` builds, the logits
processors it would apply, argmax or multinomial sampling), so greedy decoding gives `generate`'s tokens, and adds:

- rows that finish leave the batch at once, and new rows join a running batch at the next step (`Decoder.add`);
- a prompt that begins as a kept one (the caller's `PrefixCache`, prefix.py) prefills only the rest;
- per-row settings: each row has its own processors, stop ids and strings, token budget, cancel event and sampling
  generator (a seeded row samples what it samples alone, whatever runs beside it);
- faster products for the linear layers at small batches (`fast_layers.py`: peftkit's kernel, or bf16 weights packed
  once for oneDNN);
- for Llama-family models (Llama, Mistral, Qwen2, Qwen3; no sliding window), decode steps through `llama_step.py`:
  the model's own forward without transformers' per-call wrappers (the same logits to the bit), and for plain fp32 or
  bf16 ones (no hooks; no adapter, or an unmerged LoRA one) of up to 16 rows, the decoder layers in one call of
  peftkit's decode kernel (fp32: logits equal to fp32 rounding, 1.8x at batch 1, 2.3x with a LoRA adapter; bf16:
  torch's bf16 roundings, a near-tie now and then decided the other way, 2.7x transformers' bf16 `generate` at batch
  1). PEFTKIT_DECODE_KERNEL=0 turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading
from typing import Any, Callable, Sequence

import torch
from transformers import (
    GenerationConfig,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from . import kv, prefix
from .fast_layers import FastLayers
from .llama_step import LlamaStep, NativeLayers

DIRECT_ENV = "PEFTKIT_DIRECT_STEP"  # "0": every decode step through the model's own forward (to compare)
NATIVE_ENV = "PEFTKIT_DECODE_KERNEL"  # "0": the direct step's layers through torch (to compare)
NATIVE_ROWS = 16  # the most rows the decode kernel takes in one step

# generation_config fields that add logits processing this loop does not do; a model whose generation_config sets any
# of them away from its default generates through `model.generate` instead (see `processors`)
_UNSUPPORTED = ("guidance_scale", "sequence_bias", "no_repeat_ngram_size", "bad_words_ids", "min_length",
                "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "top_h", "min_p",
                "typical_p", "epsilon_cutoff", "eta_cutoff", "watermarking_config", "renormalize_logits",
                "num_beams", "num_beam_groups", "diversity_penalty", "penalty_alpha", "prompt_lookup_num_tokens",
                "encoder_repetition_penalty", "prefill_chunk_size", "cache_implementation", "stop_strings",
                "max_time", "low_memory", "assistant_early_exit", "dola_layers")
_DEFAULTS = GenerationConfig()


def processors(kwargs: dict[str, Any], generation_config: Any) -> tuple[list[Any], bool] | None:
    """The logits processors and the sampling switch `generate(**kwargs)` would use, in its order; None when the
    model's generation_config asks for processing this loop does not do."""

    def setting(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        return getattr(generation_config, name, getattr(_DEFAULTS, name, None))

    for name in _UNSUPPORTED:
        if name not in kwargs and getattr(generation_config, name, None) != getattr(_DEFAULTS, name, None):
            return None
    out: list[Any] = []
    penalty = setting("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty))
    sample = bool(setting("do_sample"))
    if sample:
        temperature, top_k, top_p = setting("temperature"), setting("top_k"), setting("top_p")
        if temperature is not None and temperature != 1.0:
            out.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return out, sample


@dataclasses.dataclass(eq=False)
class Row:
    """One sequence being generated, with everything that decides its tokens and when it stops."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    processors: list[Any] = dataclasses.field(default_factory=list)
    sample: bool = False
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    cancel: threading.Event | None = None
    on_token: Callable[[int], None] | None = None  # called with each new token as it is chosen (streaming)
    on_done: Callable[[Row], None] | None = None  # called once, when the row has finished
    tokens: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sample and self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            if self.on_done is not None:
                self.on_done(self)


class Decoder:
    """One running batch on one model: `add` prefills rows and joins them, `step` decodes one token for every row.

    The batch is left-padded to a common cache length, as `generate` pads it: the attention mask marks padding 0,
    position ids count each row's real tokens. Rows that finish are dropped from the cache at once, and so are the
    leading positions that no remaining row uses.
    """

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, layers: FastLayers | None = None,
                 direct: bool = True, prefixes: prefix.PrefixCache | None = None) -> None:
        self.model, self.tokenizer, self.pad_id, self.layers = model, tokenizer, pad_id, layers
        self.prefixes = prefixes if prefixes is not None and prefixes.enabled else None  # prompts kept (prefix.py)
        params = _forward_parameters(model)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self.direct = _direct_step(model) if direct else None  # decode steps without transformers' wrappers
        # the direct step's decoder layers in one kernel call (llama_step.NativeLayers), built at the first step
        self.native_on = direct and os.environ.get(NATIVE_ENV, "1").strip() != "0"
        self.native: NativeLayers | None = None
        self.native_tried = False
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [rows, cache length]: 1 real, 0 padding
        self.positions = torch.zeros(0, dtype=torch.long)  # each row's next position id
        self.last = torch.zeros(0, dtype=torch.long)  # each row's newest token, the next step's input
        self.steps = 0

    def __len__(self) -> int:
        return len(self.rows)

    # --- model calls ---
    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        device = _device(self.model)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "position_ids": positions.to(device),
                                  "attention_mask": None if mask is None else mask.to(device),
                                  self.cache_kwarg: cache, "use_cache": True}
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        direct = self.direct if input_ids.shape[1] == 1 and self.direct is not None and self.direct.still_valid() \
            else None
        args = (kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"], cache)
        native = self._native(cache) if direct is not None and input_ids.shape[0] <= NATIVE_ROWS else None
        if native is not None:
            logits = native(*args)
        else:
            with self.layers.active(self.model) if self.layers is not None else contextlib.nullcontext():
                logits = direct(*args) if direct is not None else self.model(**kwargs).logits
        return logits[:, -1].to(copy=True, dtype=torch.float32).cpu()

    def _native(self, cache: Any) -> NativeLayers | None:
        """The decode kernel's plan for the direct step's model (built on the first decode step, again after a change
        it cannot stand for), or None where it does not apply (`cache`: the step's)."""
        if self.native is not None and self.native.current():
            return self.native
        if self.native is None and self.native_tried:
            return None
        self.native_tried = True
        self.native = NativeLayers.build(self.direct, self.layers) if self.direct is not None and self.native_on \
            and kv.rows_supported(cache) else None
        return self.native

    @torch.inference_mode()  # fewer dispatch layers per op than no_grad: 15% of a step's overhead
    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill `rows` in one left-padded forward, choose their first tokens, and join the ones still going to the
        running batch (they take part from the next `step`). Returns the rows that already finished."""
        rows = [r for r in rows if not _cancelled_before_start(r)]
        if not rows:
            return []
        prompts = [r.prompt for r in rows]
        cache = kv.new_cache(self.model)
        prefixes = self.prefixes if self.prefixes is not None and kv.rows_supported(cache) else None
        scope = prefixes.scope(self.model) if prefixes is not None else 0
        found = prefixes.match(scope, prompts) if prefixes is not None else [(0, None)] * len(rows)
        kept, width = prefix.plan(prompts, [n for n, _ in found])
        start = max(kept)  # cache positions filled from kept prompts: each row's right-aligned, padding before
        if start:
            kv.fill(cache, [None if entry is None else entry.layers for _, entry in found], kept, start)
        ids, mask = left_padded([p[k:] for p, k in zip(prompts, kept)], self.pad_id)
        before = (torch.arange(start)[None, :] >= start - torch.tensor(kept)[:, None]).long()  # kept: 1, padding: 0
        mask = torch.cat([before, mask], dim=1)
        positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))[:, start:]
        logits = self._forward(ids, None if bool(mask.all()) else mask, positions, cache)
        if prefixes is not None:
            for i, (p, (n, _)) in enumerate(zip(prompts, found)):
                if n < len(p):  # the row's prompt ends at the last position, with no gap before it
                    prefixes.keep(scope, p, kv.row_span(cache, i, start + width - len(p), start + width))
        finished = self._choose(rows, logits)
        going = [i for i, r in enumerate(rows) if not r.done]
        if not going:
            return finished
        if len(going) < len(rows):
            index = torch.tensor(going)
            kv.keep_rows(cache, index)
            mask, rows = mask[index], [rows[i] for i in going]
        self._join(rows, cache, mask)
        return finished

    def _join(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> None:
        last = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long)
        positions = mask.sum(-1)
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(rows), cache, mask, positions, last
        else:
            if not (kv.rows_supported(self.cache) and kv.rows_supported(cache)):
                raise RuntimeError("This model's cache cannot take rows into a running batch; finish it first.")
            old, new = self.mask.shape[1], mask.shape[1]
            kv.left_pad(self.cache, new - old)
            kv.left_pad(cache, old - new)
            width = max(old, new)
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            kv.append_rows(self.cache, cache)
            self.rows += rows
            self.positions = torch.cat([self.positions, positions])
            self.last = torch.cat([self.last, last])
        self._trim()

    def can_join(self) -> bool:
        """Whether rows can join now: always into an empty batch, else only with a cache that takes rows."""
        return not self.rows or kv.rows_supported(self.cache)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Decode one token for every row; return the rows that finished (they have left the batch)."""
        finished = [r for r in self.rows if r.cancelled]
        for r in finished:
            r.finish()
        self._drop_finished()
        if not self.rows:
            return finished
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        mask = None if bool(self.mask.all()) else self.mask
        logits = self._forward(self.last[:, None], mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        self.steps += 1
        finished += self._choose(self.rows, logits)
        self.last = torch.tensor([r.tokens[-1] for r in self.rows], dtype=torch.long)
        self._drop_finished()
        return finished

    def run(self, rows: Sequence[Row]) -> None:
        """Generate `rows` to their ends as one batch (what `ChatEngine.generate` does)."""
        self.add(rows)
        while self.rows:
            self.step()

    # --- token choice ---
    def _choose(self, rows: Sequence[Row], logits: torch.Tensor) -> list[Row]:
        """Append each row's next token (`generate`'s processing, then argmax or sampling); return finished rows."""
        chosen = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.processors or r.sample:
                scores = logits[i:i + 1]
                if r.processors:
                    ids = torch.tensor([r.prompt + r.tokens], dtype=torch.long)
                    for p in r.processors:
                        scores = p(ids, scores)
                if r.sample:
                    probs = torch.nn.functional.softmax(scores, dim=-1)
                    chosen[i] = int(torch.multinomial(probs, num_samples=1, generator=r.generator))
                else:
                    chosen[i] = int(scores.argmax(-1))
        finished = []
        for r, token in zip(rows, chosen):
            r.tokens.append(token)
            if r.on_token is not None:
                r.on_token(token)
            if (token in r.stop_ids or len(r.tokens) >= r.max_new_tokens or self._stop_string(r)
                    or r.cancelled):
                r.finish()
                finished.append(r)
        return finished

    def _stop_string(self, row: Row) -> bool:
        """Whether a stop string has appeared in the row's text: checked on a window of its newest tokens that
        surely holds the whole string (a token is at least one byte)."""
        if not row.stop_strings:
            return False
        window = 4 * max(len(s.encode()) for s in row.stop_strings) + 4
        text = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
        return any(s in text for s in row.stop_strings)

    # --- bookkeeping ---
    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache = [], None
            self.mask = torch.zeros(0, 0, dtype=torch.long)
            self.positions = self.last = torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        kv.keep_rows(self.cache, index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache positions that are padding in every row."""
        if not kv.rows_supported(self.cache):
            return
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            kv.drop_left(self.cache, first)
            self.mask = self.mask[:, first:]


def left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `prompts` left-padded to the longest, so every row's next token is generated at
    the same position, as `generate` pads a batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)


def _cancelled_before_start(row: Row) -> bool:
    if row.cancelled:
        row.finish()
        return True
    return False


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _transformers_model(model: Any) -> Any:
    """The transformers model under any wrappers (a TunedModel's base model), or None."""
    from transformers import PreTrainedModel

    inner = model
    while not isinstance(inner, PreTrainedModel) and isinstance(getattr(inner, "model", None), torch.nn.Module):
        if "generate" in vars(inner):  # a wrapper or recorder put on this instance stays in charge
            return None
        inner = inner.model
    return inner if isinstance(inner, PreTrainedModel) and "generate" not in vars(inner) else None


def _direct_step(model: Any) -> LlamaStep | None:
    """The direct decode step for `model`, where it applies: the transformers model itself, or a TunedModel over it
    (a pass-through wrapper) with no hooks of its own."""
    if os.environ.get(DIRECT_ENV, "1").strip() == "0":
        return None
    from ..tuned import TunedModel

    inner = _transformers_model(model)
    if inner is None:
        return None
    outer = model
    while outer is not inner:
        if type(outer) is not TunedModel or outer._forward_hooks or outer._forward_pre_hooks \
                or "forward" in outer.__dict__:
            return None
        outer = outer.model
    return LlamaStep.build(inner)


def _forward_parameters(model: Any) -> set[str]:
    """The keyword arguments of the transformers model's forward (under a TunedModel, its base model's)."""
    return set(inspect.signature(_transformers_model(model).forward).parameters)


def supports(model: Any) -> bool:
    """Whether `model` can decode here: a decoder-only transformers model (or a TunedModel over one) whose forward
    takes position ids and a cache, and whose `generate` has not been replaced on the instance (a wrapper or a
    recorder stays in charge)."""
    inner = _transformers_model(model)
    if inner is None or getattr(inner.config, "is_encoder_decoder", False):
        return False
    params = set(inspect.signature(inner.forward).parameters)
    return "position_ids" in params and ("cache" in params or "past_key_values" in params)
