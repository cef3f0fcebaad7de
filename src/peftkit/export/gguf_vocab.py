"""The tokenizer part of a GGUF file: tokens, types, merges, special ids, pre-tokenizer and chat template.

llama.cpp re-implements each known pre-tokenizer (the regex that splits text before BPE) under a name, so the file
must name the right one or llama.cpp tokenizes differently from transformers. The name is read off the regex in the
tokenizer's own tokenizer.json rather than guessed from the model's name. SentencePiece-style tokenizers (BPE with
byte fallback: Llama 2, Mistral 7B) go in as llama.cpp's "llama" tokenizer, with scores that reproduce the BPE merge
order.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import gguf

from ..errors import ExportError

logger = logging.getLogger("peftkit.export")

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
    """Write the tokenizer into `writer`: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2) as llama.cpp's "gpt2" model,
    SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B) as its "llama" model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer; this one is a slow Python tokenizer.")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model["type"] != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers (GPT-2, SmolLM2, Llama 2/3, Mistral, Qwen2); this one "
                          f"is {model['type']}. Export with export_format: hf and convert with llama.cpp's "
                          "convert_hf_to_gguf.py.")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ExportError(f"The tokenizer has token id {max(tokens)} but the model's vocabulary has {vocab_size} "
                          "rows; resize the model's embeddings to the tokenizer before exporting.")
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]

    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(_sentencepiece_space_prefix(data))
        unk = model.get("unk_token")
        for i, text in tokens.items():
            if _BYTE_TOKEN.fullmatch(text):
                types[i] = gguf.TokenType.BYTE
            elif text == unk:
                types[i] = gguf.TokenType.UNKNOWN
        writer.add_token_scores(_merge_scores(tokens, merges, vocab_size))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(data))
        writer.add_token_merges([f"{a} {b}" for a, b in merges])
    # llama.cpp wants one token per embedding row: rows past the tokenizer (padding for efficiency) get unused names.
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
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


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_scores(tokens: dict[int, str], merges: list, vocab_size: int) -> list[float]:
    """SentencePiece scores that make llama.cpp's tokenizer merge as the BPE merges do.

    llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose joined text is the vocabulary token
    of highest score; BPE joins the pair of lowest merge rank. Scoring each token by minus the rank of the merge that
    makes it gives both the same order (SentencePiece BPE models were converted to merges from exactly such scores).
    Single characters and byte tokens are never the result of a join, so their score does not matter; a longer
    token that no merge makes must never be joined, as BPE never would.
    """
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    scores = []
    for i in range(vocab_size):
        text = tokens.get(i, "")
        scores.append(-float(rank[text] + 1) if text in rank else (0.0 if len(text) <= 1 else -1e9))
    return scores


def _sentencepiece_space_prefix(data: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (SentencePiece's add_dummy_prefix), as llama.cpp must too.

    Llama 2's tokenizer.json does it with a normalizer, which runs on each piece of text between special tokens, as
    llama.cpp does. Mistral's does it with a Metaspace pre-tokenizer, which skips text after a special token and text
    that starts with a space; llama.cpp cannot do that, so those (rare) prompts tokenize differently: say so.
    """
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    for step in normalizer.get("normalizers") or [normalizer]:
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":  # "▁"
            return True
    for step in pre.get("pretokenizers") or [pre]:
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            logger.warning("This tokenizer adds '\u2581' only at the very start of a prompt (a Metaspace "
                           "pre-tokenizer); llama.cpp also adds it after each special token and before text that "
                           "starts with a space, so such prompts tokenize slightly differently in llama.cpp.")
            return True
    return False
