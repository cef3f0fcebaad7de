"""Chat templates, and the token-exact loss mask: which tokens are answer content plus its end-of-turn token.

A template renders a conversation to one string and reports the character spans of each answer (content + end
token). `encode` tokenizes the whole string once, so training ids are exactly what rendering at inference gives,
then maps the character spans to token positions.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import json
import logging
from typing import Any

from ..errors import ConfigError
from .formats import Conversation, RowError

logger = logging.getLogger("peftkit.data")

IGNORE_INDEX = -100

# One tool-use instruction for every built-in template (Qwen2.5's wording), so tool data works with any of them.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
TOOL_CALL = "<tool_call>\n{content}\n</tool_call>"


def _tools_text(tools: str) -> str:
    schemas = json.loads(tools)
    schemas = schemas if isinstance(schemas, list) else [schemas]
    return TOOLS_PROMPT.replace("{tools}", "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas))


def _with_tools(system: str, tools: str | None) -> str:
    if not tools:
        return system
    return f"{system}\n\n{_tools_text(tools)}" if system else _tools_text(tools)


class Template:
    """Renders messages to text; `answer_spans` also says where each answer (content + end-of-turn) lies."""

    name: str

    def render(self, messages: list[dict], tokenizer: Any, *, tools: str | None = None,
               add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def answer_spans(self, messages: list[dict], tokenizer: Any, *, tools: str | None = None,
                     last_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
        raise NotImplementedError

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end an answer, for generation."""
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclasses.dataclass(frozen=True)
class StringTemplate(Template):
    """A template made of format strings; `{content}` is the turn's text, `{bos}`/`{eos}` the tokenizer's tokens.

    An answer renders as `assistant_header + answer + eot + sep`; the loss covers `answer + eot`.
    """

    name: str
    prefix: str = ""
    system: str = "{content}"
    user: str = "{content}"
    tool: str | None = None  # a tool's result; None: formatted like a user turn
    assistant_header: str = ""  # also the generation prompt
    answer: str = "{content}"
    function_call: str | None = None  # None: the answer format around a <tool_call> block
    eot: str = "{eos}"
    sep: str = ""
    default_system: str = ""
    system_in_first_user: bool = False  # no system turn (Mistral): the system text opens the first user turn

    def answer_format(self, role: str) -> str:
        if role == "assistant":
            return self.answer
        return self.function_call or self.answer.replace("{content}", TOOL_CALL)

    def _fill(self, fmt: str, tokenizer: Any, content: str = "") -> str:
        fmt = fmt.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
        return fmt.replace("{content}", content)  # last, so content is never scanned for placeholders

    def _render(self, messages, tokenizer, tools, add_generation_prompt):
        fill = lambda fmt, content="": self._fill(fmt, tokenizer, content)  # noqa: E731
        has_system = bool(messages) and messages[0]["role"] == "system"
        system = _with_tools(messages[0]["content"] if has_system else self.default_system, tools)
        text, spans = fill(self.prefix), []
        if system and not self.system_in_first_user:
            text += fill(self.system, system)
        for i, m in enumerate(messages[1:] if has_system else messages):
            role, content = m["role"], m["content"]
            if role == "user":
                if i == 0 and system and self.system_in_first_user:
                    content = fill(self.system, system) + content
                text += fill(self.user, content)
            elif role == "tool":
                text += fill(self.tool or self.user, content)
            else:
                text += fill(self.assistant_header)
                start = len(text)
                text += fill(self.answer_format(role), content) + fill(self.eot)
                spans.append((start, len(text)))
                text += fill(self.sep)
        if add_generation_prompt:
            text += fill(self.assistant_header)
        return text, spans

    def render(self, messages, tokenizer, *, tools=None, add_generation_prompt=False) -> str:
        return self._render(messages, tokenizer, tools, add_generation_prompt)[0]

    def answer_spans(self, messages, tokenizer, *, tools=None, last_only=False):
        text, spans = self._render(messages, tokenizer, tools, False)
        return text, spans[-1:] if last_only else spans

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids = super().stop_token_ids(tokenizer)
        eot = tokenizer.encode(self._fill(self.eot, tokenizer), add_special_tokens=False)
        return ids + [eot[0]] if len(eot) == 1 and eot[0] not in ids else ids


class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template, so training matches what `apply_chat_template` gives at inference.

    Answer spans come from rendering prefixes: answer k is `render(messages[:k+1])` minus
    `render(messages[:k], add_generation_prompt=True)`, trimmed after its last special token (`<|im_end|>\\n` keeps
    `<|im_end|>`). Both renders must be prefixes of the full render, which holds for templates that do not rewrite
    earlier turns; a row where it fails is skipped and counted.
    """

    name = "tokenizer"

    def __init__(self, chat_template: str, end_tokens: tuple[str, ...]) -> None:
        self.chat_template = chat_template
        self.end_tokens = end_tokens  # the tokenizer's special tokens, longest first
        self.native_tools = "tools" in chat_template
        self.native_calls = "tool_calls" in chat_template

    def _hf_messages(self, messages: list[dict], tools: str | None) -> tuple[list[dict], list | None]:
        out = []
        for m in messages:
            if m["role"] == "function_call" and self.native_calls:
                try:
                    calls = json.loads(m["content"])
                except json.JSONDecodeError:
                    calls = None
                calls = calls if isinstance(calls, list) else [calls]
                if all(isinstance(c, dict) and "name" in c for c in calls):
                    out.append({"role": "assistant", "content": "",
                                "tool_calls": [{"type": "function", "function": c} for c in calls]})
                    continue
            out.append({"role": "assistant" if m["role"] == "function_call" else m["role"], "content": m["content"]})
        if tools and not self.native_tools:  # the template ignores `tools=`: describe them in the system prompt
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": _with_tools(out[0]["content"], tools)}
            else:
                out.insert(0, {"role": "system", "content": _with_tools("", tools)})
            return out, None
        return out, (json.loads(tools) if tools else None)

    def _apply(self, tokenizer, messages, tools, add_generation_prompt) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.chat_template,
                                                 tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a Jinja `raise_exception` (e.g. roles must alternate) or a template bug
            raise RowError(f"the tokenizer's chat template rejected the conversation: {e}") from e

    def render(self, messages, tokenizer, *, tools=None, add_generation_prompt=False) -> str:
        hf, hf_tools = self._hf_messages(messages, tools)
        return self._apply(tokenizer, hf, hf_tools, add_generation_prompt)

    def answer_spans(self, messages, tokenizer, *, tools=None, last_only=False):
        hf, hf_tools = self._hf_messages(messages, tools)
        full = self._apply(tokenizer, hf, hf_tools, False)
        offset = len(hf) - len(messages)  # a system turn added for tools shifts indices by one
        answers = [k + offset for k, m in enumerate(messages) if m["role"] in ("assistant", "function_call")]
        spans = []
        for k in answers[-1:] if last_only else answers:
            before = self._apply(tokenizer, hf[:k], hf_tools, True)
            upto = self._apply(tokenizer, hf[: k + 1], hf_tools, False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise RowError("the tokenizer's chat template renders earlier turns differently as the conversation "
                               "grows (e.g. it drops reasoning); use mask_history=True or a named template")
            spans.append((len(before), self._answer_end(upto, len(before))))
        return full, spans

    def _answer_end(self, text: str, start: int) -> int:
        """Cut what follows the answer's last special token when it is only whitespace (ChatML's newline)."""
        best = -1
        for tok in self.end_tokens:
            i = text.rfind(tok, start)
            if i >= 0 and i + len(tok) > best and not text[i + len(tok):].strip():
                best = i + len(tok)
        return best if best > start else len(text)


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content))
    return tuple(sorted((t for t in tokens if t), key=len, reverse=True))


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n", assistant_header="<|im_start|>assistant\n", eot="<|im_end|>",
    sep="\n",
)
_LLAMA3 = "<|start_header_id|>{role}<|end_header_id|>\n\n"

# LLaMA-Factory's templates of the same names (data/template.py), with its turn formats and default systems.
TEMPLATES: dict[str, StringTemplate] = {t.name: t for t in [
    StringTemplate("default", system="System: {content}{eos}\n", user="Human: {content}{eos}\n",
                   assistant_header="Assistant:", sep="\n"),
    StringTemplate("alpaca", user="### Instruction:\n{content}\n\n", assistant_header="### Response:\n", sep="\n\n",
                   default_system="Below is an instruction that describes a task. "
                                  "Write a response that appropriately completes the request.\n\n"),
    StringTemplate("chatml", **_CHATML),
    StringTemplate("qwen", **{**_CHATML, "tool": "<|im_start|>user\n<tool_response>\n{content}\n</tool_response>"
                                                 "<|im_end|>\n"},
                   default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    StringTemplate("llama3", prefix="{bos}", system=_LLAMA3.format(role="system") + "{content}<|eot_id|>",
                   user=_LLAMA3.format(role="user") + "{content}<|eot_id|>",
                   tool=_LLAMA3.format(role="ipython") + "{content}<|eot_id|>",
                   assistant_header=_LLAMA3.format(role="assistant"), eot="<|eot_id|>"),
    StringTemplate("mistral", prefix="{bos}", system="{content}\n\n", system_in_first_user=True,
                   user="[INST] {content}[/INST]", tool='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]',
                   answer=" {content}", function_call="[TOOL_CALLS] {content}"),
    StringTemplate("empty"),
]}


def get_template(name: str | None, tokenizer: Any) -> Template:
    """None -> the tokenizer's own chat template; otherwise a built-in template by LLaMA-Factory name."""
    if name is None:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):  # some tokenizers carry several named templates
            chat_template = chat_template.get("default")
        if not chat_template:
            raise ConfigError(
                f"Tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template; set `template` to one "
                f"of: {', '.join(TEMPLATES)}."
            )
        return ChatTemplate(chat_template, _special_tokens(tokenizer))
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown template '{name}'.{hint} Built-in templates: {', '.join(TEMPLATES)}; "
                          "or leave `template` unset to use the tokenizer's own chat template.")
    template = TEMPLATES[name]
    if "{eos}" in template.eot and tokenizer.eos_token is None:
        raise ConfigError(f"Template '{name}' ends answers with the tokenizer's eos token, but this tokenizer has "
                          "none; set tokenizer.eos_token or pick a template with its own end token (chatml, llama3).")
    eot = template._fill(template.eot, tokenizer)
    if len(tokenizer.encode(eot, add_special_tokens=False)) != 1:
        logger.warning("Template '%s' ends turns with %r, which this tokenizer splits into several tokens: the model "
                       "will see it as plain text. Check that the template matches the model.", name, eot)
    return template


def encode(conv: Conversation, template: Template, tokenizer: Any, *, cutoff_len: int, train_on_prompt: bool = False,
           mask_history: bool = False) -> tuple[dict[str, list[int]], bool]:
    """Tokenize one conversation -> ({"input_ids", "labels"}, truncated). Raises RowError if no answer token fits.

    labels[0] is always IGNORE_INDEX: no token predicts it, and packing relies on it so that the last token of one
    example never learns to predict the first of the next.
    """
    example, truncated, _ = encode_counted(conv, template, tokenizer, cutoff_len=cutoff_len,
                                           train_on_prompt=train_on_prompt, mask_history=mask_history)
    return example, truncated


def encode_counted(conv: Conversation, template: Template, tokenizer: Any, *, cutoff_len: int,
                   train_on_prompt: bool = False, mask_history: bool = False
                   ) -> tuple[dict[str, list[int]], bool, int]:
    """`encode`, plus how many label tokens truncation dropped, so reports can say what cutoff_len cost."""
    text, spans = template.answer_spans(conv.messages, tokenizer, tools=conv.tools, last_only=mask_history)
    ids, tok_spans = token_spans(tokenizer, text, spans)
    tok_spans = [(s, e) for s, e in tok_spans if e > s]
    if not tok_spans:
        raise RowError("the answer renders to no tokens")
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in tok_spans:
            labels[s:e] = ids[s:e]
    labels[0] = IGNORE_INDEX
    truncated = len(ids) > cutoff_len
    labels_cut = 0
    if truncated:
        trained = sum(label != IGNORE_INDEX for label in labels)
        ids, labels = _truncate(ids, labels, tok_spans[0], cutoff_len, train_on_prompt)
        labels_cut = trained - sum(label != IGNORE_INDEX for label in labels)
    if all(label == IGNORE_INDEX for label in labels):
        raise RowError(f"no answer token fits in cutoff_len={cutoff_len}")
    return {"input_ids": ids, "labels": labels}, truncated, labels_cut


def token_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], *, use_offsets: bool = True
                ) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize `text` once; map character spans to token spans. A token straddling an edge counts as answer.

    Fast tokenizers report each token's characters (one pass); others tokenize each prefix and match it against
    the full ids. Both give the same spans (tests check it on the demo data).
    """
    if use_offsets and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        ends = [e for _, e in enc["offset_mapping"]]
        edges = [(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)) for a, b in spans]
        return list(enc["input_ids"]), edges
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids, [(_prefix_edge(tokenizer, text, a, ids, end=False), _prefix_edge(tokenizer, text, b, ids, end=True))
                 for a, b in spans]


def _prefix_edge(tokenizer: Any, text: str, pos: int, ids: list[int], *, end: bool) -> int:
    head = tokenizer.encode(text[:pos], add_special_tokens=False)
    if ids[: len(head)] == head:
        return len(head)
    n = 0  # the tokenizations part where a token straddles `pos`
    while n < len(head) and n < len(ids) and head[n] == ids[n]:
        n += 1
    return n + 1 if end else n


def _truncate(ids: list[int], labels: list[int], first_answer: tuple[int, int], cutoff_len: int,
              train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Keep at most `cutoff_len` tokens, shortening the prompt before the answer.

    The first answer keeps up to half the budget; if the prompt before it does not fit in the rest, the prompt's
    middle goes, so the system prompt's start and the turn header right before the answer both stay.
    """
    start, end = first_answer
    keep_answer = min(end - start, max(1, cutoff_len // 2))
    if train_on_prompt or start + keep_answer <= cutoff_len:
        return ids[:cutoff_len], labels[:cutoff_len]
    prompt_budget = cutoff_len - keep_answer
    head = prompt_budget // 2
    keep = [*range(head), *range(start - (prompt_budget - head), start + keep_answer)]
    new_labels = [labels[i] for i in keep]
    new_labels[0] = IGNORE_INDEX
    return [ids[i] for i in keep], new_labels
