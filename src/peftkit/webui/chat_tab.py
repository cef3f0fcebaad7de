"""The Chat tab: a base model with one or more adapters, streamed multi-turn answers, and a side-by-side mode that
asks the base model the same question. The model runs in the UI's process (`ChatEngine`, as `peftkit chat`)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..errors import PeftkitError
from ..serve import ChatEngine, GenerationParams
from ..tuned import load_for_inference
from . import form
from .locales import text
from .widgets import Texts, component

SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


class ChatTab:
    def __init__(self, texts: Texts, model: str | None) -> None:
        self.engine: ChatEngine | None = None
        self.adapters: list[str] = []
        fields = form.fields_by_name()
        with gr.Row():
            self.model = texts.field(component(fields["model_name_or_path"], choices=form.model_choices(),
                                               value=model or "smollm2-135m", elem_id="pk-chat-model", scale=2),
                                     fields["model_name_or_path"])
            self.adapter_dirs = texts.label(gr.Textbox(label=text("adapters", "en"), elem_id="pk-chat-adapters",
                                                       scale=2), "adapters")
            self.template = texts.field(component(fields["template"], elem_id="pk-chat-template"), fields["template"])
        with gr.Row():
            self.btn_load = texts.value(gr.Button(text("load_model", "en"), variant="primary",
                                                  elem_id="pk-btn-chat-load"), "load_model")
            self.btn_unload = texts.value(gr.Button(text("unload_model", "en"), elem_id="pk-btn-chat-unload"),
                                          "unload_model")
        self.info = gr.Markdown(text("model_unloaded", "en"), elem_id="pk-chat-info")
        self.system = texts.label(gr.Textbox(label=text("system", "en"), elem_id="pk-chat-system"), "system")
        with gr.Row():
            self.sampling = {name: texts.field(component(fields[name], elem_id=f"pk-chat-{name}", min_width=160),
                                               fields[name]) for name in SAMPLING}
        self.sampling["max_new_tokens"].value = 256
        self.side_by_side = texts.label(gr.Checkbox(label=text("side_by_side", "en"), elem_id="pk-chat-side"),
                                        "side_by_side")
        with gr.Row():
            self.chat = texts.label(gr.Chatbot(label=text("tuned", "en"), elem_id="pk-chat-tuned", height=360),
                                    "tuned")
            self.base_chat = texts.label(gr.Chatbot(label=text("base", "en"), elem_id="pk-chat-base", height=360,
                                                    visible=False), "base")
        with gr.Row():
            self.message = texts.label(gr.Textbox(label=text("message", "en"), elem_id="pk-chat-message", scale=4),
                                       "message")
            self.btn_send = texts.value(gr.Button(text("send", "en"), variant="primary", elem_id="pk-btn-chat-send",
                                                  scale=1), "send")
            self.btn_clear = texts.value(gr.Button(text("clear", "en"), elem_id="pk-btn-chat-clear", scale=1),
                                         "clear")

    def wire(self, lang: Any) -> None:
        self.btn_load.click(self._load, [self.model, self.adapter_dirs, self.template, lang], self.info)
        self.btn_unload.click(self._unload, [lang], self.info)
        self.side_by_side.change(lambda on: gr.update(visible=on), self.side_by_side, self.base_chat)
        inputs = [self.message, self.chat, self.base_chat, self.system, self.side_by_side,
                  *self.sampling.values(), lang]
        outputs = [self.message, self.chat, self.base_chat, self.info]
        self.btn_send.click(self._send, inputs, outputs)
        self.message.submit(self._send, inputs, outputs)
        self.btn_clear.click(lambda: ([], []), None, [self.chat, self.base_chat])

    def _load(self, model: str, adapters: str, template: str, lang: str) -> str:
        self._unload(lang)
        folders = [a.strip() for a in (adapters or "").split(",") if a.strip()]
        try:
            tuned, tokenizer = load_for_inference(model, folders[0] if folders else None)
            engine = ChatEngine(tuned, tokenizer, template or None)
            for folder in folders[1:]:
                engine.load_adapter(folder, Path(folder).name)
        except PeftkitError as e:
            return f"⚠ {e}"
        self.engine, self.adapters = engine, folders
        shown = f" + {', '.join(folders)}" if folders else ""
        return text("model_loaded", lang, model=model, adapters=shown)

    def _unload(self, lang: str) -> str:
        self.engine, self.adapters = None, []
        gc.collect()
        return text("model_unloaded", lang)

    def _send(self, message: str, history: list[dict], base_history: list[dict], system: str, side: bool,
              *args: Any) -> Iterator[list[Any]]:
        *values, lang = args
        engine = self.engine
        if engine is None:
            yield [message, history, base_history, text("load_first", lang)]
            return
        if not (message or "").strip():
            yield [message, history, base_history, gr.update()]
            return
        settings = dict(zip(SAMPLING, values))
        try:
            params = GenerationParams(**{k: (int(v) if k in ("max_new_tokens", "top_k") else float(v))
                                         for k, v in settings.items() if v not in (None, "")})
        except (PeftkitError, ValueError) as e:
            yield [message, history, base_history, f"⚠ {e}"]
            return
        prefix = [{"role": "system", "content": system}] if system else []
        adapter = engine.default_adapter
        history = [*(history or []), {"role": "user", "content": message}]
        for answer in self._stream(engine, [*prefix, *_turns(history)], params, adapter):
            yield ["", [*history, {"role": "assistant", "content": answer}], base_history, gr.update()]
        history = [*history, {"role": "assistant", "content": answer}]
        if side:
            base_history = [*(base_history or []), {"role": "user", "content": message}]
            for answer in self._stream(engine, [*prefix, *_turns(base_history)], params, None):
                yield ["", history, [*base_history, {"role": "assistant", "content": answer}], gr.update()]

    @staticmethod
    def _stream(engine: ChatEngine, messages: list[dict], params: GenerationParams,
                adapter: str | None) -> Iterator[str]:
        answer = ""
        yield answer
        for piece in engine.stream(messages, params=params, adapter=adapter):
            answer += piece
            yield answer


def _turns(history: list[dict]) -> list[dict[str, str]]:
    """Chatbot messages -> plain role/content turns (gradio may add metadata, or content as a list of parts)."""
    turns = []
    for m in history:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        turns.append({"role": m["role"], "content": str(content)})
    return turns
