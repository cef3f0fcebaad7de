"""Chat templates, and the token-exact loss mask: which tokens are answer content plus its end-of-turn token.

A template renders a conversation to one string and reports the character spans of each answer (content + end
token). `encode` tokenizes the whole string once, so training ids are exactly what rendering at inference gives,
then maps the character spans to token positions.

The built-in templates carry LLaMA-Factory's names and render what each model family's own chat template (the Jinja
in its tokenizer_config.json) renders, tool calls included where the family has them; tests/test_templates_families.py
checks them against those templates. Where LLaMA-Factory's template differs from the family's, the family's wins
and a comment says how.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import hashlib
import json
import logging
import re
from typing import Any

from ..errors import ConfigError
from .formats import Conversation, RowError

logger = logging.getLogger("peftkit.data")

IGNORE_INDEX = -100


# --- tools ---

def _schemas(tools: str | None) -> list[dict]:
    """The tools column as OpenAI-style schemas ({"type": "function", "function": {...}}), the shape chat templates
    expect; LLaMA-Factory's data (glaive) lists bare functions."""
    if not tools:
        return []
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        raise RowError("the tools column is not valid JSON") from None
    out = []
    for schema in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(schema, dict):
            raise RowError("the tools column must be a JSON list of function schemas (objects)")
        wrapped = schema.get("type") == "function" and isinstance(schema.get("function"), dict)
        out.append(schema if wrapped else {"type": "function", "function": schema})
    return out


def _calls(content: str) -> list[dict]:
    """A function_call turn ({"name", "arguments"} as JSON, or a list of them) -> [{"name", "arguments"}]."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise RowError('a function_call turn must be JSON like {"name": "f", "arguments": {...}} (or a list of them)')
    out = []
    for c in calls:
        arguments = c.get("arguments", c.get("parameters", {}))
        if isinstance(arguments, str):  # some datasets store the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"name": c["name"], "arguments": arguments})
    return out


def _call_id(k: int, call: dict) -> str:
    """A 9-character id for the k-th call of a conversation (Mistral's templates require one). Derived from the call,
    not random, so a dataset tokenizes the same every time."""
    return hashlib.sha1(f"{k}:{json.dumps(call, sort_keys=True)}".encode()).hexdigest()[:9]


def _dumps(value: Any, indent: int | None = None) -> str:
    """JSON as the chat templates' `tojson` writes it (transformers: non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _read_calls(text: str, *, bare: bool = False) -> list[dict] | None:
    """A model's JSON call (or list of calls) -> [{"name", "arguments"}]; None when it is not one, so the reply stays
    text. `bare`: the JSON stands alone, without a call marker, so it must also carry its arguments ("arguments" or
    Llama's "parameters"): a JSON answer with a `name` field is not a call."""
    try:
        calls = _calls(text)
    except RowError:
        return None
    if bare:
        raw = json.loads(text)
        if not all("arguments" in c or "parameters" in c for c in (raw if isinstance(raw, list) else [raw])):
            return None
    return calls if all(isinstance(c["arguments"], dict) for c in calls) else None


QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
LLAMA_TOOLS = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    'argument name and its value}.Do not use variables.\n\n'
)
# glm-4-9b-chat's tool preamble, from its tokenizer's chat template.
GLM4_TOOLS = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
              "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")


class ToolStyle:
    """How one family shows the model its tools, writes its calls and reads their results.

    The base style is Qwen2.5's (`<tools>` in the system prompt, `<tool_call>` JSON answers); families whose chat
    template has no tool format use it too, so tool data trains with every template.
    """

    # Where the tool list goes: "system" (after the system text), "system_turn" (a system turn of its own, before
    # the system prompt), "first_user" (before the first user message's text), "before_last_user" (a block right
    # before the last user turn).
    at = "system"
    # The tokens a call is written with that reading it back needs; the engine keeps them when decoding a reply,
    # though a tokenizer may count them special (Mistral's [TOOL_CALLS] is a control token).
    markers: tuple[str, ...] = ("<tool_call>", "</tool_call>")

    def listing(self, schemas: list[dict]) -> str:
        return QWEN_TOOLS.replace("{tools}", "\n".join(_dumps(s) for s in schemas))

    def system(self, system: str, schemas: list[dict]) -> str:
        """The system text when tools are given."""
        if self.at != "system":
            return system
        return f"{system}\n\n{self.listing(schemas)}" if system else self.listing(schemas)

    def call(self, calls: list[dict], ids: list[str]) -> str:
        return "\n".join(f"<tool_call>\n{_dumps(c)}\n</tool_call>" for c in calls)

    def parse_calls(self, text: str) -> tuple[str, list[dict]]:
        """The inverse of `call`, for a model's reply: (the text besides the calls, the calls as {"name",
        "arguments"}). A reply with any malformed call stays text, whole. A last call may lack its closing tag (a
        model that stops right after the JSON)."""
        call = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
        calls = [_read_calls(block) for block in call.findall(text)]
        if not calls or any(c is None for c in calls):
            return text, []
        return call.sub("", text).strip(), [c for block in calls for c in block]

    def result(self, content: str, ids: list[str]) -> str:
        return content


@dataclasses.dataclass(frozen=True)
class LlamaTools(ToolStyle):
    """Llama 3.1+ JSON tool calling, tools in the first user message (Meta's default, tools_in_user_message)."""

    preamble: str  # put before the system text when there are tools
    preamble_alone: bool  # also when there is no system text (3.1 always writes its system turn; 4 only if given)
    at = "first_user"
    markers = ()

    def listing(self, schemas: list[dict]) -> str:
        return LLAMA_TOOLS + "".join(_dumps(s, indent=4) + "\n\n" for s in schemas)

    def system(self, system: str, schemas: list[dict]) -> str:
        return self.preamble + system if system or self.preamble_alone else system

    def call(self, calls: list[dict], ids: list[str]) -> str:
        # Meta's template takes one call per turn; several are written as a JSON list (LLaMA-Factory's way).
        objects = [{"name": c["name"], "parameters": c["arguments"]} for c in calls]
        return _dumps(objects[0] if len(objects) == 1 else objects)

    def parse_calls(self, text: str) -> tuple[str, list[dict]]:
        """A reply that is all JSON call(s). Llama 4 opens one with an empty python block, 3.1 at times with
        <|python_tag|>; a decoder that keeps special tokens leaves them in."""
        body = re.sub(r"<\|python_(start|end|tag)\|>", "", text).strip()
        calls = _read_calls(body, bare=True) if body.startswith(("{", "[")) else None
        return ("", calls) if calls else (text, [])

    def result(self, content: str, ids: list[str]) -> str:
        return _dumps(content)  # Meta's template writes a text result with `tojson`: quoted


@dataclasses.dataclass(frozen=True)
class MistralTools(ToolStyle):
    """Mistral's control tokens; the v3 tokenizer puts a space after each, tekken (v3 tekken, v7) does not."""

    space: str
    at = "before_last_user"
    markers = ("[TOOL_CALLS]",)

    def listing(self, schemas: list[dict]) -> str:
        functions = [{**s, "function": {k: v for k, v in s["function"].items() if k != "return"}} for s in schemas]
        return f"[AVAILABLE_TOOLS]{self.space}{_dumps(functions)}[/AVAILABLE_TOOLS]"

    def call(self, calls: list[dict], ids: list[str]) -> str:
        return f"[TOOL_CALLS]{self.space}{_dumps([{**c, 'id': i} for c, i in zip(calls, ids)])}"

    def parse_calls(self, text: str) -> tuple[str, list[dict]]:
        """[TOOL_CALLS] and a JSON list of calls (the ids in it are the model's; callers make their own)."""
        before, marker, body = text.partition("[TOOL_CALLS]")
        calls = _read_calls(body) if marker else None
        return (before.strip(), calls) if calls else (text, [])

    def result(self, content: str, ids: list[str]) -> str:
        # Parallel results arrive as one turn (formats.py joins them), answered with the first call's id.
        call_id = ids[0] if ids else ""
        return f'[TOOL_RESULTS]{self.space}{{"content": {content}, "call_id": "{call_id}"}}[/TOOL_RESULTS]'


class GLM4Tools(ToolStyle):
    """GLM-4: the tools in a system turn of their own; a call is `name\\n{arguments}`; results are observations."""

    at = "system_turn"
    markers = ()

    def listing(self, schemas: list[dict]) -> str:
        # "\n## ", not the "\n\n## " GLM-4's template spells: under transformers' trim_blocks its `{% if %}` eats a
        # newline, so this is what apply_chat_template (and so every server) shows the model.
        return GLM4_TOOLS + "".join(
            f"\n## {s['function']['name']}\n\n{_dumps(s['function'], indent=4)}\n"
            "在调用上述函数时，请使用 Json 格式表示调用的参数。"
            for s in schemas)

    def call(self, calls: list[dict], ids: list[str]) -> str:
        if len(calls) != 1:
            raise RowError("GLM-4 calls one function per turn, and this function_call turn holds several")
        return f"{calls[0]['name']}\n{_dumps(calls[0]['arguments'])}"

    def parse_calls(self, text: str) -> tuple[str, list[dict]]:
        """A function name alone on the first line, then a JSON object of its arguments, as GLM-4's own code reads
        a reply."""
        name, newline, body = text.strip().partition("\n")
        try:
            arguments = json.loads(body) if newline and re.fullmatch(r"[A-Za-z_][\w.\-]*", name) else None
        except json.JSONDecodeError:
            arguments = None
        return ("", [{"name": name, "arguments": arguments}]) if isinstance(arguments, dict) else (text, [])


TOOL_STYLES: dict[str, ToolStyle] = {
    "qwen": ToolStyle(),
    "llama3": LlamaTools("Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
                         preamble_alone=True),  # the date Meta's template uses unless told the day's
    "llama4": LlamaTools("Environment: ipython\n", preamble_alone=False),
    "mistral": MistralTools(" "),
    "mistral_tekken": MistralTools(""),
    "glm4": GLM4Tools(),
}


def _with_tools(system: str, tools: str | None) -> str:
    """The system text describing `tools`, for chat templates that cannot show tools themselves."""
    return TOOL_STYLES["qwen"].system(system, _schemas(tools)) if tools else system


# --- templates ---

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

    @property
    def tool_format(self) -> ToolStyle:
        """How this template writes tool calls: what `parse_tool_calls` reads."""
        raise NotImplementedError

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        """A reply to a prompt that offered tools -> (its text besides the calls, the calls as {"name",
        "arguments"}); a reply that holds no well-formed call comes back as it is, with no calls."""
        return self.tool_format.parse_calls(text)


@dataclasses.dataclass(frozen=True)
class StringTemplate(Template):
    """A template made of format strings; `{content}` is the turn's text, `{bos}`/`{eos}` the tokenizer's tokens.

    An answer renders as `assistant_header + [think block] + answer + eot + sep`; the loss covers what the model
    writes after the generation prompt up to its end-of-turn token: `answer + eot` (and the think block when
    thinking is trained).
    """

    name: str
    prefix: str = ""  # once, first
    system: str = "{content}"
    user: str = "{content}"
    tool: str | None = None  # a tool's result; None: formatted like a user turn
    assistant_header: str = ""  # opens an answer; also the generation prompt
    answer: str = "{content}"
    function_call: str | None = None  # the answer format of a tool call; None: `answer`
    eot: str = "{eos}"  # ends an answer. Empty: the marker of the next turn (a stop word) ends it (GLM-4's <|user|>)
    last_eot: str | None = None  # ends the conversation's last answer; None: `eot`
    sep: str = ""  # after eot, not trained
    suffix: str = ""  # after a whole conversation rendered without a generation prompt (Phi-3's eos)
    default_system: str = ""
    system_at: str = "turn"  # "turn"; or the system text opens the "first_user" / "last_user" message (Mistral)
    tool_style: str = "qwen"  # how tools, calls and results are written: a name in TOOL_STYLES
    trim: tuple[str, ...] = ()  # roles whose content the family's template strips (`| trim`)
    stop_words: tuple[str, ...] = ()  # tokens besides eos and eot that end an answer
    think: tuple[str, str] | None = None  # a reasoning model's think block, (open, close)
    think_prompt: str = ""  # what the generation prompt opens a think block with when thinking (DeepSeek-R1's)
    thinking: bool | None = None  # LLaMA-Factory's enable_thinking; None: set by get_template (True when unset)
    think_trim: bool = True  # an answer that loses its reasoning loses the newlines after it too (not in R1's)

    def _fill(self, fmt: str, tokenizer: Any, content: str = "") -> str:
        fmt = fmt.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
        return fmt.replace("{content}", content)  # last, so content is never scanned for placeholders

    def _split_think(self, content: str, *, strip: bool) -> tuple[str, str]:
        """(reasoning, answer) from content that writes its reasoning inline, as Qwen3's template parses it;
        `strip`: drop the newlines between them."""
        assert self.think is not None
        open_tag, close_tag = self.think[0].strip(), self.think[1].strip()
        if close_tag not in content:
            return "", content
        parts = content.split(close_tag)
        return parts[0].rstrip("\n").split(open_tag)[-1].strip("\n"), parts[-1].lstrip("\n") if strip else parts[-1]

    def _render(self, messages: list[dict], tokenizer: Any, tools: str | None,
                add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        def fill(fmt: str, content: str = "") -> str:
            return self._fill(fmt, tokenizer, content)

        def trim(role: str, content: str) -> str:
            return content.strip() if role in self.trim else content

        style, schemas = TOOL_STYLES[self.tool_style], _schemas(tools)
        has_system = bool(messages) and messages[0]["role"] == "system"
        turns = messages[1:] if has_system else messages
        system = trim("system", messages[0]["content"] if has_system else self.default_system)
        if schemas:
            system = style.system(system, schemas)
        users = [i for i, m in enumerate(turns) if m["role"] == "user"] or [-1]
        system_user = {"first_user": users[0], "last_user": users[-1]}.get(self.system_at)
        thinking = self.think is not None and self.thinking is not False

        text, spans, ids, n_calls = fill(self.prefix), [], [], 0
        if schemas and style.at == "system_turn":
            text += fill(self.system, style.listing(schemas))
        if system and system_user is None:
            text += fill(self.system, system)
        for i, m in enumerate(turns):
            role, content = m["role"], trim(m["role"], m["content"])
            if role == "user":
                if schemas and style.at == "first_user" and i == users[0]:
                    content = style.listing(schemas) + content
                if system and i == system_user:
                    content = fill(self.system, system) + content
                if schemas and style.at == "before_last_user" and i == users[-1]:
                    text += style.listing(schemas)
                text += fill(self.user, content)
            elif role == "tool":
                text += fill(self.tool or self.user, style.result(content, ids))
            else:  # an answer: assistant text or a function call
                last, reasoning, block = i == len(turns) - 1, "", ""
                if self.think:
                    reasoning, content = self._split_think(content, strip=self.think_trim or i > users[-1])
                # Qwen3's rule: answers after the last user message show a think block when they are the last
                # turn or have reasoning; earlier answers lose their reasoning. Without thinking the (empty) block
                # is prompt, as the generation prompt writes it.
                if self.think and i > users[-1] and (last or (thinking and reasoning)):
                    block = self.think[0] + (reasoning if thinking else "") + self.think[1]
                    content = content.lstrip("\n")
                if role == "function_call":
                    calls = _calls(content)
                    ids = [_call_id(n_calls + k, c) for k, c in enumerate(calls)]
                    n_calls += len(calls)
                    body = fill(self.function_call or self.answer, style.call(calls, ids))
                else:
                    body = fill(self.answer, content)
                text += fill(self.assistant_header)
                start = len(text) + len((self.think_prompt if thinking else block) if block else "")
                text += block + body + fill(self.last_eot if last and self.last_eot is not None else self.eot)
                spans.append((start, len(text)))
                text += fill(self.sep)
        if add_generation_prompt:
            text += fill(self.assistant_header)
            if self.think:
                text += self.think_prompt if thinking else self.think[0] + self.think[1]
        else:
            text += fill(self.suffix)
        if not self.eot:  # the next turn's marker ends an answer: the model writes it to hand the turn back
            spans = [self._through_stop_word(text, s, e) for s, e in spans]
        return text, spans

    def _through_stop_word(self, text: str, start: int, end: int) -> tuple[int, int]:
        word = next((w for w in self.stop_words if text.startswith(w, end)), "")
        return start, end + len(word)

    def render(self, messages, tokenizer, *, tools=None, add_generation_prompt=False) -> str:
        return self._render(messages, tokenizer, tools, add_generation_prompt)[0]

    def answer_spans(self, messages, tokenizer, *, tools=None, last_only=False):
        text, spans = self._render(messages, tokenizer, tools, False)
        return text, spans[-1:] if last_only else spans

    @property
    def tool_format(self) -> ToolStyle:
        return TOOL_STYLES[self.tool_style]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids = super().stop_token_ids(tokenizer)
        for word in (self.eot, self.last_eot or "", *self.stop_words):
            tokens = tokenizer.encode(self._fill(word, tokenizer), add_special_tokens=False) if word else []
            if len(tokens) == 1 and tokens[0] not in ids:
                ids.append(tokens[0])
        return ids


class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template, so training matches what `apply_chat_template` gives at inference.

    Answer spans come from rendering prefixes: answer k is `render(messages[:k+1])` minus
    `render(messages[:k], add_generation_prompt=True)`, trimmed after its last special token (`<|im_end|>\\n` keeps
    `<|im_end|>`). Both renders must be prefixes of the full render, which holds for templates that do not rewrite
    earlier turns; a row where it fails is skipped and counted. `enable_thinking` goes to the template, which uses it
    if it knows it (Qwen3's: False writes an empty think block into the generation prompt).
    """

    name = "tokenizer"

    def __init__(self, chat_template: str, end_tokens: tuple[str, ...], *, enable_thinking: bool = True) -> None:
        self.chat_template = chat_template
        self.end_tokens = end_tokens  # the tokenizer's special tokens, longest first
        self.enable_thinking = enable_thinking
        self.native_tools = "tools" in chat_template
        self.native_calls = "tool_calls" in chat_template
        self._tool_format = _family_tool_style(chat_template) if self.native_tools else TOOL_STYLES["qwen"]

    @property
    def tool_format(self) -> ToolStyle:
        return self._tool_format

    def _hf_messages(self, messages: list[dict], tools: str | None) -> tuple[list[dict], list | None]:
        out: list[dict] = []
        ids: list[str] = []  # the latest calls' ids: templates such as Mistral's require them, and a result's
        n_calls = 0
        for m in messages:
            if m["role"] == "function_call" and self.native_calls:
                try:
                    calls = _calls(m["content"])
                except RowError:
                    calls = None  # not a call the template can write: plain assistant text
                if calls:
                    ids = [_call_id(n_calls + k, c) for k, c in enumerate(calls)]  # as the built-in templates
                    n_calls += len(calls)
                    out.append({"role": "assistant", "content": "", "tool_calls": [
                        {"id": i, "type": "function", "function": c} for i, c in zip(ids, calls)]})
                    continue
            if m["role"] == "tool" and ids:  # parallel results arrive as one turn: it answers the first call
                out.append({"role": "tool", "content": m["content"], "tool_call_id": ids[0]})
                continue
            out.append({"role": "assistant" if m["role"] == "function_call" else m["role"], "content": m["content"]})
        if tools and not self.native_tools:  # the template ignores `tools=`: describe them in the system prompt
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": _with_tools(out[0]["content"], tools)}
            else:
                out.insert(0, {"role": "system", "content": _with_tools("", tools)})
            return out, None
        return out, (_schemas(tools) or None)

    def _apply(self, tokenizer, messages, tools, add_generation_prompt) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.chat_template,
                                                 tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 enable_thinking=self.enable_thinking)
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


def _family_tool_style(chat_template: str) -> ToolStyle:
    """The tool style a tokenizer's own template writes calls in, told by the markers it spells; Qwen's
    (`<tool_call>`, what Hermes-style templates share) when none is known."""
    if "[TOOL_CALLS]" in chat_template:
        return TOOL_STYLES["mistral"]  # the space after the marker matters to writing, not to reading
    if "<tool_call>" in chat_template:
        return TOOL_STYLES["qwen"]
    if "[gMASK]" in chat_template or "<|observation|>" in chat_template:  # glm-4-9b-chat's spells neither role
        return TOOL_STYLES["glm4"]
    if "ipython" in chat_template or '"parameters"' in chat_template:
        return TOOL_STYLES["llama3"]
    return TOOL_STYLES["qwen"]


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content))
    return tuple(sorted((t for t in tokens if t), key=len, reverse=True))



# --- the built-in templates: LLaMA-Factory's names, each family's own format ---

def _turns(start: str, end: str, sep: str = "") -> dict[str, str]:
    """Every role as `start.format(role) + content + end + sep` (ChatML and its kin)."""
    system, user = (start.format(role) + "{content}" + end + sep for role in ("system", "user"))
    return dict(system=system, user=user, assistant_header=start.format("assistant"), eot=end, sep=sep)


_CHATML = _turns("<|im_start|>{}\n", "<|im_end|>", "\n")
_QWEN = dict(_CHATML, tool="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n")
_THINK = ("<think>\n", "\n</think>\n\n")
_LLAMA3 = dict(_turns("<|start_header_id|>{}<|end_header_id|>\n\n", "<|eot_id|>"), prefix="{bos}",
               tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>")
_LLAMA4 = dict(_turns("<|header_start|>{}<|header_end|>\n\n", "<|eot|>"), prefix="{bos}",
               tool="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>")
# Gemma has no system role: the system text opens the first user turn, as Gemma 3's own template writes it
# (Gemma 1 and 2's templates refuse a system message). No tool format: LLaMA-Factory's `tool` turn.
_GEMMA = dict(prefix="{bos}", system="{content}\n\n", system_at="first_user",
              user="<start_of_turn>user\n{content}<end_of_turn>\n",
              tool="<start_of_turn>tool\n{content}<end_of_turn>\n", assistant_header="<start_of_turn>model\n",
              eot="<end_of_turn>", sep="\n", trim=("user", "assistant"))
# Mistral's templates (and mistral-common) put the system text and the tool list at the LAST user message, and a
# tool call needs an id. LLaMA-Factory puts the system text in the first turn and writes no ids. The v0.3 template
# writes the system text only when the conversation ends with that user message (a prompt), so it drops it from a
# whole conversation; here it stays before the last user message, where every generation prompt has it.
_MISTRAL = dict(prefix="{bos}", system="{content}\n\n", system_at="last_user", function_call="{content}",
                tool="{content}")
_DEEPSEEK3 = dict(prefix="{bos}", user="<｜User｜>{content}", assistant_header="<｜Assistant｜>")

TEMPLATES: dict[str, StringTemplate] = {t.name: t for t in [
    # LLaMA-Factory's own formats (no model family behind them).
    StringTemplate("default", system="System: {content}{eos}\n", user="Human: {content}{eos}\n",
                   assistant_header="Assistant:", sep="\n"),
    StringTemplate("alpaca", user="### Instruction:\n{content}\n\n", assistant_header="### Response:\n", sep="\n\n",
                   default_system="Below is an instruction that describes a task. "
                                  "Write a response that appropriately completes the request.\n\n"),
    StringTemplate("empty"),
    # LLaMA-Factory's few-shot format for base models (`peftkit eval --task`): turns written back to back, a blank line
    # after each answer, and eos only after the last one (its efficient_eos), so the solved examples read as plain text.
    StringTemplate("fewshot", eot="", last_eot="{eos}", sep="\n\n"),
    StringTemplate("chatml", **_CHATML, tool="<|im_start|>tool\n{content}<|im_end|>\n"),
    # Qwen2.5 (and Qwen2, QwQ): its default system prompt, tools in the system turn, results as a user turn.
    StringTemplate("qwen", **_QWEN,
                   default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Qwen3: think blocks on the answers after the last user message. LLaMA-Factory adds an empty block to every
    # answer and keeps earlier answers' reasoning; Qwen3's template does neither.
    StringTemplate("qwen3", **_QWEN, think=_THINK),
    # Qwen3 answering without thinking: reasoning dropped, the empty think block prompted, as Qwen3's template
    # writes it with enable_thinking=False. (LLaMA-Factory's qwen3_nothink, for Qwen3-2507 Instruct, writes no
    # block: leave `template` unset to use such a model's own template.)
    StringTemplate("qwen3_nothink", **_QWEN, think=_THINK, thinking=False),
    # Llama 2: the system prompt inside the first [INST] in <<SYS>> tags, a bos before every turn. LLaMA-Factory
    # writes the answers without the spaces Meta's template puts around them.
    StringTemplate("llama2", user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n",
                   system_at="first_user", answer=" {content} ", trim=("user", "assistant")),
    # Llama 3 and 3.1+: Meta's 3.0 template without tools; with tools 3.1's (dated system turn, tools in the first
    # user message, `ipython` results). LLaMA-Factory lists the tools in the system turn with today's date.
    StringTemplate("llama3", **_LLAMA3, tool_style="llama3", trim=("system", "user", "assistant"),
                   stop_words=("<|eom_id|>",)),
    StringTemplate("llama4", **_LLAMA4, function_call="<|python_start|><|python_end|>{content}",
                   tool_style="llama4", trim=("system",), stop_words=("<|eom|>",)),
    StringTemplate("mistral", **_MISTRAL, user="[INST] {content}[/INST]", answer=" {content}",
                   tool_style="mistral", trim=("assistant",)),  # v0.3, v3 tokenizer
    # Mistral Nemo, Ministral (tekken): v0.3's format without the spaces after control tokens.
    StringTemplate("ministral", **_MISTRAL, user="[INST]{content}[/INST]", tool_style="mistral_tekken"),
    # Mistral Small 3 (v7 tokenizer): a system turn of its own. Its template's default system prompt states the
    # day's date, so it is left out (training data would change daily); write one into the data to use it.
    StringTemplate("mistral_small", prefix="{bos}", system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
                   user="[INST]{content}[/INST]", function_call="{content}", tool="{content}",
                   tool_style="mistral"),
    StringTemplate("gemma", **_GEMMA),
    StringTemplate("gemma2", **_GEMMA),
    StringTemplate("gemma3", **_GEMMA),
    # Phi-3 / 3.5: the template ends a conversation without a generation prompt with eos.
    StringTemplate("phi", **_turns("<|{}|>\n", "<|end|>", "\n"), suffix="{eos}"),
    StringTemplate("phi4", **_turns("<|im_start|>{}<|im_sep|>", "<|im_end|>")),
    # DeepSeek LLM / V2: the template writes "Assistant: " before an answer but prompts with "Assistant:" (the
    # model writes the space). LLaMA-Factory leaves the space out of both.
    StringTemplate("deepseek", prefix="{bos}", system="{content}\n\n", user="User: {content}\n\n",
                   assistant_header="Assistant:", answer=" {content}"),
    # DeepSeek V3 / R1: no tool format here (V3's template writes calls but never shows the model the tools).
    StringTemplate("deepseek3", **_DEEPSEEK3),
    # R1 prompts with "<think>\n" and drops reasoning from its whole-conversation renders; here the last answers
    # keep theirs (what the model writes after that prompt), as LLaMA-Factory's enable_thinking says.
    StringTemplate("deepseekr1", **_DEEPSEEK3, think=_THINK, think_prompt="<think>\n", think_trim=False),
    # GLM-4 (glm-4-9b-chat): no end-of-turn token; the model ends an answer by writing the next turn's marker, and
    # the last answer ends with eos (LLaMA-Factory's). LLaMA-Factory puts the tools after the system text in one
    # turn; GLM-4's template gives them a system turn of their own.
    StringTemplate("glm4", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
                   tool="<|observation|>\n{content}", assistant_header="<|assistant|>", answer="\n{content}",
                   function_call="{content}", eot="", last_eot="{eos}", stop_words=("<|user|>", "<|observation|>"),
                   tool_style="glm4"),
    StringTemplate("yi", **_CHATML),  # Yi-34B-Chat, Yi-1.5
    # Baichuan 2: role tokens only; like GLM-4 an answer ends where the next user turn starts, the last with eos.
    StringTemplate("baichuan2", user="<reserved_106>{content}", assistant_header="<reserved_107>", eot="",
                   last_eot="{eos}", stop_words=("<reserved_106>",)),
    # InternLM2 / 2.5: ChatML after bos. LLaMA-Factory adds InternLM's default system prompt, its template does not.
    StringTemplate("intern2", **_CHATML, prefix="{bos}"),
    # Command R / R+ (no tool format here: Cohere's tool template is a separate, long one).
    StringTemplate("cohere", prefix="{bos}",
                   system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   assistant_header="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", eot="<|END_OF_TURN_TOKEN|>",
                   trim=("user", "assistant")),
    # Falcon-instruct has no chat template: LLaMA-Factory's format, with the system text on a line of its own.
    StringTemplate("falcon", system="{content}\n", user="User: {content}\n", assistant_header="Falcon:",
                   answer="{content}\n", eot="", last_eot="{eos}", stop_words=("User:",)),
    # Vicuna v1.1 as FastChat writes it (LLaMA-Factory drops the spaces after the system text and "ASSISTANT:").
    StringTemplate("vicuna", system="{content} ", user="USER: {content} ", assistant_header="ASSISTANT:",
                   answer=" {content}",
                   default_system="A chat between a curious user and an artificial intelligence assistant. "
                                  "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    # Zephyr: a newline after every eos; no default system prompt (LLaMA-Factory adds "You are Zephyr, ...").
    StringTemplate("zephyr", **_turns("<|{}|>\n", "{eos}", "\n")),
]}


def check_template_name(name: str, key: str = "template",
                        unset: str = "or leave `template` unset to use the tokenizer's own chat template") -> None:
    """An unknown template name fails with the closest one and the list; `key` and `unset` say it as the caller's
    user wrote it (a YAML key or a command-line flag)."""
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown {key} '{name}'.{hint} Built-in templates: {', '.join(TEMPLATES)}; {unset}.")


def get_template(name: str | None, tokenizer: Any, *, enable_thinking: bool = True) -> Template:
    """None -> the tokenizer's own chat template; otherwise a built-in template by LLaMA-Factory name.

    `enable_thinking` (LLaMA-Factory's key) for reasoning templates: True trains the think block (an empty one
    when the data has no reasoning); False drops the reasoning and prompts with an empty block.
    """
    if name is None:
        chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, dict):  # some tokenizers carry several named templates
            chat_template = chat_template.get("default")
        if not chat_template:
            raise ConfigError(
                f"Tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template; set `template` to one "
                f"of: {', '.join(TEMPLATES)}."
            )
        return ChatTemplate(chat_template, _special_tokens(tokenizer), enable_thinking=enable_thinking)
    check_template_name(name)
    template = TEMPLATES[name]
    if template.think is not None and template.thinking is None:
        template = dataclasses.replace(template, thinking=enable_thinking)
    if tokenizer.eos_token is None and any("{eos}" in f for f in dataclasses.astuple(template) if isinstance(f, str)):
        raise ConfigError(f"Template '{name}' writes the tokenizer's eos token, but this tokenizer has none; set "
                          "tokenizer.eos_token or pick a template with its own end token (chatml, llama3).")
    end = template._fill(template.eot or template.last_eot or "", tokenizer)
    if end and len(tokenizer.encode(end, add_special_tokens=False)) != 1:
        logger.warning("Template '%s' ends turns with %r, which this tokenizer splits into several tokens: the model "
                       "will see it as plain text. Check that the template matches the model.", name, end)
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
