"""An OpenAI-compatible API: one base model in memory, any number of adapters, picked per request by `model`.

One worker thread generates everything, with continuous batching: requests for the same adapter share a decode
batch, a request that arrives while it runs joins it at the next step (its prompt prefilled, past any part kept from
earlier prompts: prefix.py; its cache rows added),
and a request that finishes leaves it at once. Each row keeps its own sampling settings, stop strings and seed, so
any requests can share a batch, and streaming requests take part like the others. Batches of different adapters
take turns, a step each. The engine's lock makes adapter switching and generation atomic, so requests never mix
adapters. Models the decode loop does not cover generate as before: same-adapter, same-settings requests in one
static batch, streams alone.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, AsyncIterator, Iterator

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import TextIteratorStreamer

from .. import native
from ..data.formats import RowError
from .chat import ChatEngine, Completion, GenerationParams
from .decode import Decoder, Row
from .exposure import warn_if_exposed

MAX_BATCH = 16


@dataclasses.dataclass(eq=False)
class _Job:
    prompt: list[int]
    params: GenerationParams
    adapter: str | None
    future: Future
    row: Row | None = None  # None: the decode loop does not cover this model or these settings
    streamer: TextIteratorStreamer | None = None

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        if self.streamer is not None:
            self.streamer.end()


class BatchScheduler:
    """One queue, one worker: continuous batching per adapter (see the module's docstring).

    `batches_run` counts decode batches started (a batch lasts as long as requests keep it going), `steps_run` the
    decode steps of all of them.
    """

    def __init__(self, engine: ChatEngine, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.batches_run = 0
        self.steps_run = 0
        self.lanes: dict[str | None, Decoder] = {}  # adapter -> its running batch
        self.waiting: dict[str | None, list[_Job]] = {}  # adapter -> jobs not yet in its batch
        self.running: dict[Row, _Job] = {}
        native.release_openmp_threads()  # the caller's idle OpenMP workers would slow every region of the batcher's
        threading.Thread(target=self._work, daemon=True, name="peftkit-batcher").start()

    # --- requests ---
    def _job(self, prompt: list[int], params: GenerationParams, adapter: str | None,
             cancel: threading.Event | None, stream: bool = False) -> _Job:
        job = _Job(prompt, params, adapter, Future())
        rows = self.engine.rows([prompt], params, self.engine.tree(adapter), cancel)
        if rows is None:
            return job
        job.row = rows[0]
        if stream:
            streamer = job.streamer = TextIteratorStreamer(self.engine.tokenizer, skip_special_tokens=True)
            job.row.on_token = lambda token: streamer.put(torch.tensor([token]))

        def done(row: Row) -> None:
            self.running.pop(row, None)
            try:
                job.future.set_result(self.engine.completion(prompt, row.tokens, params))
            except Exception as e:  # noqa: BLE001  (the request fails, the batch goes on)
                job.future.set_exception(e)
            if job.streamer is not None:
                job.streamer.end()

        job.row.on_done = done
        return job

    def submit(self, prompt: list[int], params: GenerationParams, adapter: str | None,
               cancel: threading.Event | None = None) -> Completion:
        """The completion of `prompt` (blocks until it is done)."""
        job = self._job(prompt, params, adapter, cancel)
        self.jobs.put(job)
        return job.future.result()

    def stream(self, prompt: list[int], params: GenerationParams, adapter: str | None,
               cancel: threading.Event) -> tuple[Iterator[str], Future] | None:
        """Text pieces of the completion as they are generated, and a future of the whole completion; None where
        the decode loop does not cover the model or the settings (stream with `ChatEngine.stream` then). Setting
        `cancel` ends the row at its next step."""
        job = self._job(prompt, params, adapter, cancel, stream=True)
        if job.row is None:
            return None
        self.jobs.put(job)
        return iter(job.streamer), job.future

    # --- the worker ---
    def _work(self) -> None:
        turn = 0
        while True:
            self._collect(block=not self.waiting and not any(len(lane) for lane in self.lanes.values()))
            for adapter in list(self.waiting):
                self._join(adapter)
            running = [a for a, lane in self.lanes.items() if len(lane)]
            if running:
                turn += 1
                self._step(running[turn % len(running)])

    def _collect(self, block: bool) -> None:
        """Move queued jobs to `waiting` (run those the decode loop does not cover); with `block`, wait for one (the
        worker's OpenMP threads let go meanwhile, so that no idle pool slows another thread's regions)."""
        while True:
            try:
                if block and self.jobs.empty():
                    native.release_openmp_threads()
                job = self.jobs.get(block=block)
            except queue.Empty:
                return
            block = False
            if job.row is None:
                self._static(job)
            else:
                self.waiting.setdefault(job.adapter, []).append(job)

    def _join(self, adapter: str | None) -> None:
        """Prefill the waiting jobs of `adapter` that fit, and add them to its batch."""
        lane = self.lanes.get(adapter)
        room = self.max_batch - (len(lane) if lane is not None else 0)
        if room <= 0 or (lane is not None and not lane.can_join()):
            return
        jobs, rest = self.waiting[adapter][:room], self.waiting[adapter][room:]
        if rest:
            self.waiting[adapter] = rest
        else:
            del self.waiting[adapter]
        try:
            with self.engine.lock:
                model, context = self.engine.use(adapter)
                if lane is None or (not len(lane) and lane.model is not model):
                    lane = self.lanes[adapter] = self.engine.decoder(model)
                started = not len(lane)
                self.running.update((job.row, job) for job in jobs)
                with context:
                    lane.add([job.row for job in jobs])
            self.batches_run += started and len(lane) > 0
        except Exception as e:  # a failed prefill fails its requests, not the server
            for job in jobs:
                self.running.pop(job.row, None)
                job.fail(e)

    def _step(self, adapter: str | None) -> None:
        lane = self.lanes[adapter]
        try:
            with self.engine.lock:
                _, context = self.engine.use(adapter)
                with context:
                    lane.step()
            self.steps_run += 1
        except Exception as e:  # a failed step fails the batch's requests, not the server
            del self.lanes[adapter]
            for row in lane.rows:
                job = self.running.pop(row, None)
                if job is not None:
                    job.fail(e)

    def _static(self, first: _Job) -> None:
        """A job the decode loop does not cover: with every queued job of the same adapter and settings, one
        `ChatEngine.generate` batch, as before continuous batching."""
        batch, later = [first], []
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            same = (job.row is None and job.adapter == first.adapter and job.params == first.params
                    and first.params.seed is None)
            (batch if same else later).append(job)
        for job in later:  # back in the queue, in order, for the next round
            self.jobs.put(job)
        try:
            results = self.engine.generate([j.prompt for j in batch], first.params, first.adapter)
        except Exception as e:  # a failed batch fails its requests, not the server
            for job in batch:
                job.fail(e)
            return
        self.batches_run += 1
        for job, result in zip(batch, results):
            job.future.set_result(result)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _request_params(body: dict[str, Any]) -> GenerationParams:
    """OpenAI's fields -> GenerationParams, with 422 for values of the wrong type or range.

    `top_k` and `repetition_penalty` are not OpenAI's: they are the extra fields vLLM accepts (the `openai` client
    sends them through `extra_body`), with vLLM's meanings: top_k -1 (or 0) keeps every token.
    """
    def number(name: str, lo: float, hi: float, kind: type = float) -> Any:
        value = body.get(name)
        if value is None:
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (kind is int and not float(value).is_integer())):
            raise ApiError(422, f"'{name}' must be a number, got {value!r}.", "invalid_request_error", name)
        if not lo <= value <= hi:
            raise ApiError(422, f"'{name}' must be between {lo} and {hi}, got {value}.", "invalid_request_error", name)
        return kind(value)

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(422, "'stop' must be a string or a list of non-empty strings.", "invalid_request_error", "stop")
    max_tokens = number("max_completion_tokens", 1, 1 << 20, int)
    if max_tokens is None:
        max_tokens = number("max_tokens", 1, 1 << 20, int)
    temperature = number("temperature", 0, 2)
    top_k = number("top_k", -1, (1 << 31) - 1, int)
    repetition_penalty = number("repetition_penalty", 0, 1e6)
    if repetition_penalty == 0:
        raise ApiError(422, "'repetition_penalty' must be greater than 0 (1: no penalty), got 0.",
                       "invalid_request_error", "repetition_penalty")
    # top_p 0 keeps only the most likely token (greedy whatever the seed); temperature 0 or none is greedy
    return GenerationParams(max_new_tokens=512 if max_tokens is None else max_tokens, temperature=temperature,
                            top_p=number("top_p", 0, 1), top_k=None if top_k is None else max(top_k, 0),
                            repetition_penalty=repetition_penalty, stop=tuple(stop or ()),
                            seed=number("seed", -(1 << 63), (1 << 63) - 1, int),
                            do_sample=temperature is not None and temperature > 0)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as the engine takes them: {role, content}, and an assistant's `tool_calls` as
    [{"function": {"name", "arguments"}}]."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "'messages' is required: a non-empty list of {role, content}.", "invalid_request_error",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        if calls is not None and content is None:
            content = ""  # an assistant message that only calls tools
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") or \
                not isinstance(content, str):
            raise ApiError(422, f"messages[{i}] must have a role (system, user, assistant, tool) and text content.",
                           "invalid_request_error", "messages")
        out.append({"role": m["role"], "content": content, **({"tool_calls": _calls_sent(calls, i)} if calls else {})})
    return out


def _calls_sent(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` (as this API returned them), checked: the arguments must be JSON."""
    problem = f"messages[{i}].tool_calls must be a list of {{'type': 'function', 'function': {{'name', 'arguments'}}}}"
    if not isinstance(calls, list):
        raise ApiError(422, problem + ".", "invalid_request_error", "messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(422, problem + ".", "invalid_request_error", "messages")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(422, problem + f"; the arguments of '{function['name']}' are not a JSON object.",
                           "invalid_request_error", "messages")
        out.append({"function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The tools to offer the model: OpenAI's `tools`, narrowed by `tool_choice`; None for none.

    `tool_choice`: "none" offers none (the model answers in text); "auto" (the default) offers them all; a named
    function ({"type": "function", "function": {"name"}}) offers only that one. "required" is accepted, and so is
    the named choice's "must call": neither is enforced, since generation is not constrained to a call. A model
    fine-tuned to call tools calls them when offered.
    """
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    problem = ("'tools' must be a list of {'type': 'function', 'function': {'name', 'description', 'parameters'}}, "
               "where 'parameters' is a JSON Schema object")
    if not isinstance(tools, list):
        raise ApiError(422, problem + ".", "invalid_request_error", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]
                and isinstance(function.get("description", ""), str)
                and isinstance(function.get("parameters", {}), dict)):
            raise ApiError(422, f"{problem}; tools[{i}] is not.", "invalid_request_error", "tools")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        return tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ApiError(422, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}.", "invalid_request_error", "tool_choice")
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise ApiError(422, f"'tool_choice' names '{name}', which is not among the tools.", "invalid_request_error",
                       "tool_choice")
    return chosen


def _openai_calls(calls: list[dict]) -> list[dict[str, Any]]:
    """The engine's calls as OpenAI's `tool_calls`: a fresh id each, the arguments as JSON text."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def build_app(engine: ChatEngine, base_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application; `base_name` is the `model` id of the base model, adapters go by their names."""
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None)
    scheduler = BatchScheduler(engine)
    app.state.scheduler = scheduler
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(e.status_code, str(e.detail), "invalid_request_error").body(), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(422, str(e.errors()), "invalid_request_error").body(), 422)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            error = ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                             "invalid_request_error", code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    def model_ids() -> list[str]:
        return [base_name, *engine.adapters]

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "peftkit"}
                                           for m in model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON: {e}.", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", "invalid_request_error")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(422, "'model' is required: the base model or an adapter name.", "invalid_request_error",
                           "model")
        if model not in model_ids():
            raise ApiError(404, f"The model '{model}' does not exist; available: {', '.join(model_ids())}.",
                           "invalid_request_error", "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(422, "Only n=1 is supported: send several requests for several answers.",
                           "invalid_request_error", "n")
        messages, params, tools = _messages(body), _request_params(body), _tools(body)
        try:
            prompt = engine.prompt_ids(messages, tools)
        except RowError as e:  # the template cannot write them: GLM-4 given two calls in a turn, a Jinja check
            raise ApiError(422, f"The messages cannot be written in this model's chat format: {e}.",
                           "invalid_request_error", "messages") from None
        limit = engine.context_length
        if limit is not None and len(prompt) + 1 > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the messages take "
                           f"{len(prompt)}.", "invalid_request_error", "messages", "context_length_exceeded")
        if limit is not None:
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, limit - len(prompt)))
        adapter = None if model == base_name else model
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return StreamingResponse(_sse(engine, scheduler, reply_id, model, messages, prompt, params, adapter, tools),
                                     media_type="text/event-stream")
        done = await anyio.to_thread.run_sync(scheduler.submit, prompt, params, adapter)
        if tools:
            done = engine.read_calls(done)
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.tool_calls:  # content is null beside calls when the model wrote nothing else, as in OpenAI's
            message.update(content=done.text or None, tool_calls=_openai_calls(done.tool_calls))
        return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens}}

    return app


async def _sse(engine: ChatEngine, scheduler: BatchScheduler, reply_id: str, model: str, messages: list[dict[str, Any]],
               prompt: list[int], params: GenerationParams, adapter: str | None,
               tools: list[dict] | None) -> AsyncIterator[str]:
    """OpenAI's chunk stream: the role first, then content pieces (or tool calls), then the finish reason, then
    [DONE].

    With tools offered, the reply is generated whole before it is sent: whether it is a call is known only once it
    ends, and a call's markers (Mistral's [TOOL_CALLS]) are special tokens that a text stream drops. It is then sent
    as one content piece, or as `delta.tool_calls`, one chunk per call, each complete.

    Async, so that Starlette can cancel it when the client disconnects: the `finally` then stops the generation at
    its next token, instead of it running to `max_tokens` while holding the engine.
    """
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        data = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    cancel = threading.Event()
    if tools:
        try:
            done = await anyio.to_thread.run_sync(scheduler.submit, prompt, params, adapter, cancel,
                                                  abandon_on_cancel=True)
        finally:
            cancel.set()
        done = engine.read_calls(done)
        if done.text:
            yield chunk({"content": done.text})
        for index, call in enumerate(_openai_calls(done.tool_calls)):
            yield chunk({"tool_calls": [{"index": index, **call}]})
        finish, completion_tokens = done.finish_reason, done.completion_tokens
    else:
        text, done = "", None
        streaming = scheduler.stream(prompt, params, adapter, cancel)
        pieces = engine.stream(messages, adapter=adapter, params=params, cancel=cancel) if streaming is None \
            else streaming[0]
        try:
            # abandon_on_cancel: a disconnect must not wait for the next piece, which may be many tokens away
            while (piece := await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)) is not None:
                text += piece
                if piece:
                    yield chunk({"content": piece})
            if streaming is not None:
                done = await anyio.to_thread.run_sync(streaming[1].result, abandon_on_cancel=True)
        finally:
            cancel.set()
        if done is not None:
            finish, completion_tokens = done.finish_reason, done.completion_tokens
        else:
            completion_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
    prompt_tokens = len(prompt)
    yield chunk({}, finish, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
    yield "data: [DONE]\n\n"


def serve(engine: ChatEngine, base_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None) -> None:
    import uvicorn

    warn_if_exposed(host, api_key, "the API")
    uvicorn.run(build_app(engine, base_name, api_key), host=host, port=port, log_level="info")
