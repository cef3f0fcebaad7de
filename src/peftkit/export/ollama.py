"""Ollama export: a Modelfile beside the GGUF, with the model's chat template as an Ollama (Go) template.

Ollama does not run Jinja. A Modelfile's TEMPLATE is a Go text/template, executed with `.System` (the request's
system messages joined by a blank line), `.Messages` (every message, system ones too, with consecutive messages of
one role merged, blank line between, tool results excepted) and `.Tools` (the request's tools). Jinja cannot be
translated to Go in general, so `ollama_template` recognises the chat template's family by rendering probe
conversations and comparing them with each family's rendering, then writes that family's Go template. When the chat
template also renders tools, tool calls and results in its family's tool format (Qwen's `<tool_call>` blocks, also
peftkit's `chatml`; Llama 3.1's JSON calls; Mistral's `[TOOL_CALLS]`), tool probes find it and the Go template gets
`.Tools` / `.ToolCalls` sections, so Ollama offers the model tools; other templates get none, and Ollama reports
the model as not supporting tools rather than prompting it in a format it never saw. tests/test_ollama.py executes
these Go templates with Go itself and checks them byte for byte against the real Hugging Face templates (SmolLM2,
Qwen2.5, Qwen3, Llama 3 and 3.1, Mistral v0.3) and peftkit's own, tool conversations included.

Tool JSON: Ollama's `json` writes compact JSON with `<`, `>` and `&` escaped; the templates rewrite it as the chat
templates' `tojson` writes it (`{"a": 1}`, or Llama's indent of 4), in Go template code (`_go_pyjson`).

Known limits: Go templates cannot trim, so Llama 3's and Mistral's `| trim` of message contents is not reproduced
(contents with leading or trailing whitespace render untrimmed); Qwen3's think blocks are not written (the one Qwen3
puts before a prefilled last answer is missing). A tool schema renders as in training when its keys come in
OpenAI's order (type, function: name, description, parameters: type, properties, required) and are ones Ollama's
API keeps (a property's type, items, description, enum: not `default`, `minimum`, `additionalProperties`, ...).
Ollama reads call arguments as floats (2.0 renders as 2) and sorts the keys of objects nested in them. Mistral's
calls and results carry the calls' ids, so once a call is in the conversation its template needs an Ollama whose
API keeps tool call ids (`tool_calls[].id`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.templates import LLAMA_TOOLS, QWEN_TOOLS
from ..errors import ExportError
from ..io.atomic import atomic_write

# (messages, add_generation_prompt[, tools]) -> prompt text. Messages use peftkit's roles (a tool call is a
# `function_call` turn holding {"name", "arguments"} JSON, a result a `tool` turn); tools is a JSON list of schemas.
# A render that takes no tools gets a template without tool sections.
Render = Callable[..., str]


@dataclasses.dataclass(frozen=True)
class OllamaTemplate:
    """A chat template in Ollama's terms: the Go template and the strings that end a reply."""

    family: str
    template: str  # Go text/template over Ollama's .System / .Messages / .Tools
    stop: tuple[str, ...]
    default_system: str | None  # what the template inserts when the conversation has no system message
    tools: str | None = None  # the tool-call format the template writes (qwen, chatml, llama3.1, mistral); None: none


@dataclasses.dataclass(frozen=True)
class _Slots:
    """The parts of a family's template that vary by model, read off the model's own rendering."""

    default_system: str = ""  # inserted when the conversation has no system message (Qwen, SmolLM2)
    system_prefix: str = ""  # put before the leading system message, or alone when there is none (Llama 3.1's dates)
    eos: str = ""  # Mistral: the token that closes an answer
    system_last_user: bool = False  # Mistral: the system text opens the last user message, not only a last message
    tools: str = ""  # the tool format, a name in the family's tool formats; "": no tool sections
    tools_prefix: str = ""  # Llama 3.1: the system turn's preamble when tools are given


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _dumps(value: Any, indent: int | None = None) -> str:
    """JSON as the chat templates' `tojson` writes it."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


# Probe conversations, each ending with a user turn and rendered with the generation prompt, as Ollama renders a
# chat request. Contents have no edge whitespace, so templates that trim them (Llama 3, Mistral) render them as is.
_SYSTEM = _msg("system", "You answer in one short sentence.")
_U1, _A1 = _msg("user", "Hello! Who are you?"), _msg("assistant", "An assistant.\nHow can I help?")
_U2, _A2 = _msg("user", "What is 2 + 2?"), _msg("assistant", "4")
_U3 = _msg("user", "Thanks, bye.")
_PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    (_U1,),
    (_SYSTEM, _U1),
    (_U1, _A1, _U2),
    (_SYSTEM, _U1, _A1, _U2, _A2, _U3),
)

# Tool probes: a call and its result after a system message, and one in the middle of a conversation without one.
# The schemas hold only what Ollama's API models, in the OpenAI key order the Go templates write.
_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time",
                                      "parameters": {"type": "object", "properties": {}}}},
]
_CALL = _msg("function_call", _dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}))
_RESULT, _A3 = _msg("tool", '{"temp": 21}'), _msg("assistant", "21 degrees.")
_TOOL_PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    (_SYSTEM, _U1, _CALL, _RESULT),
    (_U1, _CALL, _RESULT, _A3, _U2),
)


def _ollama_messages(messages: list[dict], ids: list[str]) -> list[dict]:
    """A peftkit conversation as an Ollama chat request's messages: a `function_call` turn becomes an assistant
    message with `tool_calls`, whose ids are `ids` in order (those the rendering wrote; Mistral's need them)."""
    out, next_id = [], iter(ids)
    for m in messages:
        if m["role"] != "function_call":
            out.append(dict(m))
            continue
        calls = json.loads(m["content"])
        calls = calls if isinstance(calls, list) else [calls]
        out.append({"role": "assistant", "content": "", "tool_calls": [
            {"name": c["name"], "arguments": c["arguments"], "id": next(next_id, "")} for c in calls]})
    return out


def _call_ids(text: str) -> list[str]:
    """The tool call ids a rendering wrote, in order (Mistral's `"id": "..."`; other formats write none)."""
    return re.findall(r'"id": "([^"]*)"', text)


def _collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's view of a conversation (ollama/template `collate`): the joined system text, and the messages with
    consecutive same-role ones merged (tool results stay one message each)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"] != "tool":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    return "\n\n".join(system), merged


class _Family:
    """A chat format: `slots` reads a model's variable parts off its renderings (None: not this family),
    `tool_slots` proposes its tool formats, `render` is what `go` renders for those slots, in Python, so detection
    needs no Go."""

    name: str

    def slots(self, rendered: list[str]) -> _Slots | None:
        """`rendered[i]` is the rendering of `_PROBES[i]`."""
        raise NotImplementedError

    def tool_slots(self, rendered: list[str], slots: _Slots) -> list[_Slots]:
        """Candidate slots with a tool format; `rendered[i]` is the rendering of `_TOOL_PROBES[i]`."""
        return []

    def render(self, system: str, messages: list[dict], slots: _Slots, tools: list[dict] = ()) -> str:
        raise NotImplementedError

    def go(self, slots: _Slots) -> str:
        raise NotImplementedError

    def stop(self, slots: _Slots) -> tuple[str, ...]:
        raise NotImplementedError


_RANGE = "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}"
# Whether the message after a last-but-not-least one is a tool result (Go's `or` stops at the first true argument).
_NEXT_IS_TOOL = '(and (not $last) (eq (index (slice $.Messages $i) 1).Role "tool"))'
# Consecutive tool results are collected into $results, joined by a newline as peftkit's data joins parallel results.
_COLLECT = ('{{ if eq $prev "tool" }}{{ $results = print $results "\\n" .Content }}{{ else }}{{ $results = .Content }}'
            "{{ end }}")


@dataclasses.dataclass(frozen=True)
class _HeaderTools:
    """A headers family's tool format: where the tool list goes, how calls and results are written."""

    name: str
    listing_at: str  # "system": after the system text (Qwen); "first_user": before the first user message (Llama)
    calls: str  # "tool_call": <tool_call> blocks after the content (Qwen); "json": bare JSON instead of it (Llama)
    result_role: str
    result_wrap: tuple[str, str] = ("", "")
    result_json: bool = False  # the result is written as a JSON string (Llama 3.1's `tojson`)

    def listing(self, tools: list[dict]) -> str:
        if self.listing_at == "system":
            return QWEN_TOOLS.replace("{tools}", "\n".join(_dumps(t) for t in tools))
        return LLAMA_TOOLS + "".join(_dumps(t, indent=4) + "\n\n" for t in tools)

    def go_listing(self) -> str:
        if self.listing_at == "system":
            head, tail = QWEN_TOOLS.split("{tools}")
            return _go_text(head) + _go_pyjson("$tools") + _go_text(tail)
        return _go_text(LLAMA_TOOLS) + _go_pyjson("$tools", indent=True)

    def go_tools(self) -> str:
        return _go_tools("\n", "") if self.listing_at == "system" else _go_tools("", "\n\n")


_QWEN_TOOLS = _HeaderTools("qwen", "system", "tool_call", "user", ("<tool_response>\n", "\n</tool_response>"))
_CHATML_TOOLS = _HeaderTools("chatml", "system", "tool_call", "tool")  # peftkit's `chatml`: a `tool` turn
_LLAMA_TOOLS = _HeaderTools("llama3.1", "first_user", "json", "ipython", result_json=True)


@dataclasses.dataclass(frozen=True)
class _Headers(_Family):
    """Every turn is `head + role + sep + content + eot + after`; the generation prompt is the assistant's header
    (ChatML, Llama 3). A last assistant turn is left open, so Ollama continues it (its own templates do the same)."""

    name: str
    head: str
    sep: str
    eot: str
    after: str
    extra_stop: tuple[str, ...]
    tool_formats: tuple[_HeaderTools, ...] = ()

    def _header(self, role: str) -> str:
        return f"{self.head}{role}{self.sep}"

    def _system_block(self, text: str) -> str | None:
        start = self._header("system")
        end = text.find(self.eot, len(start))
        return text[len(start):end] if text.startswith(start) and end >= 0 else None

    def _tools(self, slots: _Slots) -> _HeaderTools | None:
        return next((f for f in self.tool_formats if f.name == slots.tools), None)

    def slots(self, rendered):
        # With a system message the system turn reads prefix + that message (Llama 3.1 puts dates first); without
        # one, prefix + the default system, or no system turn at all.
        given = self._system_block(rendered[1])
        if given is None or not given.endswith(_SYSTEM["content"]):
            return None
        prefix = given[: len(given) - len(_SYSTEM["content"])]
        bare = self._system_block(rendered[0])
        if bare is None:
            return None if prefix else _Slots()
        return _Slots(default_system=bare[len(prefix):], system_prefix=prefix) if bare.startswith(prefix) else None

    def tool_slots(self, rendered, slots):
        # Llama 3.1 opens the system turn with its own preamble when there are tools (3.0's template has none).
        given = self._system_block(rendered[0]) or ""
        prefix = given[: len(given) - len(_SYSTEM["content"])] if given.endswith(_SYSTEM["content"]) else ""
        return [dataclasses.replace(slots, tools=f.name, tools_prefix=prefix if f.listing_at == "first_user" else "")
                for f in self.tool_formats]

    def _system_text(self, slots: _Slots, content: str | None, tools: list[dict]) -> str | None:
        """The system turn's text for the leading system message's `content` (None: there is none)."""
        fmt = self._tools(slots)
        text = slots.default_system if content is None else content
        if fmt is None or not tools:
            if content is None and not slots.system_prefix + text:
                return None  # no system message, and the template adds nothing of its own
            return slots.system_prefix + text
        if fmt.listing_at == "system":
            return slots.system_prefix + (f"{text}\n\n" if text else "") + fmt.listing(tools)
        return slots.tools_prefix + text

    def render(self, system, messages, slots, tools=()):
        fmt, close = self._tools(slots), self.eot + self.after
        out, results, first_user = [], [], True
        for i, m in enumerate(messages):
            role, last = m["role"], i == len(messages) - 1
            if i == 0 and role != "system" and (text := self._system_text(slots, None, tools)) is not None:
                out.append(self._header("system") + text + close)
            if fmt and role == "tool":
                results.append(m["content"])
                if last or messages[i + 1]["role"] != "tool":
                    joined = "\n".join(results)
                    out.append(self._header(fmt.result_role) + fmt.result_wrap[0]
                               + (_dumps(joined) if fmt.result_json else joined) + fmt.result_wrap[1] + close)
                    results = []
            else:
                if i == 0 and role == "system":
                    body = self._system_text(slots, m["content"], tools)
                else:
                    body = m["content"]
                    if fmt and tools and fmt.listing_at == "first_user" and role == "user" and first_user:
                        body = fmt.listing(tools) + body
                    if fmt and m.get("tool_calls"):
                        body = self._calls(fmt, body, m["tool_calls"])
                out.append(self._header(role) + body)
                if not (last and role == "assistant"):
                    out.append(close)
            if last and role != "assistant":
                out.append(self._header("assistant"))
            first_user = first_user and role != "user"
        return "".join(out)

    @staticmethod
    def _calls(fmt: _HeaderTools, content: str, calls: list[dict]) -> str:
        objects = [{"name": c["name"], ("arguments" if fmt.calls == "tool_call" else "parameters"): c["arguments"]}
                   for c in calls]
        if fmt.calls == "json":  # Llama: the call instead of the content; several as a list (peftkit's data)
            return _dumps(objects[0] if len(objects) == 1 else objects)
        blocks = "\n".join(f"<tool_call>\n{_dumps(o)}\n</tool_call>" for o in objects)
        return f"{content}\n{blocks}" if content else blocks

    def go(self, slots):
        fmt, close = self._tools(slots), self.eot + self.after
        first = slots.system_prefix + slots.default_system
        if fmt is None:
            return self._go_plain(slots)
        t = fmt.go_tools() + '{{- $prev := "" }}{{ $results := "" }}'
        t += "{{ $firstUser := true }}\n" if fmt.listing_at == "first_user" else "\n"
        t += _RANGE
        if fmt.calls == "tool_call":
            t += "\n{{- $calls := .ToolCalls }}"
        # with tools, the system turn: the leading system message's, or one of the template's own
        t += "\n{{- if and (eq $i 0) $.Tools }}" + self._header("system") + self._go_system(slots, fmt) + close
        if first:
            t += '{{ else if and (eq $i 0) (ne .Role "system") }}' + self._header("system") + _go_text(first) + close
        t += "{{ end }}"
        t += '\n{{- if and (eq $i 0) (eq .Role "system") $.Tools }}{{/* written above */}}'
        # a run of tool results, written once at its end
        t += '\n{{- else if eq .Role "tool" }}' + _COLLECT + "{{ if not " + _NEXT_IS_TOOL + " }}"
        t += self._header(fmt.result_role) + _go_text(fmt.result_wrap[0])
        t += _go_pyjson("json $results") if fmt.result_json else "{{ $results }}"
        t += _go_text(fmt.result_wrap[1]) + close + "{{ end }}"
        t += "\n{{- else }}" + self._header("{{ .Role }}")
        if slots.system_prefix:
            t += '{{ if and (eq $i 0) (eq .Role "system") }}' + _go_text(slots.system_prefix) + "{{ end }}"
        if fmt.listing_at == "first_user":
            t += '{{ if and $.Tools $firstUser (eq .Role "user") }}' + fmt.go_listing() + "{{ end }}"
        t += self._go_calls(fmt)
        t += '\n{{- if or (not $last) (ne .Role "assistant") }}' + close + "{{ end }}"
        t += "\n{{- end }}"
        t += '\n{{- if and $last (ne .Role "assistant") }}' + self._header("assistant") + "{{ end }}"
        if fmt.listing_at == "first_user":
            t += '\n{{- if eq .Role "user" }}{{ $firstUser = false }}{{ end }}'
        return t + "\n{{- $prev = .Role }}\n{{- end }}"

    def _go_system(self, slots: _Slots, fmt: _HeaderTools) -> str:
        """Go for `_system_text` with tools, at the first message: a system message or not."""
        if fmt.listing_at == "first_user":
            prefix, given, default = slots.tools_prefix, "{{ .Content }}", slots.default_system
        else:
            prefix, given = slots.system_prefix, "{{ if .Content }}{{ .Content }}\n\n{{ end }}"
            default = f"{slots.default_system}\n\n" if slots.default_system else ""
        text = ('{{ if eq .Role "system" }}' + given + ("{{ else }}" + _go_text(default) if default else "")
                + "{{ end }}")
        return _go_text(prefix) + text + (fmt.go_listing() if fmt.listing_at == "system" else "")

    @staticmethod
    def _go_calls(fmt: _HeaderTools) -> str:
        """The message's content and tool calls. Ollama's tool parser reads the text a call opens with off the first
        text in the first `if .ToolCalls` (<tool_call>); where an action comes first, a call is a bare JSON object."""
        if fmt.calls == "json":  # one call as an object, several as a list (peftkit's data); no content
            return ('{{ if .ToolCalls }}{{ $list := "" }}{{ range $k, $_ := .ToolCalls }}{{ $list = print $list '
                    '(or (and $k ",") "") `{"name":` (json .Function.Name) `,"parameters":` (json .Function.Arguments) '
                    '"}" }}{{ end }}{{ if gt (len .ToolCalls) 1 }}{{ $list = print "[" $list "]" }}{{ end }}'
                    + _go_pyjson("$list") + "{{ else }}{{ .Content }}{{ end }}")
        call = 'print `{"name":` (json .Function.Name) `,"arguments":` (json .Function.Arguments) "}"'
        return ("{{ .Content }}{{ if and .Content $calls }}\n{{ end }}"
                "{{ if .ToolCalls }}{{ range $k, $_ := .ToolCalls }}<tool_call>\n" + _go_pyjson(call)
                + "\n</tool_call>{{ if ne (len (slice $calls $k)) 1 }}\n{{ end }}{{ end }}{{ end }}")

    def _go_plain(self, slots: _Slots) -> str:
        close = self.eot + self.after
        first = slots.system_prefix + slots.default_system
        t = _RANGE
        if first:  # the system turn the template adds when the conversation has none
            t += '\n{{- if and (eq $i 0) (ne .Role "system") }}' + self._header("system") + _go_text(first) + close
            t += "{{ end }}"
        t += self._header("{{ .Role }}")
        if slots.system_prefix:
            t += '{{ if and (eq $i 0) (eq .Role "system") }}' + _go_text(slots.system_prefix) + "{{ end }}"
        t += "{{ .Content }}"
        t += '\n{{- if or (not $last) (ne .Role "assistant") }}' + close + "{{ end }}"
        t += '\n{{- if and $last (ne .Role "assistant") }}' + self._header("assistant") + "{{ end }}"
        return t + "\n{{- end }}"

    def stop(self, slots):
        return (self.eot, *self.extra_stop)


@dataclasses.dataclass(frozen=True)
class _Mistral(_Family):
    """`[INST] user[/INST] answer</s>`, no system turn: the system text opens one user turn, the first one
    (LLaMA-Factory's `mistral`) or a last one: Mistral v0.3's own template (and Ollama's) writes it only when the
    conversation ends with that user message, peftkit's `mistral` at the last user message wherever it is (which
    only tool conversations show). Tools: `[AVAILABLE_TOOLS]` before the last user message, `[TOOL_CALLS]` answers
    and `[TOOL_RESULTS]` carrying the call's id."""

    name: str
    system_first: bool

    def slots(self, rendered):
        text = rendered[2]
        head = f"[INST] {_U1['content']}[/INST] {_A1['content']}"
        tail = f"[INST] {_U2['content']}[/INST]"
        if not (text.startswith(head) and text.endswith(tail)) or len(text) <= len(head) + len(tail):
            return None
        return _Slots(eos=text[len(head): len(text) - len(tail)])

    def tool_slots(self, rendered, slots):
        placements = (False,) if self.system_first else (False, True)
        return [dataclasses.replace(slots, tools="mistral", system_last_user=p) for p in placements]

    def render(self, system, messages, slots, tools=()):
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        out, first, results, call_id = [], True, [], ""
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "user":
                if slots.tools and tools and i == users[-1]:
                    out.append(f"[AVAILABLE_TOOLS] {_dumps(tools)}[/AVAILABLE_TOOLS]")
                if self.system_first:
                    here = first
                else:
                    here = i == users[-1] if slots.system_last_user else last
                out.append("[INST] " + (system + "\n\n" if system and here else "") + m["content"] + "[/INST]")
            elif slots.tools and m.get("tool_calls"):
                calls = [{"name": c["name"], "arguments": c["arguments"], "id": c["id"]} for c in m["tool_calls"]]
                out.append("[TOOL_CALLS] " + _dumps(calls) + ("" if last else slots.eos))
                call_id = calls[0]["id"]
            elif m["role"] == "assistant":
                out.append(" " + m["content"] + ("" if last else slots.eos))
            elif slots.tools and m["role"] == "tool":
                results.append(m["content"])
                if last or messages[i + 1]["role"] != "tool":
                    joined = "\n".join(results)
                    out.append(f'[TOOL_RESULTS] {{"content": {joined}, "call_id": "{call_id}"}}[/TOOL_RESULTS]')
                    results = []
            first = first and m["role"] == "system"
        return "".join(out)

    def go(self, slots):
        if self.system_first:
            where = "$first"
        else:
            where = "(eq $i $lastUser)" if slots.system_last_user else "$last"
        t = _go_tools(",", "", ("[", "]")) if slots.tools else ""
        if slots.tools or slots.system_last_user:
            t += '{{- $lastUser := -1 }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}'
            t += "{{ end }}{{ end }}\n"
        if slots.tools:
            t += '{{- $prev := "" }}{{ $results := "" }}{{ $callID := "" }}\n'
        t += ("{{- $first := true }}\n" if self.system_first else "") + _RANGE
        t += '\n{{- if eq .Role "user" }}'
        if slots.tools:
            t += "{{ if and $.Tools (eq $i $lastUser) }}[AVAILABLE_TOOLS] " + _go_pyjson("$tools")
            t += "[/AVAILABLE_TOOLS]{{ end }}"
        t += "[INST] {{ if and $.System " + where + " }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
        eos = "{{ if not $last }}" + _go_text(slots.eos) + "{{ end }}"
        if slots.tools:  # Ollama finds the call format in the text after this `if .ToolCalls`: [TOOL_CALLS]
            call = ('`{"name":` (json .Function.Name) `,"arguments":` (json .Function.Arguments) `,"id":` (json .ID)'
                    ' "}"')
            t += '\n{{- else if .ToolCalls }}[TOOL_CALLS] {{ $list := "" }}{{ range $k, $_ := .ToolCalls }}'
            t += '{{ $list = print $list (or (and $k ",") "[") ' + call + " }}{{ end }}"
            t += _go_pyjson('print $list "]"') + eos + "{{ $callID = (index .ToolCalls 0).ID }}"
        t += '\n{{- else if eq .Role "assistant" }} {{ .Content }}' + eos
        if slots.tools:
            t += '\n{{- else if eq .Role "tool" }}' + _COLLECT + "{{ if not " + _NEXT_IS_TOOL + " }}"
            t += '[TOOL_RESULTS] {"content": {{ $results }}, "call_id": "{{ $callID }}"}[/TOOL_RESULTS]{{ end }}'
        t += "\n{{- end }}"
        if self.system_first:
            t += '\n{{- if ne .Role "system" }}{{ $first = false }}{{ end }}'
        if slots.tools:
            t += "\n{{- $prev = .Role }}"
        return t + "\n{{- end }}"

    def stop(self, slots):
        return (slots.eos, "[INST]", "[/INST]")


# Stop strings follow Ollama's own library: the end-of-turn token, and the markers of a next turn in case the model
# runs on without it.
_FAMILIES: tuple[_Family, ...] = (
    _Headers("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n", ("<|im_start|>",), (_QWEN_TOOLS, _CHATML_TOOLS)),
    _Headers("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "",
             ("<|start_header_id|>", "<|end_header_id|>"), (_LLAMA_TOOLS,)),
    _Mistral("mistral", system_first=False),
    _Mistral("mistral-system-first", system_first=True),
)
FAMILIES = tuple(f.name for f in _FAMILIES)


def ollama_template(render: Render, *, bos_token: str | None = None) -> OllamaTemplate:
    """The Ollama template equivalent to `render` (a chat template), found by rendering probe conversations.

    `bos_token`: the BOS token llama.cpp adds itself when it tokenizes (the GGUF's add_bos_token); a rendering that
    starts with it is matched without it, so the prompt does not get two. It is kept when the rendering only matches
    with it (SmolLM2's BOS is ChatML's `<|im_start|>`). When `render` takes tools, the template also gets the
    family's tool sections if the chat template renders tool calls in that family's format.
    """
    rendered = []
    for probe in _PROBES:
        try:
            rendered.append(render([dict(m) for m in probe], True))
        except Exception as e:  # a Jinja raise_exception: e.g. the template allows no system message
            raise ExportError(f"The chat template cannot render {_describe(probe)} ({e}), so it cannot be written "
                              f"as an Ollama template. {_WHAT_TO_DO}") from e
    drops = [""] + ([bos_token] if bos_token and all(text.startswith(bos_token) for text in rendered) else [])
    for family in _FAMILIES:
        for drop in drops:
            view = [text[len(drop):] for text in rendered]
            slots = family.slots(view)
            if slots is not None and all(text == family.render(*_collate(list(probe)), slots)
                                         for probe, text in zip(_PROBES, view, strict=True)):
                slots = _with_tools(family, slots, render, drop)
                return OllamaTemplate(family.name, family.go(slots), family.stop(slots), slots.default_system or None,
                                      slots.tools or None)
    sample = rendered[1]
    raise ExportError(f"The chat template matches none of the chat formats peftkit writes as Ollama templates "
                      f"({', '.join(FAMILIES)}). It renders {_describe(_PROBES[1])} as:\n  {sample[:300]!r}\n"
                      f"{_WHAT_TO_DO}")


def _with_tools(family: _Family, slots: _Slots, render: Render, drop: str) -> _Slots:
    """`slots` with the family's tool format that `render` renders the tool probes in, if any."""
    try:
        inspect.signature(render).bind([], True, None)
    except (TypeError, ValueError):  # a render that takes no tools
        return slots
    try:
        rendered = [render([dict(m) for m in probe], True, json.dumps(_TOOLS)) for probe in _TOOL_PROBES]
    except Exception:  # the template rejects tool turns (Jinja's raise_exception): no tool sections
        return slots
    if not all(text.startswith(drop) for text in rendered):
        return slots
    view = [text[len(drop):] for text in rendered]
    for candidate in family.tool_slots(view, slots):
        if all(text == family.render(*_collate(_ollama_messages(list(probe), _call_ids(text))), candidate, _TOOLS)
               for probe, text in zip(_TOOL_PROBES, view, strict=True)):
            return candidate
    return slots


_WHAT_TO_DO = ("Set `template` to the built-in template the model was trained with (chatml, qwen, llama3 or mistral) "
               "and export again, or write the Modelfile's TEMPLATE by hand in Ollama's Go template syntax "
               "(https://github.com/ollama/ollama/blob/main/docs/template.md).")


def _describe(probe: tuple[dict, ...]) -> str:
    turns = sum(m["role"] == "user" for m in probe)
    system = "a system message and " if probe[0]["role"] == "system" else ""
    return f"{system}{turns} user turn{'s' if turns > 1 else ''}"


def _go_text(text: str) -> str:
    """`text` as it must appear in a Go template: as is when plain, else as a quoted Go string (Go would read `{{` as
    an action, and Ollama's Modelfile parser drops unprintable characters and ends at `\"\"\"`)."""
    if "{{" not in text and '"""' not in text and all(c.isprintable() or c == "\n" for c in text):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    return '{{ "' + "".join(out) + '" }}'


# --- tools in Go: Ollama's compact JSON, written as the chat templates' tojson writes it ---

def _go_tools(between: str, after: str, wrap: tuple[str, str] = ("", "")) -> str:
    """Go that sets $tools to the request's tools as compact JSON, each `{"type", "function": {"name",
    "description", "parameters": {"type", "properties", "required"}}}` in that (OpenAI's) order, where Ollama's own
    `json` of a tool puts `required` first. Tools are joined by `between`, each followed by `after`, the list
    wrapped in `wrap`."""
    add = "{{ $tools = print $tools "
    lead = f"(or (and $k {_go_quote(between)}) {_go_quote(wrap[0])}) " if between or wrap[0] else ""
    return ('{{- $tools := "" }}{{ range $k, $_ := $.Tools }}{{ $p := .Function.Parameters }}'
            + add + lead + '`{"type":` (json .Type) `,"function":{"name":` (json .Function.Name) }}'
            + "{{ if .Function.Description }}" + add + '`,"description":` (json .Function.Description) }}{{ end }}'
            # $p.Properties, not .Function.Parameters.Properties: some Ollama versions rewrite the latter to a bool
            + "{{ if or $p.Type $p.Properties }}" + add + '`,"parameters":{"type":` (json $p.Type) }}'
            + "{{ if $p.Properties }}" + add + '`,"properties":` (json $p.Properties) }}{{ end }}'
            + "{{ if $p.Required }}" + add + '`,"required":` (json $p.Required) }}{{ end }}'
            + add + '"}" }}{{ end }}' + add + '"}" "}"' + (f" {_go_quote(after)}" if after else "") + " }}{{ end }}"
            + (add + _go_quote(wrap[1]) + " }}" if wrap[1] else "") + "\n")


def _go_quote(text: str) -> str:
    return json.dumps(text)  # a Go string literal for ASCII text


def _go_pyjson(value: str, *, indent: bool = False) -> str:
    """Go that writes the compact JSON `value` (a Go pipeline) as Python's json.dumps(ensure_ascii=False) writes it:
    ", " and ": " between items (or a newline and 4 spaces per level with `indent`), `\\u003c`, `\\u003e` and
    `\\u0026` (Go's escapes of <, > and &) unescaped. Go templates have no string functions: this walks the bytes,
    tracking whether they are inside a string, and writes the text between the places that change."""
    t = ("{{ with $js := " + value + ' }}{{ $from := 0 }}{{ $in := false }}{{ $esc := false }}{{ $put := "" }}'
         '{{ $skip := "" }}')
    if indent:
        t += '{{ $ind := "" }}{{ $empty := false }}'
    t += ("{{ range $at := len $js }}"
          # what goes after the previous byte (a space after `,`, a newline after `{`), written now it is passed
          "{{ if $put }}{{ slice $js $from $at }}{{ $put }}{{ $from = $at }}{{ $put = \"\" }}{{ end }}"
          # the rest of an escape already written unescaped; the byte after it starts the next stretch
          "{{ if $skip }}{{ $skip = slice $skip 1 }}{{ if not $skip }}{{ $from = $at }}{{ end }}{{ end }}"
          "{{ if not $skip }}{{ $c := index $js $at }}"
          "{{ if $esc }}{{ $esc = false }}"
          "{{ else if $in }}{{ if eq $c 34 }}{{ $in = false }}{{ else if eq $c 92 }}"
          '{{ $e := printf "%.6s" (slice $js $at) }}'
          "{{ if eq $e `\\u003c` }}{{ slice $js $from $at }}<{{ $skip = \"......\" }}"
          "{{ else if eq $e `\\u003e` }}{{ slice $js $from $at }}>{{ $skip = \"......\" }}"
          "{{ else if eq $e `\\u0026` }}{{ slice $js $from $at }}&{{ $skip = \"......\" }}"
          "{{ else }}{{ $esc = true }}{{ end }}{{ end }}"
          "{{ else if eq $c 34 }}{{ $in = true }}")
    if indent:
        t += ('{{ else if eq $c 58 }}{{ $put = " " }}'
              '{{ else if eq $c 44 }}{{ $put = print "\\n" $ind }}'
              '{{ else if eq $c 123 91 }}{{ if eq (printf "%.2s" (slice $js $at)) "{}" "[]" }}{{ $empty = true }}'
              '{{ else }}{{ $ind = print $ind "    " }}{{ $put = print "\\n" $ind }}{{ end }}'
              "{{ else if eq $c 125 93 }}{{ if $empty }}{{ $empty = false }}{{ else }}{{ $ind = slice $ind 4 }}"
              '{{ slice $js $from $at }}{{ print "\\n" $ind }}{{ $from = $at }}{{ end }}')
    else:
        t += '{{ else if eq $c 44 58 }}{{ $put = " " }}'
    return t + "{{ end }}{{ end }}{{ end }}{{ slice $js $from }}{{ end }}"


# --- Modelfile ---

_PARAMETER_ORDER = ("temperature", "top_p", "top_k", "repeat_penalty", "num_predict")


def write_modelfile(out_dir: str | Path, gguf_name: str, template: OllamaTemplate, *, system: str | None = None,
                    parameters: dict[str, float | int | str] | None = None) -> Path:
    """Write `out_dir/Modelfile` for the GGUF `gguf_name` beside it; return its path."""
    if not gguf_name or Path(gguf_name).name != gguf_name or gguf_name in (".", ".."):
        raise ExportError(f"gguf_name must be the name of a file in the export folder, got {gguf_name!r}.")
    lines = [f"FROM {_argument(f'./{gguf_name}', 'the GGUF file name')}",
             f'TEMPLATE """{_long_text(template.template, "TEMPLATE")}"""']
    lines += [f"PARAMETER stop {_argument(s, 'a stop string', quote=True)}" for s in template.stop]
    params = dict(parameters or {})
    for name in [k for k in _PARAMETER_ORDER if k in params] + sorted(k for k in params if k not in _PARAMETER_ORDER):
        lines.append(f"PARAMETER {_parameter(name, params[name])}")
    if system:
        lines.append(f'SYSTEM """{_long_text(system, "SYSTEM")}"""')
    text = "\n".join(lines) + "\n"
    path = Path(out_dir) / "Modelfile"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))
    return path


def _long_text(text: str, what: str) -> str:
    """Check that Ollama's Modelfile parser reads `text` back unchanged from between triple quotes."""
    if '"""' in text:
        raise ExportError(f'The Modelfile {what} cannot contain """ (Ollama\'s Modelfile parser would end the text '
                          f'there and has no escape for it): rewrite it without three double quotes in a row.')
    bad = next((c for c in text if not (c.isprintable() or c in "\n\r\t")), None)
    if bad is not None:
        raise ExportError(f"The Modelfile {what} contains the unprintable character {bad!r}, which Ollama's "
                          "Modelfile parser silently drops: remove it.")
    return text


def _argument(value: str, what: str, *, quote: bool = False) -> str:
    """One value on a Modelfile line; quoted when asked or when it has spaces."""
    if not value or '"' in value or not value.isprintable():
        raise ExportError(f"{what[0].upper()}{what[1:]} {value!r} cannot be written in a Modelfile: it must be "
                          "non-empty, on one line and without double quotes.")
    return f'"{value}"' if quote or any(c.isspace() for c in value) else value


def _parameter(name: str, value: Any) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ExportError(f"Ollama parameter names are letters, digits and underscores; got {name!r}.")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ExportError(f"Ollama parameter {name} must be a finite number, got {value}.")
        text = repr(value)
    elif isinstance(value, str):
        text = _argument(value, f"the value of parameter {name}")
    else:
        raise ExportError(f"Ollama parameter {name} must be a number or a string, got {type(value).__name__}.")
    return f"{name} {text}"


# peftkit's generation keys (Hugging Face names) -> Ollama's. HF's repetition penalty spans the whole context,
# Ollama's its last repeat_last_n (64) tokens: close, not identical.
_OLLAMA_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repetition_penalty": "repeat_penalty"}


def ollama_parameters(cfg: Any) -> dict[str, float | int | str]:
    """peftkit's generation settings (a TrainConfig) as Modelfile PARAMETERs, so Ollama samples as peftkit does."""
    params = {ollama: getattr(cfg, key) for key, ollama in _OLLAMA_NAMES.items()
              if getattr(cfg, key, None) is not None}
    if getattr(cfg, "do_sample", None) is False and "temperature" not in params:
        params["temperature"] = 0  # greedy, as peftkit chat decodes unless told to sample
    # max_new_tokens only when set away from peftkit's default: 512 is a generic cap, not a choice about this model,
    # and Ollama users expect a reply to run to its end-of-turn token (Ollama's own default, num_predict -1).
    max_new_tokens = getattr(cfg, "max_new_tokens", None)
    if max_new_tokens is not None and max_new_tokens != _train_config_default("max_new_tokens"):
        params["num_predict"] = max_new_tokens
    return params


def _train_config_default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)


def ollama_create_command(modelfile: str | Path, name: str) -> str:
    """The shell command that creates the Ollama model `name` from `modelfile`."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(Path(modelfile).resolve()))}"
