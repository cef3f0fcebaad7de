"""The one generation engine: chat template, batching with left padding, sampling, stop tokens and strings, adapter
choice. `peftkit chat`, `peftkit predict` and the API all generate through it, so they behave identically.

Tokens come from peftkit's decode loop (`decode.py`: the model's own forward and cache, `generate`'s processing, rows
that leave and join a running batch), or from transformers' `model.generate` for models and settings it does not
cover (encoder-decoders, generation_config processing it lacks, a `generate` replaced on the instance), and
everywhere with PEFTKIT_DECODE=generate, to compare."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from typing import Any, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..data import get_template
from ..data.formats import add_turn, calls_content
from ..errors import AdapterLoadError, ConfigError
from ..methods.base import ModuleTaken
from ..tuned import TunedModel, share_base
from . import decode
from .fast_layers import FastLayers
from .prefix import PrefixCache

DECODE_ENV = "PEFTKIT_DECODE"  # "generate": always generate through transformers' model.generate


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; greedy unless `do_sample` (or a temperature > 0 with `do_sample` left None).

    None means "not set"; 0 always means 0: temperature 0 is greedy, top_p 0 keeps only the most likely token, top_k 0
    keeps every token (no top-k cut, as in transformers).
    """

    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        """Refused here, once, so `peftkit chat`, predict and the API fail before any generation starts."""
        for name, ok, what in (("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                               ("temperature", self.temperature is None or self.temperature >= 0, "at least 0"),
                               ("top_p", self.top_p is None or 0 <= self.top_p <= 1, "between 0 and 1"),
                               ("top_k", self.top_k is None or self.top_k >= 0, "at least 0"),
                               ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0,
                                "greater than 0")):
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)}.")

    @property
    def sampling(self) -> bool:
        if self.do_sample is None:
            return self.temperature is not None and self.temperature > 0
        return self.do_sample and self.temperature != 0


@dataclasses.dataclass
class Completion:
    text: str  # with tool calls read out, the text besides them
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string), "length", or "tool_calls"
    tool_calls: list[dict] = dataclasses.field(default_factory=list)  # [{"name", "arguments": {...}}]


def conversation(messages: list[dict]) -> list[dict[str, str]]:
    """OpenAI chat messages -> peftkit's roles (data/formats.py), as training reads them: an assistant message with
    `tool_calls` becomes a function_call turn (its text, if any, is dropped: templates write a call turn as the call
    alone), and consecutive tool results one tool turn. A tool result's `tool_call_id` is not needed: templates
    answer calls in order (Mistral's ids are derived from the calls, as in training)."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            role, content = "function_call", calls_content(m["tool_calls"])
        add_turn(out, role, content)
    return out


def stop_token_ids(template: Any, tokenizer: Any, model: Any) -> list[int]:
    """The tokens that end a reply: the template's, and the model's own (its generation_config's: Llama 3.1's
    <|eom_id|>, GLM-4's <|observation|>, which ends a tool call), for the tokenizer's own template, which names only
    eos."""
    model_ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    model_ends = [model_ends] if isinstance(model_ends, int) else list(model_ends or [])
    return sorted(set(template.stop_token_ids(tokenizer) + model_ends))


class ChatEngine:
    """Generate assistant replies for lists of {role, content} messages with a base model or a TunedModel; offered
    tools, replies come with the calls in them read out (`complete`).

    `template` is a LLaMA-Factory template name, None for the tokenizer's own chat template; `enable_thinking` is
    LLaMA-Factory's key for reasoning templates (False prompts with an empty think block). `adapter` picks one of a
    TunedModel's adapters per call (None: the base model; `default_adapter` is the one that was active when the
    engine was made); one lock makes switching and generating atomic.
    """

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None, *,
                 enable_thinking: bool = True) -> None:
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("This tokenizer has no chat template; chat needs one (use an instruct/chat model, or set "
                              "`template`).")
        self.model = model.eval()
        self.trees = [self.model]  # module trees over the same base weights; see load_adapter
        self._pristine: Any = None  # an adapter-free tree over those weights, to grow new trees from
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer, enable_thinking=enable_thinking)
        self.stop_ids = stop_token_ids(self.template, tokenizer, model)
        # id -> marker, for the single-token markers of the template's tool calls, which decoding keeps
        self.call_markers = {ids[0]: marker for marker in self.template.tool_format.markers
                             if len(ids := tokenizer.encode(marker, add_special_tokens=False)) == 1}
        self.lock = threading.RLock()
        self.layers = FastLayers()  # decode-time products of the linear layers, for every tree (fast_layers.py)
        self.direct_step = True  # False: decode steps through the model's own forward (llama_step.py; to compare)
        self.prefixes = PrefixCache()  # prompts' keys and values kept for the next prompts that begin alike
        # What `peftkit chat --adapter` and predict use: the adapter active when the engine was made (None: base).
        self.default_adapter: str | None = getattr(model, "active_adapter", None) if self.adapters else None

    # --- inputs ---
    def prompt_ids(self, messages: list[dict], tools: list[dict] | str | None = None) -> list[int]:
        """`messages` in peftkit's roles or OpenAI's (see `conversation`); `tools` as OpenAI tool schemas (or bare
        functions, as LLaMA-Factory's data lists them), a list or its JSON, shown to the model in the template's
        own tool format."""
        if tools is not None and not isinstance(tools, str):
            tools = json.dumps(tools, ensure_ascii=False)
        text = self.template.render(conversation(messages), self.tokenizer, tools=tools or None,
                                    add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def adapters(self) -> list[str]:
        return [name for tree in self.trees for name in getattr(tree, "adapters", {})]

    def load_adapter(self, folder: str, name: str) -> None:
        """Serve the adapter in `folder` as `name`, on the same base weights as every other adapter.
        Adapters go on one TunedModel when their layers fit together; one whose target modules already carry another
        method's layers (LoRA and IA3 both on v_proj) goes on a further module tree that shares the base tensors.
        """

        if name in self.adapters:
            raise ConfigError(f"An adapter named '{name}' is already served; pick another name.")
        self.layers.forget()  # the trees' modules change
        if not isinstance(self.model, TunedModel):  # a plain base model: wrap it, keeping an adapter-free tree
            self._pristine = share_base(self.model)
            self.model = TunedModel(self.model).eval()
            self.trees = [self.model]
        elif self._pristine is None:
            raise ConfigError("This engine was built around a TunedModel; load adapters on it directly.")
        for tree in self.trees:
            try:
                tree.load_adapter(folder, name)
                return
            except AdapterLoadError as e:
                if not isinstance(e.__cause__, ModuleTaken):
                    raise
        tree = TunedModel(share_base(self._pristine)).eval()
        tree.load_adapter(folder, name)
        self.trees.append(tree)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, prompts: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded, so every row's next token is generated at the same position."""
        ids, mask = decode.left_padded(prompts, self._pad_id())
        return {"input_ids": ids.to(self._device()), "attention_mask": mask.to(self._device())}

    def _generate_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "eos_token_id": self.stop_ids or None,
                              "pad_token_id": self.tokenizer.pad_token_id}
        if params.sampling:
            top_p = 1.0 if params.top_p is None else params.top_p
            top_k = 0 if params.top_k is None else params.top_k
            # top_p 0 keeps exactly the most likely token; transformers' own top-p cut at 0 keeps up to a few on
            # large vocabularies, where its float32 cumulative sum rounds past 1
            if top_p == 0:
                top_p, top_k = 1.0, 1
            kw.update(do_sample=True, temperature=1.0 if params.temperature is None else params.temperature,
                      top_p=top_p, top_k=top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.repetition_penalty is not None:
            kw["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kw

    def tree(self, adapter: str | None) -> Any:
        """The module tree that carries `adapter` (None: the base model's), without switching to it."""
        if adapter is None:
            return self.model
        tree = next((t for t in self.trees if adapter in getattr(t, "adapters", {})), None)
        if tree is None:
            raise ConfigError(f"No adapter named '{adapter}'. Served: {', '.join(self.adapters) or 'none'}.")
        return tree

    def use(self, adapter: str | None) -> tuple[Any, Any]:
        """The model tree to generate with and the context to generate in, with `adapter` active (None: the base);
        hold `lock` from here to the end of the generation."""
        tree = self.tree(adapter)
        if adapter is None:
            return tree, (tree.disable_adapter() if self.adapters else contextlib.nullcontext())
        tree.set_adapter(adapter)
        return tree, contextlib.nullcontext()

    # --- generation ---
    def rows(self, prompts: Sequence[list[int]], params: GenerationParams, model: Any = None,
             cancel: threading.Event | None = None) -> list[decode.Row] | None:
        """Rows for the decode loop (one per prompt, each with `params`' processing, stop ids and strings), or None
        where `model` (default: the engine's) must generate through `model.generate` instead."""
        model = self.model if model is None else model
        if os.environ.get(DECODE_ENV, "").strip().lower() == "generate" or not decode.supports(model):
            return None
        found = decode.processors(self._generate_kwargs(params), getattr(model, "generation_config", None))
        if found is None:
            return None
        processors, sample = found
        return [decode.Row(list(p), params.max_new_tokens, frozenset(self.stop_ids), processors, sample, params.seed,
                           params.stop, cancel) for p in prompts]

    def decoder(self, model: Any) -> decode.Decoder:
        """A decode batch on `model` (one of `trees`), to fill with `rows`."""
        return decode.Decoder(model, self.tokenizer, self._pad_id(), self.layers, self.direct_step, self.prefixes)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], params: GenerationParams = GenerationParams(),
                 adapter: str | None = None, cancel: threading.Event | None = None) -> list[Completion]:
        """Complete token-id prompts in one batch; stop strings are cut from the text, as OpenAI's API does.
        Setting `cancel` ends the generation at the next token."""
        with self.lock:
            model, context = self.use(adapter)
            rows = self.rows(prompts, params, model, cancel)
            with context:
                if rows is None:
                    return self._generate_hf(model, prompts, params, cancel)
                self.decoder(model).run(rows)
        return [self.completion(prompt, row.tokens, params) for prompt, row in zip(prompts, rows)]

    def _generate_hf(self, model: Any, prompts: Sequence[list[int]], params: GenerationParams,
                     cancel: threading.Event | None, **extra: Any) -> list[Completion]:
        """`generate` through transformers' `model.generate` (the engine's lock held, the adapter set); `extra`
        goes to `model.generate` (a streamer)."""
        stopping = {"stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)])} if cancel is not None else {}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        batch = self._batch(prompts)
        out = model.generate(**batch, **self._generate_kwargs(params), **stopping, **extra)
        width = batch["input_ids"].shape[1]
        return [self.completion(prompt, row[width:].tolist(), params) for prompt, row in zip(prompts, out)]

    def completion(self, prompt: list[int], new: list[int], params: GenerationParams) -> Completion:
        """The Completion of `prompt` from its generated tokens `new` (stop token and strings cut off)."""
        ended = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        tokens = new[:ended] if ended is not None else new
        while tokens and tokens[-1] == self.tokenizer.pad_token_id and ended is None:
            tokens = tokens[:-1]  # padding after a row that finished early on a stop string
        text = self._decode(tokens)
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        finished = ended is not None or cut >= 0 or len(new) < params.max_new_tokens
        used = len(tokens) + (1 if ended is not None else 0)
        return Completion(text.strip(), len(prompt), used, "stop" if finished else "length")

    def _decode(self, tokens: list[int]) -> str:
        """The text without special tokens, except the markers of the template's tool calls."""
        text, start = "", 0
        for k, token in enumerate(tokens):
            if token in self.call_markers:
                text += self.tokenizer.decode(tokens[start:k], skip_special_tokens=True) + self.call_markers[token]
                start = k + 1
        return text + self.tokenizer.decode(tokens[start:], skip_special_tokens=True)

    def read_calls(self, done: Completion) -> Completion:
        """`done` with the tool calls in its text read out, for a reply to a prompt that offered tools: the calls on
        `tool_calls`, the rest as its text, finish_reason "tool_calls". A reply without a well-formed call is kept."""
        content, calls = self.template.parse_tool_calls(done.text)
        if not calls:
            return done
        return dataclasses.replace(done, text=content, tool_calls=calls, finish_reason="tool_calls")

    def complete(self, messages: list[dict], params: GenerationParams = GenerationParams(),
                 adapter: str | None = None, tools: list[dict] | str | None = None) -> Completion:
        """One reply to `messages`; when `tools` are offered, the calls in it read out (see `read_calls`)."""
        done = self.generate([self.prompt_ids(messages, tools)], params, adapter)[0]
        return self.read_calls(done) if tools else done

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float | None = None,
              top_p: float | None = None, adapter: str | None = None, params: GenerationParams | None = None) -> str:
        """The full answer (greedy unless a temperature is given)."""
        if params is None:
            params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        return self.complete(messages, params, adapter).text

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None, adapter: str | None = None,
               params: GenerationParams | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated (the engine stays locked until it ends).

        Setting `cancel`, or closing the iterator, ends generation at the next token and frees the engine, so a
        reader that goes away (a disconnected API client) does not hold it for the whole `max_new_tokens`.
        """
        if params is None:
            params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        cancel = threading.Event() if cancel is None else cancel
        prompt = self.prompt_ids(messages)
        failure: list[BaseException] = []
        rows = self.rows([prompt], params, self.tree(adapter), cancel)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=rows is None, skip_special_tokens=True)

        def run() -> None:
            try:
                with self.lock, torch.no_grad():
                    model, context = self.use(adapter)
                    with context:
                        if rows is not None:
                            rows[0].on_token = lambda token: streamer.put(torch.tensor([token]))
                            self.decoder(model).run(rows)
                            streamer.end()
                            return
                        self._generate_hf(model, [prompt], params, cancel, streamer=streamer)
            except BaseException as e:  # re-raised in the caller's thread; end the stream so it does not hang
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:  # also when the reader stops early; the thread then ends at the next token, unjoined
            cancel.set()
        thread.join()
        if failure:
            raise failure[0]


class _Cancelled(StoppingCriteria):
    """Stops every row once `event` is set: how a stream's reader ends a generation running in another thread."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
