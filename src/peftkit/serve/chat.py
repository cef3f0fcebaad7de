"""The one chat engine: renders messages with the model's chat template, generates, stops at end-of-turn."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import torch
from transformers import TextIteratorStreamer

from ..errors import ConfigError


class ChatEngine:
    """Generate assistant replies for a list of {role, content} messages with a base model or a TunedModel."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("This tokenizer has no chat template; chat needs one (use an instruct/chat model).")
        self.model = model.eval()
        self.tokenizer = tokenizer

    def _inputs(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def _generate_kwargs(self, max_new_tokens: int, temperature: float | None, top_p: float | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float | None = None,
              top_p: float | None = None) -> str:
        """The full answer (greedy unless a temperature is given)."""
        inputs = self._inputs(messages)
        out = self.model.generate(**inputs, **self._generate_kwargs(max_new_tokens, temperature, top_p))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **self._generate_kwargs(max_new_tokens, temperature, top_p), "streamer": streamer}
        thread = threading.Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs), daemon=True)
        thread.start()
        yield from streamer
        thread.join()
