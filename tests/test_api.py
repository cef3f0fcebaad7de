"""The OpenAI-compatible API: a real server on a free loopback port, the official `openai` client, raw HTTP for
errors."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit import LoraConfig, TunedModel
from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams
from peftkit.serve.api import build_app

BASE = "base-model"
KEY = "sk-test"


def engine_with_adapters(model_dir, tmp_path) -> ChatEngine:
    """The base plus two LoRA adapters with large random weights, so the three answer differently."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    tuned = TunedModel(model)
    for i, name in enumerate(("sql", "chat")):
        torch.manual_seed(i)
        donor = TunedModel(load_model_and_tokenizer(str(model_dir))[0], LoraConfig(r=4, target_modules="all-linear"))
        with torch.no_grad():
            for t in donor.method.state_dict().values():
                t.add_(torch.randn_like(t) * 2.0)
        donor.save(tmp_path / name)
        tuned.load_adapter(tmp_path / name, name)
    return ChatEngine(tuned, tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, engine: ChatEngine, api_key: str | None = None) -> None:
        self.port = free_port()
        self.app = build_app(engine, BASE, api_key)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(small_model_dir, tmp_path_factory):  # noqa: F811
    engine = engine_with_adapters(small_model_dir, tmp_path_factory.mktemp("adapters"))
    server = Server(engine)
    yield engine, server
    server.stop()


def client(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


QUESTION = [{"role": "user", "content": "Write one short sentence about the sea."}]


def lone(engine: ChatEngine, model: str, messages=QUESTION, max_tokens: int = 12) -> str:
    adapter = None if model == BASE else model
    return engine.generate([engine.prompt_ids(messages)], GenerationParams(max_new_tokens=max_tokens), adapter)[0].text


def test_models_lists_the_base_and_every_adapter(served) -> None:
    _, server = served
    assert [m.id for m in client(server).models.list().data] == [BASE, "sql", "chat"]


def test_chat_completion_shape_usage_and_adapter_choice(served) -> None:
    engine, server = served
    answers = {}
    for model in (BASE, "sql", "chat"):
        reply = client(server).chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
        assert reply.object == "chat.completion" and reply.model == model and reply.id.startswith("chatcmpl-")
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens == len(engine.prompt_ids(QUESTION))
        assert 0 < reply.usage.completion_tokens <= 12
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert choice.message.content == lone(engine, model)
        answers[model] = choice.message.content
    assert len(set(answers.values())) == 3  # the three models really differ


def test_streaming_gives_the_same_text(served) -> None:
    engine, server = served
    stream = client(server).chat.completions.create(model="sql", messages=QUESTION, max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == lone(engine, "sql")


def test_stop_strings_and_seeded_sampling(served) -> None:
    engine, server = served
    full = lone(engine, "chat", max_tokens=16)
    stop = full.split()[1] if len(full.split()) > 1 else full[:2]
    reply = client(server).chat.completions.create(model="chat", messages=QUESTION, max_tokens=16, stop=[stop])
    assert stop not in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    sample = lambda: client(server).chat.completions.create(  # noqa: E731
        model="chat", messages=QUESTION, max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert sample() == sample()


def test_16_parallel_requests_for_three_models_never_mix(served) -> None:
    engine, server = served
    models = [(BASE, "sql", "chat")[i % 3] for i in range(16)]
    questions = [[{"role": "user", "content": f"Count to {i % 4 + 2}."}] for i in range(16)]
    expected = [lone(engine, m, q, max_tokens=10) for m, q in zip(models, questions)]
    scheduler = server.app.state.scheduler
    before = scheduler.batches_run

    def ask(i: int) -> str:
        reply = client(server).chat.completions.create(model=models[i], messages=questions[i], max_tokens=10)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == expected
    assert scheduler.batches_run - before < 16  # same-adapter requests were batched


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served) -> None:
    engine, server = served
    url = f"{server.url}/v1/chat/completions"
    cases = [
        (b"{not json", 400, None),
        (b'{"model": "sql"}', 422, None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 422, None),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        (b'{"model": "sql", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 422, None),
        (b'{"model": "sql", "messages": [{"role": "wizard", "content": "hi"}]}', 422, None),
        (b'{"model": "sql", "messages": [{"role": "user", "content": "hi"}], "n": 3}', 422, None),
        (b'{"model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 422, None),
    ]
    too_long = "word " * 600  # > max_position_embeddings (512) tokens
    body = {"model": "sql", "messages": [{"role": "user", "content": too_long}]}
    for raw, status, code in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == code
    r = httpx.post(url, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=QUESTION)
    assert client(server).chat.completions.create(model="sql", messages=QUESTION, max_tokens=4).choices


def test_api_key_is_required_on_every_endpoint(small_model_dir, tmp_path) -> None:  # noqa: F811
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    server = Server(ChatEngine(model, tokenizer), api_key=KEY)
    try:
        for key in (None, "wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = httpx.request(method, server.url + path, headers=headers, json={})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert [m.id for m in client(server, KEY).models.list().data] == [BASE]
        assert client(server, KEY).chat.completions.create(model=BASE, messages=QUESTION, max_tokens=3).choices
    finally:
        server.stop()


def test_the_cli_binds_to_loopback_by_default() -> None:
    from peftkit.cli import build_parser

    args = build_parser().parse_args(["api", "--model", "m", "--adapter", "a=dir"])
    assert args.host == "127.0.0.1" and args.api_key is None


def test_adapters_of_different_methods_share_the_base(small_model_dir, tmp_path) -> None:  # noqa: F811
    """LoRA, IA3 (on some of LoRA's modules) and prefix tuning served by one engine over one copy of the base weights:
    each request gets exactly what a model carrying only that adapter gives, and the base stays the base."""
    from peftkit import Ia3Config, PrefixTuningConfig

    configs = {"lora": LoraConfig(r=4, target_modules="all-linear"), "ia3": Ia3Config(),
               "prefix": PrefixTuningConfig(num_virtual_tokens=4)}
    for name, config in configs.items():
        torch.manual_seed(1)
        donor = TunedModel(load_model_and_tokenizer(str(small_model_dir))[0], config)
        with torch.no_grad():
            for t in donor.method.state_dict().values():
                t.add_(torch.randn_like(t) * 0.5)
        donor.save(tmp_path / name)
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    engine = ChatEngine(model, tokenizer)
    for name in configs:
        engine.load_adapter(tmp_path / name, name)
    assert engine.adapters == ["lora", "prefix", "ia3"] and len(engine.trees) == 2  # IA3 needed a second tree
    weights = [t.model.model.layers[0].mlp.down_proj.weight for t in engine.trees]
    assert weights[0].data_ptr() == weights[1].data_ptr()  # one copy of the base weights
    prompt = [engine.prompt_ids(QUESTION)]
    params = GenerationParams(max_new_tokens=10)
    for name in (*configs, None):
        alone = load_model_and_tokenizer(str(small_model_dir))[0]
        if name is not None:
            alone = TunedModel.load(alone, tmp_path / name)
        expected = ChatEngine(alone, tokenizer).generate(prompt, params, "default" if name else None)[0].text
        assert engine.generate(prompt, params, name)[0].text == expected, name


def test_a_collision_leaves_the_model_as_it_was(small_model_dir, tmp_path) -> None:  # noqa: F811
    """IA3 cannot go on a TunedModel whose modules carry LoRA: the failed attach leaves no half-attached layers."""
    from peftkit import Ia3Config
    from peftkit.errors import AdapterLoadError
    from peftkit.methods.base import AdapterLayer

    TunedModel(load_model_and_tokenizer(str(small_model_dir))[0], Ia3Config()).save(tmp_path / "ia3")
    # LoRA on v_proj only: IA3 wraps layer 0's k_proj first, then meets LoRA on v_proj and must undo the k_proj
    tuned = TunedModel(load_model_and_tokenizer(str(small_model_dir))[0], LoraConfig(r=4, target_modules=["v_proj"]))
    before = [(p, type(m)) for p, m in tuned.named_modules()]
    with pytest.raises(AdapterLoadError, match="already carries a LoraLinear"):
        tuned.load_adapter(tmp_path / "ia3", "ia3")
    assert [(p, type(m)) for p, m in tuned.named_modules()] == before
    assert not any("ia3" in m.adapter_names() for m in tuned.modules() if isinstance(m, AdapterLayer))


def test_top_p_0_is_greedy_whatever_the_seed(served) -> None:
    """top_p 0 used to be read as 1 (unset): five seeds gave five texts. Now it keeps only the most likely token."""
    engine, server = served
    answers = {client(server).chat.completions.create(model=BASE, messages=QUESTION, max_tokens=12, temperature=1.0,
                                                      top_p=0, seed=seed).choices[0].message.content
               for seed in range(5)}
    assert answers == {lone(engine, BASE)}


def test_a_client_that_disconnects_stops_its_generation(small_model_dir) -> None:  # noqa: F811
    """Closing a stream mid-answer frees the engine within a token or two, instead of after all of max_tokens."""
    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    forwards = []

    def slow_forward(*_) -> None:  # 20 ms a token: the 400 tokens asked for would hold the engine 8 s or more
        forwards.append(1)
        time.sleep(0.02)

    model.register_forward_pre_hook(slow_forward)
    engine = ChatEngine(model, tokenizer)
    server = Server(engine)
    try:
        body = {"model": BASE, "messages": QUESTION, "max_tokens": 400, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # held: dropping the iterator would close the connection already
            assert '"role": "assistant"' in next(lines)
            deadline = time.time() + 20
            while len(forwards) < 5 and time.time() < deadline:
                time.sleep(0.01)
            assert len(forwards) >= 5  # generating
        # the connection is closed: the generation thread must let go of the engine well before 400 tokens
        assert engine.lock.acquire(timeout=4)
        engine.lock.release()
        stopped = len(forwards)
        time.sleep(0.2)
        assert len(forwards) == stopped < 100
        assert client(server).chat.completions.create(model=BASE, messages=QUESTION, max_tokens=3).choices
    finally:
        server.stop()


@pytest.mark.parametrize("host, key, warns", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("my-host", "", True),
    ("0.0.0.0", KEY, False), ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("localhost", None, False),
    ("::1", None, False), ("[::1]", None, False),
])
def test_binding_beyond_loopback_without_a_key_warns(host, key, warns, capsys) -> None:
    from peftkit.serve.exposure import warn_if_exposed

    message = warn_if_exposed(host, key, "the API")
    assert (message is not None) == warns
    if warns:
        assert host in message and "anyone who can reach" in message and "--api-key" in message
        assert capsys.readouterr().err.strip() == message


def test_serve_warns_before_it_listens_on_all_interfaces(served, monkeypatch, capsys) -> None:
    from peftkit.serve.api import serve

    engine, _ = served
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(engine, BASE, host="0.0.0.0", port=1)
    assert "0.0.0.0 without an API key" in capsys.readouterr().err
    serve(engine, BASE, host="0.0.0.0", port=1, api_key=KEY)
    serve(engine, BASE, host="127.0.0.1", port=1)
    assert capsys.readouterr().err == ""


def test_top_k_and_repetition_penalty_as_vllm_extra_fields(served) -> None:
    """Not OpenAI's fields: the `openai` client sends them in extra_body, as for vLLM; they reach generation."""
    engine, server = served

    def ask(**extra) -> str:
        return client(server).chat.completions.create(model=BASE, messages=QUESTION, max_tokens=12,
                                                      extra_body=extra).choices[0].message.content

    assert {ask(temperature=1.0, top_k=1, seed=seed) for seed in range(4)} == {lone(engine, BASE)}
    assert len({ask(temperature=1.0, top_k=-1, seed=seed) for seed in range(4)}) > 1  # -1: no cut, as vLLM reads it
    # below 1 the "penalty" favours tokens already seen (the prompt's too), so it surely changes a greedy answer
    penalised = engine.generate([engine.prompt_ids(QUESTION)], GenerationParams(max_new_tokens=12,
                                                                                repetition_penalty=0.1))[0].text
    assert penalised != lone(engine, BASE)
    assert ask(repetition_penalty=0.1) == penalised  # the API applies it


@pytest.mark.parametrize("field, value", [("top_k", 1.5), ("top_k", -2), ("top_k", "5"), ("repetition_penalty", 0),
                                          ("repetition_penalty", -1.0), ("repetition_penalty", "high")])
def test_bad_top_k_and_repetition_penalty_get_422(field, value) -> None:
    from peftkit.serve.api import ApiError, _request_params

    with pytest.raises(ApiError) as e:
        _request_params({field: value})
    assert e.value.status == 422 and e.value.param == field


def test_request_fields_map_onto_generation_params() -> None:
    from peftkit.serve.api import _request_params

    params = _request_params({"max_tokens": 9, "temperature": 0.5, "top_p": 0.8, "top_k": 40, "repetition_penalty": 1.2,
                              "seed": 3, "stop": "END"})
    assert params == GenerationParams(max_new_tokens=9, temperature=0.5, top_p=0.8, top_k=40, repetition_penalty=1.2,
                                      seed=3, stop=("END",), do_sample=True)
    assert _request_params({"top_k": -1}).top_k == 0 and _request_params({"top_k": 0}).top_k == 0
