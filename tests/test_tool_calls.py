"""Tool calls end to end: each template reads back the calls it writes, the engine returns them parsed (a stand-in
model writing each family's call, and a tiny model trained with `peftkit train` on glaive-layout data until it calls
the tool), `peftkit chat --tools` prints them, and the API returns OpenAI `tool_calls` that the `openai` client's
types validate, streamed or not."""

from __future__ import annotations

import builtins
import copy
import json
import re
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_api import BASE, Server, client
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)
from test_templates_families import GLM4_JINJA, LLAMA4_JINJA, fixture, ministral_jinja, tokenizer

from peftkit.cli import main
from peftkit.data import TEMPLATES, get_template
from peftkit.data.templates import TOOL_STYLES, ChatTemplate
from peftkit.models import load_model_and_tokenizer, load_tokenizer
from peftkit.serve import ChatEngine, GenerationParams
from peftkit.serve.api import ApiError, _tools

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]  # OpenAI's shape; LLaMA-Factory's data lists WEATHER bare
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def written_answer(name: str, calls: list[dict]) -> str:
    """What a model writes for `calls` under template `name`: the rendered call turn after the generation prompt,
    through its end token."""
    tok, template = tokenizer(name), get_template(name, tokenizer(name))
    call = {"role": "function_call", "content": json.dumps(calls[0] if len(calls) == 1 else calls)}
    tools = json.dumps(TOOLS)
    prompt = template.render(ASK, tok, tools=tools, add_generation_prompt=True)
    whole = template.render([*ASK, call], tok, tools=tools)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


def cut_at_stop(template, tok, text: str) -> str:
    """The answer as the engine keeps it: up to the first stop token."""
    stops = [s for s in tok.convert_ids_to_tokens(template.stop_token_ids(tok)) if s in text]
    return min((text[:text.index(s)] for s in stops), key=len, default=text)


# --- parsing: every style reads back what it writes ---

@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_reads_back_the_calls_it_writes(name) -> None:
    template, tok = get_template(name, tokenizer(name)), tokenizer(name)
    several = [[PARIS]] if template.tool_style == "glm4" else [[PARIS], [PARIS, OSLO]]  # GLM-4: one call a turn
    for calls in several:
        content, parsed = template.parse_tool_calls(cut_at_stop(template, tok, written_answer(name, calls)))
        assert parsed == calls
        assert re.fullmatch(r"(<think>)?\s*(</think>)?", content)  # reasoning templates' (empty) think block


def test_every_tool_style_is_reached_by_a_template() -> None:
    assert {t.tool_style for t in TEMPLATES.values()} == set(TOOL_STYLES)


OWN_TEMPLATES = {"qwen2.5": fixture("qwen2.5-instruct"), "qwen3": fixture("qwen3-8b"),
                 "llama3.1": fixture("meta-llama-3.1-8b-instruct"), "llama4": LLAMA4_JINJA,
                 "mistral": fixture("mistral-7b-instruct-v0.3"), "ministral": ministral_jinja(), "glm4": GLM4_JINJA,
                 "llama3": fixture("meta-llama-3-8b-instruct")}


@pytest.mark.parametrize("family, style", [("qwen2.5", "qwen"), ("qwen3", "qwen"), ("llama3.1", "llama3"),
                                           ("llama4", "llama3"), ("mistral", "mistral"), ("ministral", "mistral"),
                                           ("glm4", "glm4"),
                                           ("llama3", "qwen")])  # no tools of its own: described, and read, as Qwen's
def test_a_tokenizers_own_template_reads_calls_in_its_familys_format(family, style) -> None:
    assert ChatTemplate(OWN_TEMPLATES[family], ()).tool_format is TOOL_STYLES[style]


@pytest.mark.parametrize("family, tokens", [("qwen2.5", "qwen"), ("llama3.1", "llama3")])
def test_a_tokenizers_own_template_reads_back_the_calls_it_renders(family, tokens) -> None:
    tok, template = tokenizer(tokens), ChatTemplate(OWN_TEMPLATES[family], ())
    call = {"role": "function_call", "content": json.dumps(PARIS)}
    prompt = template.render(ASK, tok, tools=json.dumps(TOOLS), add_generation_prompt=True)
    answer = template.render([*ASK, call], tok, tools=json.dumps(TOOLS))[len(prompt):]
    assert template.parse_tool_calls(cut_at_stop(template, tok, answer)) == ("", [PARIS])


MALFORMED = [
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'),  # bad JSON
    ("qwen", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),  # no name
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>'),  # arguments not an object
    ("qwen", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": \n</tool_call>'),
    ("qwen", "<tool_call>"),
    ("qwen", "I would call get_weather."),
    ("llama3", '{"name": "Ada", "born": 1815}'),  # a JSON answer with a name field is not a call
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Par'),
    ("llama3", "Hello"),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}'),
    ("mistral", "[TOOL_CALLS]"),
    ("glm4", "Paris\nis lovely in spring"),
    ("glm4", 'get_weather\n["Paris"]'),
    ("glm4", 'two words\n{"city": "Paris"}'),
]


@pytest.mark.parametrize("style, text", MALFORMED)
def test_malformed_calls_stay_text(style, text) -> None:
    assert TOOL_STYLES[style].parse_calls(text) == (text, [])


@pytest.mark.parametrize("style", list(TOOL_STYLES))
def test_a_call_cut_short_anywhere_never_raises(style) -> None:
    """A reply cut at max_tokens: every prefix of a written call reads as text or as the whole call."""
    written = TOOL_STYLES[style].call([PARIS], ["abcdefghi"])
    for k in range(len(written) + 1):
        content, calls = TOOL_STYLES[style].parse_calls(written[:k])
        assert (content, calls) == (written[:k], []) or calls == [PARIS]


# --- the engine, with a stand-in model that writes a fixed reply ---

class Scripted(torch.nn.Module):
    """A stand-in model: whatever the prompt, it writes `reply` (token ids), so tests fix the model's output."""

    def __init__(self, reply: list[int]) -> None:
        super().__init__()
        self.reply = reply
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads its device off a parameter

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, streamer=None, **_) -> torch.Tensor:
        new = torch.tensor([self.reply[:max_new_tokens]] * input_ids.shape[0], dtype=torch.long)
        if streamer is not None:
            streamer.put(input_ids)
            streamer.put(new[0])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)


def scripted_engine(name: str, reply: str) -> ChatEngine:
    tok = tokenizer(name)
    return ChatEngine(Scripted(tok.encode(reply, add_special_tokens=False)), tok, name)


@pytest.mark.parametrize("name", ["qwen", "qwen3_nothink", "llama3", "llama4", "mistral", "ministral", "glm4"])
def test_the_engine_returns_the_call_each_family_writes(name) -> None:
    """The family's call and end token, then text the stop token must cut. Call markers that are special tokens
    (Mistral's [TOOL_CALLS]) survive decoding; an end token such as GLM-4's <|observation|> ends the call."""
    engine = scripted_engine(name, written_answer(name, [PARIS]) + "Then more text.")
    done = engine.complete(ASK, GenerationParams(max_new_tokens=200), tools=TOOLS)
    assert (done.text, done.tool_calls, done.finish_reason) == ("", [PARIS], "tool_calls")
    plain = engine.complete(ASK, GenerationParams(max_new_tokens=200))  # no tools offered: the text, as written
    assert plain.tool_calls == [] and plain.finish_reason == "stop"


def test_the_models_own_end_tokens_end_a_call_under_its_own_template() -> None:
    """glm-4-9b-chat's template names no end token but eos; its generation_config adds <|observation|>, which is
    what ends a call."""
    tok = copy.deepcopy(tokenizer("glm4"))
    tok.chat_template = GLM4_JINJA
    model = Scripted(tok.encode('get_weather\n{"city": "Paris"}<|observation|>\n{"temp_c": 21}<|assistant|>\nIt is',
                                add_special_tokens=False))
    model.generation_config = SimpleNamespace(
        eos_token_id=tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"]))
    done = ChatEngine(model, tok).complete(ASK, tools=TOOLS)
    assert (done.text, done.tool_calls, done.finish_reason) == ("", [PARIS], "tool_calls")


def test_openai_messages_render_as_the_training_conversation() -> None:
    """An assistant message with tool_calls is a function_call turn; the tool results after it one tool turn."""
    engine = scripted_engine("qwen", "")
    openai_style = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 8}'}]
    training = [*ASK, {"role": "function_call", "content": json.dumps([PARIS, OSLO])},
                {"role": "tool", "content": '{"temp_c": 21}\n{"temp_c": 8}'}]
    text = engine.template.render(training, engine.tokenizer, tools=json.dumps([WEATHER]), add_generation_prompt=True)
    assert engine.prompt_ids(openai_style, TOOLS) == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert TOOL_STYLES["qwen"].call([PARIS, OSLO], []) + "<|im_end|>" in text


# --- a tiny model trained to call a tool ---

@pytest.fixture(scope="module")
def trained(small_model_dir, tmp_path_factory):  # noqa: F811
    """smollm2's tokenizer on the random 2-layer model, fully fine-tuned by `peftkit train` on LLaMA-Factory's
    glaive_toolcall layout (function_call / observation turns, a tools column), template qwen: a weather question
    answered by a call, then the result in words, and a greeting answered without a call."""
    folder = tmp_path_factory.mktemp("tool_run")
    rows = [{"conversations": [{"from": "human", "value": ASK[0]["content"]},
                               {"from": "function_call", "value": json.dumps(PARIS)},
                               {"from": "observation", "value": '{"temp_c": 21}'},
                               {"from": "gpt", "value": "It is 21 C in Paris."}], "tools": json.dumps([WEATHER])},
            {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}],
             "tools": json.dumps([WEATHER])}]
    (folder / "weather.json").write_text(json.dumps(rows))
    columns = {"messages": "conversations", "tools": "tools"}
    (folder / "dataset_info.json").write_text(json.dumps({"weather": {
        "file_name": "weather.json", "formatting": "sharegpt", "columns": columns}}))
    out = folder / "run"
    assert main(["train", "/dev/null", f"model_name_or_path={small_model_dir}", "dataset=weather",
                 f"dataset_dir={folder}", "template=qwen", "finetuning_type=full", "learning_rate=1e-2",
                 "lr_scheduler_type=constant", "max_steps=100", "per_device_train_batch_size=2", "cutoff_len=512",
                 f"output_dir={out}"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.05 < 5 < losses[0]
    return out, ChatEngine(*load_model_and_tokenizer(str(out)), "qwen")


def test_a_model_trained_on_tool_calls_calls_the_tool(trained) -> None:
    _, engine = trained
    params = GenerationParams(max_new_tokens=60)
    done = engine.complete(ASK, params, tools=TOOLS)
    assert (done.text, done.tool_calls, done.finish_reason) == ("", [PARIS], "tool_calls")
    result = [*ASK, {"role": "function_call", "content": json.dumps(PARIS)},
              {"role": "tool", "content": '{"temp_c": 21}'}]
    after = engine.complete(result, params, tools=TOOLS)
    assert (after.text, after.tool_calls, after.finish_reason) == ("It is 21 C in Paris.", [], "stop")
    greeting = engine.complete([{"role": "user", "content": "Hi!"}], params, tools=TOOLS)
    assert (greeting.text, greeting.tool_calls) == ("Hello.", [])


def test_chat_prints_the_call_and_takes_the_tools_result(trained, tmp_path, capsys, monkeypatch) -> None:
    out, _ = trained
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))  # LLaMA-Factory's bare functions
    chat = ["chat", "--model", str(out), "--template", "qwen", "--tools", str(tools)]
    assert main([*chat, "--once", ASK[0]["content"]]) == 0
    assert capsys.readouterr().out == 'tool call: get_weather({"city": "Paris"})\n'
    typed = iter([ASK[0]["content"], '/tool {"temp_c": 21}', "/exit"])
    monkeypatch.setattr(builtins, "input", lambda _="": next(typed))
    assert main(chat) == 0
    assert capsys.readouterr().out.splitlines() == [
        'Assistant: tool call: get_weather({"city": "Paris"})', "Assistant: It is 21 C in Paris."]


@pytest.mark.parametrize("content, message", [
    (None, "Cannot read --tools"), ("{not json", "is not valid JSON"),
    ('[{"description": "no name"}]', "each with a name")])
def test_chat_refuses_a_bad_tools_file_before_loading_the_model(content, message, tmp_path, capsys) -> None:
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    assert main(["chat", "--model", "no-such-model", "--tools", str(path), "--once", "hi"]) == 1
    assert message in capsys.readouterr().err


# --- the API ---

def sse(server: Server, body: dict) -> list[ChatCompletionChunk]:
    """A streamed reply's chunks, each validated against the openai client's type."""
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(line) for line in lines[:-1]]


def assembled(chunks: list[ChatCompletionChunk]) -> tuple[str, list[dict], str | None]:
    """(content, calls as {"id", "name", "arguments"}, finish_reason) from the deltas, as clients assemble them."""
    content, calls = "", {}
    for c in chunks:
        delta = c.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            whole = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            whole["id"] += call.id or ""
            whole["name"] += call.function.name or ""
            whole["arguments"] += call.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], chunks[-1].choices[0].finish_reason


@pytest.fixture(scope="module")
def served(trained):
    server = Server(trained[1])
    yield trained[1], server
    server.stop()


def test_the_api_returns_openai_tool_calls(served) -> None:
    engine, server = served
    reply = client(server).chat.completions.create(model=BASE, messages=ASK, tools=TOOLS, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": ASK, "tools": TOOLS},
                     timeout=60).json()
    assert ChatCompletion.model_validate(raw).choices[0].message.tool_calls[0].function.name == "get_weather"
    # the call sent back as the client returned it, with the tool's result: the model answers in words
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    after = client(server).chat.completions.create(model=BASE, messages=history, tools=TOOLS, max_tokens=60)
    assert (after.choices[0].message.content, after.choices[0].message.tool_calls) == ("It is 21 C in Paris.", None)
    assert after.choices[0].finish_reason == "stop"
    # tool_choice "none" shows the model no tools; a named function is offered alone (here: all there is)
    bare = client(server).chat.completions.create(model=BASE, messages=ASK, tools=TOOLS, tool_choice="none")
    assert bare.choices[0].message.tool_calls is None and bare.usage.prompt_tokens == len(engine.prompt_ids(ASK))
    named = client(server).chat.completions.create(
        model=BASE, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "tools"  # bare functions are not OpenAI's shape


def test_the_api_streams_tool_calls(served) -> None:
    _, server = served
    content, calls, finish = assembled(sse(server, {"model": BASE, "messages": ASK, "tools": TOOLS}))
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")
    greeting = [{"role": "user", "content": "Hi!"}]
    assert assembled(sse(server, {"model": BASE, "messages": greeting, "tools": TOOLS})) == ("Hello.", [], "stop")
    # the official client's stream too
    content, calls, finish = assembled(list(client(server).chat.completions.create(
        model=BASE, messages=ASK, tools=TOOLS, stream=True)))
    assert (content, [(c["name"], json.loads(c["arguments"])) for c in calls], finish) == (
        "", [("get_weather", {"city": "Paris"})], "tool_calls")


def test_text_beside_calls_and_parallel_calls(small_model_dir) -> None:  # noqa: F811
    """A stand-in model that says something, then calls twice: content beside two tool_calls with their own ids."""
    tok = load_tokenizer(str(small_model_dir))
    written = TOOL_STYLES["qwen"].call([PARIS, OSLO], [])
    server = Server(ChatEngine(Scripted(tok.encode(f"Let me look.\n{written}", add_special_tokens=False) +
                                        [tok.convert_tokens_to_ids("<|im_end|>")]), tok, "qwen"))
    try:
        reply = client(server).chat.completions.create(model=BASE, messages=ASK, tools=TOOLS)
        message = reply.choices[0].message
        assert message.content == "Let me look." and reply.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == ["Paris", "Oslo"]
        assert len({c.id for c in message.tool_calls}) == 2
        content, calls, finish = assembled(sse(server, {"model": BASE, "messages": ASK, "tools": TOOLS}))
        assert (content, finish) == ("Let me look.", "tool_calls")
        assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Oslo"]
    finally:
        server.stop()


@pytest.mark.parametrize("body, param", [
    ({"tools": {"type": "function", "function": WEATHER}}, "tools"),  # not a list
    ({"tools": [WEATHER]}, "tools"),  # a bare function
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {**WEATHER, "parameters": "city"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
])
def test_bad_tools_get_422(body, param) -> None:
    with pytest.raises(ApiError) as e:
        _tools(body)
    assert e.value.status == 422 and e.value.param == param


def test_tool_choice_narrows_what_is_offered() -> None:
    clock = {"type": "function", "function": {"name": "get_time"}}
    assert _tools({"tools": [*TOOLS, clock], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}) \
        == [clock]
    assert _tools({"tools": TOOLS, "tool_choice": "required"}) == _tools({"tools": TOOLS}) == TOOLS
    assert _tools({"tools": TOOLS, "tool_choice": "none"}) is None and _tools({"tools": []}) is None


def test_messages_the_template_cannot_write_get_422() -> None:
    """GLM-4 writes one call a turn: two parallel calls sent back cannot be formatted for it."""
    server = Server(scripted_engine("glm4", "Hello."))
    try:
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            for i in range(2)]}]
        with pytest.raises(openai.UnprocessableEntityError, match="one function per turn"):
            client(server).chat.completions.create(model=BASE, messages=history, tools=TOOLS)
    finally:
        server.stop()


def test_a_call_sent_back_with_arguments_that_are_not_json_gets_422(served) -> None:
    _, server = served
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]
    with pytest.raises(openai.UnprocessableEntityError, match="not a JSON object"):
        client(server).chat.completions.create(model=BASE, messages=history, tools=TOOLS)


def test_mistrals_own_template_trains_tool_conversations_with_call_ids() -> None:
    """With `template` unset, Mistral v0.3's jinja requires an id on every call and a tool_call_id on each result:
    peftkit gives them the ids its built-in `mistral` template writes, so such rows train instead of being skipped."""
    from peftkit.data import IGNORE_INDEX, encode
    from peftkit.data.formats import Conversation
    from peftkit.data.templates import _call_id

    tok = tokenizer("mistral")
    tok.chat_template = fixture("mistral-7b-instruct-v0.3")
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "function_call", "content": json.dumps(call)},
                {"role": "tool", "content": '{"temp": 21}'},
                {"role": "assistant", "content": "It is 21 C."}]
    tools = json.dumps([{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}])
    chat = get_template(None, tok)
    text, spans = chat.answer_spans(messages, tok, tools=tools)
    call_id = _call_id(0, call)
    assert f'"id": "{call_id}"' in text and f'"call_id": "{call_id}"' in text
    assert [text[s:e] for s, e in spans][1].strip() == "It is 21 C.</s>"
    example, _ = encode(Conversation(messages=messages, tools=tools), chat, tok, cutoff_len=4096)
    assert any(label != IGNORE_INDEX for label in example["labels"])
