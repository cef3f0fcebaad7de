"""The tokenizer part of a GGUF file: tokens, types, merges, special ids, pre-tokenizer and chat template.

llama.cpp re-implements each known pre-tokenizer (the regex that splits text before BPE) under a name, so the file
must name the right one or llama.cpp tokenizes differently from transformers. The name is read off the regex in the
tokenizer's own tokenizer.json rather than guessed from the model's name.
"""

from __future__ import annotations

import json
from typing import Any

import gguf

from ..errors import ExportError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")

# The splitting steps of a tokenizer.json pre_tokenizer -> llama.cpp's pre-tokenizer name (llama-vocab.cpp).
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel-regex",): "gpt-2",  # GPT-2, and SmolLM2 as transformers converts it from GGUF
    ("digits", "bytelevel-regex"): "starcoder",  # StarCoder, SmolLM (the GPT-2 regex after splitting every digit)
    (_LLAMA3,): "llama-bpe",  # Llama 3
    (_QWEN2,): "qwen2",  # Qwen2 / Qwen2.5
}


def _steps(pre: dict | None) -> tuple[str, ...]:
    """The pre-tokenizer as a tuple of comparable steps; ByteLevel without its regex adds no step."""
    if pre is None:
        return ()
    if pre["type"] == "Sequence":
        return tuple(step for p in pre["pretokenizers"] for step in _steps(p))
    if pre["type"] == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ExportError("This tokenizer adds a space before the text (ByteLevel add_prefix_space), which "
                              "llama.cpp's BPE tokenizer does not do: the GGUF would tokenize differently.")
        return ("bytelevel-regex",) if pre.get("use_regex", True) else ()
    if pre["type"] == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    if pre["type"] == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        return (pre["pattern"].get("Regex") or pre["pattern"].get("String"),)
    return (json.dumps(pre, sort_keys=True),)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        raise ExportError(f"llama.cpp has no pre-tokenizer that peftkit knows to match this tokenizer's ({steps}); "
                          f"supported: {', '.join(PRE_TOKENIZERS.values())}. Export with export_format: hf and "
                          "convert with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers.")
    return name


def adds_token(tokenizer: Any, token_id: int | None, at_start: bool) -> bool:
    """Whether encoding adds this special token, asked of the tokenizer itself rather than of its config flags."""
    if token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0 if at_start else -1] == token_id and len(ids) > 1


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, SmolLM2 families) into `writer`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer; this one is a slow Python tokenizer.")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2); this "
                          f"one is {model['type']}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}. "
                          "Export with export_format: hf and convert with llama.cpp's convert_hf_to_gguf.py.")
    pre = pre_tokenizer_name(data)

    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ExportError(f"The tokenizer has token id {max(tokens)} but the model's vocabulary has {vocab_size} "
                          "rows; resize the model's embeddings to the tokenizer before exporting.")
    # llama.cpp wants one token per embedding row: rows past the tokenizer (padding for efficiency) get unused names.
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(token_list)
    writer.add_token_types(type_list)
    writer.add_token_merges(merges)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_token(tokenizer, tokenizer.bos_token_id, at_start=True))
    writer.add_add_eos_token(adds_token(tokenizer, tokenizer.eos_token_id, at_start=False))
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
