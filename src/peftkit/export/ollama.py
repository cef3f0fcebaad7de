"""Ollama export: a Modelfile beside the GGUF, with the model's chat template as an Ollama (Go) template.

Ollama does not run Jinja. A Modelfile's TEMPLATE is a Go text/template, executed with `.System` (the request's
system messages joined by a blank line) and `.Messages` (every message, system ones too, with consecutive messages of
one role merged, blank line between). Jinja cannot be translated to Go in general, so `ollama_template` recognises the
chat template's family by rendering probe conversations and comparing them with each family's rendering, then writes
that family's Go template. tests/test_ollama.py executes these Go templates with Go itself and checks them byte for
byte against the real Hugging Face templates (SmolLM2, Qwen2.5, Llama 3 and 3.1, Mistral v0.3) and peftkit's own.

Known limits: Go templates cannot trim, so Llama 3's and Mistral's `| trim` of message contents is not reproduced
(contents with leading or trailing whitespace render untrimmed); tool calls are not translated, so Ollama reports
the model as not supporting tools rather than prompting it wrongly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..io.atomic import atomic_write

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> prompt text


@dataclasses.dataclass(frozen=True)
class OllamaTemplate:
    """A chat template in Ollama's terms: the Go template and the strings that end a reply."""

    family: str
    template: str  # Go text/template over Ollama's .System / .Messages
    stop: tuple[str, ...]
    default_system: str | None  # what the template inserts when the conversation has no system message


@dataclasses.dataclass(frozen=True)
class _Slots:
    """The parts of a family's template that vary by model, read off the model's own rendering."""

    default_system: str = ""  # inserted when the conversation has no system message (Qwen, SmolLM2)
    system_prefix: str = ""  # put before the leading system message, or alone when there is none (Llama 3.1's dates)
    eos: str = ""  # Mistral: the token that closes an answer


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


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


def _collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's view of a conversation (ollama/template `collate`): the joined system text, and the messages with
    consecutive same-role ones merged."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = _msg(m["role"], merged[-1]["content"] + "\n\n" + m["content"])
        else:
            merged.append(_msg(m["role"], m["content"]))
    return "\n\n".join(system), merged


class _Family:
    """A chat format: `slots` reads a model's variable parts off its renderings (None: not this family), `render`
    is what `go` renders for those slots, in Python, so detection needs no Go."""

    name: str

    def slots(self, rendered: list[str]) -> _Slots | None:
        """`rendered[i]` is the rendering of `_PROBES[i]`."""
        raise NotImplementedError

    def render(self, system: str, messages: list[dict], slots: _Slots) -> str:
        raise NotImplementedError

    def go(self, slots: _Slots) -> str:
        raise NotImplementedError

    def stop(self, slots: _Slots) -> tuple[str, ...]:
        raise NotImplementedError


_RANGE = "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}"


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

    def _header(self, role: str) -> str:
        return f"{self.head}{role}{self.sep}"

    def _system_block(self, text: str) -> str | None:
        start = self._header("system")
        end = text.find(self.eot, len(start))
        return text[len(start):end] if text.startswith(start) and end >= 0 else None

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

    def render(self, system, messages, slots):
        out = []
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if i == 0 and m["role"] != "system" and (slots.system_prefix or slots.default_system):
                out.append(self._header("system") + slots.system_prefix + slots.default_system + self.eot + self.after)
            lead = slots.system_prefix if i == 0 and m["role"] == "system" else ""
            out.append(self._header(m["role"]) + lead + m["content"])
            if not (last and m["role"] == "assistant"):
                out.append(self.eot + self.after)
            if last and m["role"] != "assistant":
                out.append(self._header("assistant"))
        return "".join(out)

    def go(self, slots):
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
    """`[INST] user[/INST] answer</s>`, no system turn: the system text opens one user turn, the last one (Mistral's
    own v0.3 template, and Ollama's) or the first one (peftkit's and LLaMA-Factory's `mistral`)."""

    name: str
    system_first: bool

    def slots(self, rendered):
        text = rendered[2]
        head = f"[INST] {_U1['content']}[/INST] {_A1['content']}"
        tail = f"[INST] {_U2['content']}[/INST]"
        if not (text.startswith(head) and text.endswith(tail)) or len(text) <= len(head) + len(tail):
            return None
        return _Slots(eos=text[len(head): len(text) - len(tail)])

    def render(self, system, messages, slots):
        out, first = [], True
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "user":
                here = system and (first if self.system_first else last)
                out.append("[INST] " + (system + "\n\n" if here else "") + m["content"] + "[/INST]")
            elif m["role"] == "assistant":
                out.append(" " + m["content"] + ("" if last else slots.eos))
            first = first and m["role"] == "system"
        return "".join(out)

    def go(self, slots):
        where = "$first" if self.system_first else "$last"
        t = ("{{- $first := true }}\n" if self.system_first else "") + _RANGE
        t += '\n{{- if eq .Role "user" }}[INST] {{ if and $.System ' + where + " }}{{ $.System }}\n\n{{ end }}"
        t += "{{ .Content }}[/INST]"
        t += '\n{{- else if eq .Role "assistant" }} {{ .Content }}'
        t += "{{ if not $last }}" + _go_text(slots.eos) + "{{ end }}"
        t += "\n{{- end }}"
        if self.system_first:
            t += '\n{{- if ne .Role "system" }}{{ $first = false }}{{ end }}'
        return t + "\n{{- end }}"

    def stop(self, slots):
        return (slots.eos, "[INST]", "[/INST]")


# Stop strings follow Ollama's own library: the end-of-turn token, and the markers of a next turn in case the model
# runs on without it.
_FAMILIES: tuple[_Family, ...] = (
    _Headers("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n", ("<|im_start|>",)),
    _Headers("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "",
             ("<|start_header_id|>", "<|end_header_id|>")),
    _Mistral("mistral", system_first=False),
    _Mistral("mistral-system-first", system_first=True),
)
FAMILIES = tuple(f.name for f in _FAMILIES)


def ollama_template(render: Render, *, bos_token: str | None = None) -> OllamaTemplate:
    """The Ollama template equivalent to `render` (a chat template), found by rendering probe conversations.

    `bos_token`: the BOS token llama.cpp adds itself when it tokenizes (the GGUF's add_bos_token); a rendering that
    starts with it is matched without it, so the prompt does not get two. It is kept when the rendering only matches
    with it (SmolLM2's BOS is ChatML's `<|im_start|>`).
    """
    rendered = []
    for probe in _PROBES:
        try:
            rendered.append(render([dict(m) for m in probe], True))
        except Exception as e:  # a Jinja raise_exception: e.g. the template allows no system message
            raise ExportError(f"The chat template cannot render {_describe(probe)} ({e}), so it cannot be written "
                              f"as an Ollama template. {_WHAT_TO_DO}") from e
    views = [rendered]
    if bos_token and all(text.startswith(bos_token) for text in rendered):
        views.append([text[len(bos_token):] for text in rendered])
    for family in _FAMILIES:
        for view in views:
            slots = family.slots(view)
            if slots is not None and all(text == family.render(*_collate(list(probe)), slots)
                                         for probe, text in zip(_PROBES, view, strict=True)):
                return OllamaTemplate(family.name, family.go(slots), family.stop(slots), slots.default_system or None)
    sample = rendered[1]
    raise ExportError(f"The chat template matches none of the chat formats peftkit writes as Ollama templates "
                      f"({', '.join(FAMILIES)}). It renders {_describe(_PROBES[1])} as:\n  {sample[:300]!r}\n"
                      f"{_WHAT_TO_DO}")


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
        raise ExportError(f"{what[0].upper()}{what[1:]} {value!r} cannot be written in a Modelfile: it must be non-empty, "
                          "on one line and without double quotes.")
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
    from ..config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)


def ollama_create_command(modelfile: str | Path, name: str) -> str:
    """The shell command that creates the Ollama model `name` from `modelfile`."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(Path(modelfile).resolve()))}"
