"""Every built-in template renders a fixed conversation as its model family's published format, trains on exactly
each answer plus its end-of-turn token, and renders what the family's own Jinja chat template renders.

The Jinja: Qwen2.5's, Qwen3's, Llama 3's, Llama 3.1's and Mistral v0.3's are tests/fixtures/chat_templates. The
strings below are transcribed from the models' tokenizer_config.json (gemma-2-9b-it, gemma-3-*-it,
Phi-3.5-mini-instruct, phi-4, deepseek-llm-7b-chat, DeepSeek-V3, DeepSeek-R1, glm-4-9b-chat, Llama-2-7b-chat,
zephyr-7b-beta, c4ai-command-r-v01, internlm2-chat-7b, Yi-34B-Chat, Mistral-Small-24B-Instruct-2501) and from
transformers' Llama4Processor, keeping the branches these conversations reach (text content, function tools).
Each test tokenizer is SmolLM2's with the family's special tokens added, so turn markers are single tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path

import pytest
from helpers import SHARED_DATA
from test_templates import labelled_runs, smollm2_tokenizer

from peftkit import ConfigError
from peftkit.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Conversation,
    build_sft_dataset,
    encode,
    get_template,
    load_conversations,
)

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are terse.")
CHAT = [SYSTEM, msg("user", "Name a colour."), msg("assistant", "Blue."), msg("user", "Another one?"),
        msg("assistant", "Green.")]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather for a city", "parameters": CITY}])
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CHAT = [SYSTEM, msg("user", "Weather in Paris?"), msg("function_call", json.dumps(CALL)),
             msg("tool", '{"temp_c": 21}'), msg("assistant", "21 C.")]
REASONING_CHAT = [SYSTEM, msg("user", "Name a colour."), msg("assistant", "<think>\nSky.\n</think>\n\nBlue."),
                  msg("user", "Another one?"), msg("assistant", "<think>\nGrass.\n</think>\n\nGreen.")]
CALL_ID = "c526381c2"  # the 9-character id Mistral's formats need, derived from the call (peftkit's _call_id)


@dataclasses.dataclass(frozen=True)
class Family:
    bos: str | None
    eos: str
    markers: tuple[str, ...] = ()  # the family's special tokens


S, E = "<s>", "</s>"
CHATML = ("<|im_start|>", "<|im_end|>")
QWEN = Family(None, "<|im_end|>", CHATML + ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                            "<think>", "</think>"))
LLAMA3 = Family("<|begin_of_text|>", "<|eot_id|>",
                ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"))
LLAMA4 = Family("<|begin_of_text|>", "<|eot|>",
                ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>", "<|python_start|>", "<|python_end|>"))
MISTRAL = Family(S, E, ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"))
GEMMA = Family("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"))
DEEPSEEK = Family("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                  ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"))
FAMILIES: dict[str, Family] = {
    "default": Family(S, E), "alpaca": Family(S, E), "empty": Family(S, E), "fewshot": Family(S, E),
    "chatml": Family(None, "<|im_end|>"),
    "qwen": QWEN, "qwen3": QWEN, "qwen3_nothink": QWEN, "yi": Family(None, "<|im_end|>"),
    "intern2": Family(S, E, CHATML), "llama2": Family(S, E), "llama3": LLAMA3, "llama4": LLAMA4,
    "mistral": MISTRAL, "ministral": MISTRAL, "mistral_small": MISTRAL,
    "gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA,
    "phi": Family(S, "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "phi4": Family(None, "<|im_end|>", CHATML + ("<|im_sep|>",)),
    "deepseek": DEEPSEEK, "deepseek3": DEEPSEEK, "deepseekr1": DEEPSEEK,
    "glm4": Family(None, "<|endoftext|>", ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                           "<|observation|>")),
    "baichuan2": Family(S, E, ("<reserved_106>", "<reserved_107>")),
    "cohere": Family("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ("<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                                                              "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")),
    "falcon": Family(None, "<|endoftext|>"),
    "vicuna": Family(S, E), "zephyr": Family(S, E),
}


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    family = FAMILIES[name]
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.add_tokens([t for t in (family.bos, family.eos, *family.markers) if t], special_tokens=True)
    tok.bos_token, tok.eos_token = family.bos, family.eos
    return tok


# --- what each family's published format writes for CHAT, and what the loss covers ---

CHATML_CHAT = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
               "<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n"
               "<|im_start|>assistant\n{think}Green.<|im_end|>\n")
EMPTY_THINK = "<think>\n\n</think>\n\n"
GEMMA_CHAT = ("<bos><start_of_turn>user\nYou are terse.\n\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
              "Blue.<end_of_turn>\n<start_of_turn>user\nAnother one?<end_of_turn>\n<start_of_turn>model\n"
              "Green.<end_of_turn>\n")
DS3_CHAT = ("<｜begin▁of▁sentence｜>You are terse.<｜User｜>Name a colour.<｜Assistant｜>Blue.<｜end▁of▁sentence｜>"
            "<｜User｜>Another one?<｜Assistant｜>{think}Green.<｜end▁of▁sentence｜>")


def answers(*texts: str, end: str) -> list[str]:
    return [t + end for t in texts]


EXPECTED: dict[str, tuple[str, list[str]]] = {
    "fewshot": ("You are terse.Name a colour.Blue.\n\nAnother one?Green.</s>\n\n", ["Blue.", "Green." + E]),
    "default": ("System: You are terse.</s>\nHuman: Name a colour.</s>\nAssistant:Blue.</s>\n"
                "Human: Another one?</s>\nAssistant:Green.</s>\n", answers("Blue.", "Green.", end=E)),
    "alpaca": ("You are terse.### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>\n\n"
               "### Instruction:\nAnother one?\n\n### Response:\nGreen.</s>\n\n", answers("Blue.", "Green.", end=E)),
    "empty": ("You are terse.Name a colour.Blue.</s>Another one?Green.</s>", answers("Blue.", "Green.", end=E)),
    "chatml": (CHATML_CHAT.format(think=""), answers("Blue.", "Green.", end="<|im_end|>")),
    "qwen": (CHATML_CHAT.format(think=""), answers("Blue.", "Green.", end="<|im_end|>")),
    # Qwen3 writes a think block (empty without reasoning) on the answer after the last user message only.
    "qwen3": (CHATML_CHAT.format(think=EMPTY_THINK), answers("Blue.", EMPTY_THINK + "Green.", end="<|im_end|>")),
    "qwen3_nothink": (CHATML_CHAT.format(think=EMPTY_THINK), answers("Blue.", "Green.", end="<|im_end|>")),
    "yi": (CHATML_CHAT.format(think=""), answers("Blue.", "Green.", end="<|im_end|>")),
    "intern2": ("<s>" + CHATML_CHAT.format(think=""), answers("Blue.", "Green.", end="<|im_end|>")),
    "llama2": ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nName a colour. [/INST] Blue. </s>"
               "<s>[INST] Another one? [/INST] Green. </s>", answers(" Blue. ", " Green. ", end=E)),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nGreen.<|eot_id|>",
               answers("Blue.", "Green.", end="<|eot_id|>")),
    "llama4": ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
               "<|header_start|>user<|header_end|>\n\nName a colour.<|eot|>"
               "<|header_start|>assistant<|header_end|>\n\nBlue.<|eot|>"
               "<|header_start|>user<|header_end|>\n\nAnother one?<|eot|>"
               "<|header_start|>assistant<|header_end|>\n\nGreen.<|eot|>", answers("Blue.", "Green.", end="<|eot|>")),
    # Mistral: the system text opens the last user message.
    "mistral": ("<s>[INST] Name a colour.[/INST] Blue.</s>[INST] You are terse.\n\nAnother one?[/INST] Green.</s>",
                answers(" Blue.", " Green.", end=E)),
    "ministral": ("<s>[INST]Name a colour.[/INST]Blue.</s>[INST]You are terse.\n\nAnother one?[/INST]Green.</s>",
                  answers("Blue.", "Green.", end=E)),
    "mistral_small": ("<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Name a colour.[/INST]Blue.</s>"
                      "[INST]Another one?[/INST]Green.</s>", answers("Blue.", "Green.", end=E)),
    "gemma": (GEMMA_CHAT, answers("Blue.", "Green.", end="<end_of_turn>")),
    "gemma2": (GEMMA_CHAT, answers("Blue.", "Green.", end="<end_of_turn>")),
    "gemma3": (GEMMA_CHAT, answers("Blue.", "Green.", end="<end_of_turn>")),
    "phi": ("<|system|>\nYou are terse.<|end|>\n<|user|>\nName a colour.<|end|>\n<|assistant|>\nBlue.<|end|>\n"
            "<|user|>\nAnother one?<|end|>\n<|assistant|>\nGreen.<|end|>\n<|endoftext|>",
            answers("Blue.", "Green.", end="<|end|>")),
    "phi4": ("<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>Name a colour.<|im_end|>"
             "<|im_start|>assistant<|im_sep|>Blue.<|im_end|><|im_start|>user<|im_sep|>Another one?<|im_end|>"
             "<|im_start|>assistant<|im_sep|>Green.<|im_end|>", answers("Blue.", "Green.", end="<|im_end|>")),
    "deepseek": ("<｜begin▁of▁sentence｜>You are terse.\n\nUser: Name a colour.\n\nAssistant: Blue."
                 "<｜end▁of▁sentence｜>User: Another one?\n\nAssistant: Green.<｜end▁of▁sentence｜>",
                 answers(" Blue.", " Green.", end="<｜end▁of▁sentence｜>")),
    "deepseek3": (DS3_CHAT.format(think=""), answers("Blue.", "Green.", end="<｜end▁of▁sentence｜>")),
    # R1 prompts with "<think>\n": the loss starts after it (here at "\n\n", one token straddling the prompt's end).
    "deepseekr1": (DS3_CHAT.format(think=EMPTY_THINK),
                   answers("Blue.", "\n\n</think>\n\nGreen.", end="<｜end▁of▁sentence｜>")),
    # No end-of-turn token: the model hands the turn back with the next turn's marker; the last answer ends with eos.
    "glm4": ("[gMASK]<sop><|system|>\nYou are terse.<|user|>\nName a colour.<|assistant|>\nBlue.<|user|>\n"
             "Another one?<|assistant|>\nGreen.<|endoftext|>", ["\nBlue.<|user|>", "\nGreen.<|endoftext|>"]),
    "baichuan2": ("You are terse.<reserved_106>Name a colour.<reserved_107>Blue.<reserved_106>Another one?"
                  "<reserved_107>Green.</s>", ["Blue.<reserved_106>", "Green.</s>"]),
    "cohere": ("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are terse.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Name a colour.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Blue.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Another one?<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Green.<|END_OF_TURN_TOKEN|>",
               answers("Blue.", "Green.", end="<|END_OF_TURN_TOKEN|>")),
    "falcon": ("You are terse.\nUser: Name a colour.\nFalcon:Blue.\nUser: Another one?\nFalcon:Green.\n<|endoftext|>",
               ["Blue.\nUser:", "Green.\n<|endoftext|>"]),
    "vicuna": ("You are terse. USER: Name a colour. ASSISTANT: Blue.</s>USER: Another one? ASSISTANT: Green.</s>",
               answers(" Blue.", " Green.", end=E)),
    "zephyr": ("<|system|>\nYou are terse.</s>\n<|user|>\nName a colour.</s>\n<|assistant|>\nBlue.</s>\n"
               "<|user|>\nAnother one?</s>\n<|assistant|>\nGreen.</s>\n", answers("Blue.", "Green.", end=E)),
}

# --- TOOL_CHAT in the families with a tool format of their own (and chatml, for the generic one) ---

SCHEMA = ('{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": '
          '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
QWEN_SYSTEM = (
    "You are terse.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{SCHEMA}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QWEN_RESULT = 'user\n<tool_response>\n{"temp_c": 21}\n</tool_response>'


def qwen_tool_chat(result: str, think: str = "") -> str:
    return (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
            f"<|im_start|>assistant\n{QWEN_CALL}<|im_end|>\n<|im_start|>{result}<|im_end|>\n"
            f"<|im_start|>assistant\n{think}21 C.<|im_end|>\n")


def indented(function_only: bool = False) -> str:
    """The schema as `tojson(indent=4)` writes it (GLM-4 lists the function part)."""
    schema = json.loads(SCHEMA)
    return json.dumps(schema["function"] if function_only else schema, indent=4)


LLAMA_TOOLS_USER = ("Given the following functions, please respond with a JSON for a function call with its proper "
                    'arguments that best answers the given prompt.\n\nRespond in the format {"name": function name, '
                    '"parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
                    f"{indented()}\n\nWeather in Paris?")
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_RESULT = '"{\\"temp_c\\": 21}"'  # Meta's template writes the text result with tojson
MISTRAL_TOOLS = f"[AVAILABLE_TOOLS] [{SCHEMA}][/AVAILABLE_TOOLS]"
MISTRAL_CALL = f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{CALL_ID}"}}]'
MISTRAL_RESULT = f'[TOOL_RESULTS] {{"content": {{"temp_c": 21}}, "call_id": "{CALL_ID}"}}[/TOOL_RESULTS]'


def tekken(text: str) -> str:
    """Mistral's tekken formats: no space after a control token."""
    for token in ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[INST]"):
        text = text.replace(token + " ", token)
    return text


EXPECTED_TOOLS: dict[str, tuple[str, list[str]]] = {
    "chatml": (qwen_tool_chat('tool\n{"temp_c": 21}'),
               [QWEN_CALL + "<|im_end|>", "21 C.<|im_end|>"]),
    "qwen": (qwen_tool_chat(QWEN_RESULT), [QWEN_CALL + "<|im_end|>", "21 C.<|im_end|>"]),
    "qwen3": (qwen_tool_chat(QWEN_RESULT, EMPTY_THINK),
              [QWEN_CALL + "<|im_end|>", EMPTY_THINK + "21 C.<|im_end|>"]),
    # Llama 3.1's format: a dated system turn for tools, the tools in the first user message, ipython results.
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
               "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
               f"<|start_header_id|>user<|end_header_id|>\n\n{LLAMA_TOOLS_USER}<|eot_id|>"
               f"<|start_header_id|>assistant<|end_header_id|>\n\n{LLAMA_CALL}<|eot_id|>"
               f"<|start_header_id|>ipython<|end_header_id|>\n\n{LLAMA_RESULT}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n21 C.<|eot_id|>",
               [LLAMA_CALL + "<|eot_id|>", "21 C.<|eot_id|>"]),
    "llama4": ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nEnvironment: ipython\nYou are terse.<|eot|>"
               f"<|header_start|>user<|header_end|>\n\n{LLAMA_TOOLS_USER}<|eot|>"
               f"<|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>{LLAMA_CALL}<|eot|>"
               f"<|header_start|>ipython<|header_end|>\n\n{LLAMA_RESULT}<|eot|>"
               "<|header_start|>assistant<|header_end|>\n\n21 C.<|eot|>",
               [f"<|python_start|><|python_end|>{LLAMA_CALL}<|eot|>", "21 C.<|eot|>"]),
    # Mistral: the tool list and the system text at the last user message; calls and results carry an id.
    "mistral": (f"<s>{MISTRAL_TOOLS}[INST] You are terse.\n\nWeather in Paris?[/INST]{MISTRAL_CALL}</s>"
                f"{MISTRAL_RESULT} 21 C.</s>", [MISTRAL_CALL + "</s>", " 21 C.</s>"]),
    "ministral": (tekken(f"<s>{MISTRAL_TOOLS}[INST] You are terse.\n\nWeather in Paris?[/INST]{MISTRAL_CALL}</s>"
                         f"{MISTRAL_RESULT}21 C.</s>"), [tekken(MISTRAL_CALL) + "</s>", "21 C.</s>"]),
    "mistral_small": ("<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT]"
                      f"{MISTRAL_TOOLS}[INST]Weather in Paris?[/INST]{MISTRAL_CALL}</s>{MISTRAL_RESULT}21 C.</s>",
                      [MISTRAL_CALL + "</s>", "21 C.</s>"]),
    # GLM-4: the tools in a system turn of their own; a call is the function's name, then its arguments.
    "glm4": ("[gMASK]<sop><|system|>\n"
             "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
             "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n"
             f"{indented(function_only=True)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
             "<|system|>\nYou are terse."
             '<|user|>\nWeather in Paris?<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temp_c": 21}'
             "<|assistant|>\n21 C.<|endoftext|>",
             ['get_weather\n{"city": "Paris"}<|observation|>', "\n21 C.<|endoftext|>"]),
}


def check(name: str, conv: list[dict], expected: tuple[str, list[str]], *, tools: str | None = None,
          **kw) -> None:
    """`conv` renders as expected, and the labels are exactly the expected answers, token by token."""
    tok = tokenizer(name)
    template = get_template(name, tok, **kw)
    text, answer_texts = expected
    assert template.render(conv, tok, tools=tools) == text
    example, truncated = encode(Conversation(conv, tools=tools), template, tok, cutoff_len=4096)
    assert not truncated and example["input_ids"] == tok.encode(text, add_special_tokens=False)
    assert [tok.decode(run) for run in labelled_runs(example)] == answer_texts


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_renders_its_family_format_and_trains_on_answers_only(name) -> None:
    check(name, CHAT, EXPECTED[name])


def test_every_listed_template_is_tested() -> None:
    assert set(EXPECTED) == set(TEMPLATES) == set(FAMILIES)


@pytest.mark.parametrize("name", list(EXPECTED_TOOLS))
def test_tool_calls_in_the_family_format(name) -> None:
    check(name, TOOL_CHAT, EXPECTED_TOOLS[name], tools=TOOLS)


def test_reasoning_is_kept_or_dropped_as_enable_thinking_says() -> None:
    """Earlier answers lose their reasoning (as Qwen3's and R1's templates write history); the last keeps it when
    thinking is trained, or drops it behind an empty, untrained think block."""
    kept = CHATML_CHAT.format(think="<think>\nGrass.\n</think>\n\n")
    check("qwen3", REASONING_CHAT, (kept, ["Blue.<|im_end|>", "<think>\nGrass.\n</think>\n\nGreen.<|im_end|>"]))
    dropped = CHATML_CHAT.format(think=EMPTY_THINK)
    check("qwen3", REASONING_CHAT, (dropped, ["Blue.<|im_end|>", "Green.<|im_end|>"]), enable_thinking=False)
    check("qwen3_nothink", REASONING_CHAT, (dropped, ["Blue.<|im_end|>", "Green.<|im_end|>"]), enable_thinking=True)
    eos = "<｜end▁of▁sentence｜>"
    # R1's template keeps the newlines that followed the dropped reasoning (Qwen3's drops them).
    r1_history = DS3_CHAT.replace("<｜Assistant｜>Blue.", "<｜Assistant｜>\n\nBlue.")
    check("deepseekr1", REASONING_CHAT, (r1_history.format(think="<think>\nGrass.\n</think>\n\n"),
                                         ["\n\nBlue." + eos, "Grass.\n</think>\n\nGreen." + eos]))
    check("deepseekr1", REASONING_CHAT, (r1_history.format(think=EMPTY_THINK), ["\n\nBlue." + eos, "Green." + eos]),
          enable_thinking=False)
    tok = tokenizer("deepseekr1")
    prompt = REASONING_CHAT[:4]
    assert get_template("deepseekr1", tok).render(prompt, tok, add_generation_prompt=True).endswith(
        "<｜Assistant｜><think>\n")
    assert get_template("deepseekr1", tok, enable_thinking=False).render(
        prompt, tok, add_generation_prompt=True).endswith("<｜Assistant｜>" + EMPTY_THINK)


def test_templates_without_a_think_block_leave_answers_as_written() -> None:
    conv = [msg("user", "Hi"), msg("assistant", "\n<think>x</think>\nHello")]
    tok = tokenizer("chatml")
    assert get_template("chatml", tok).render(conv, tok).endswith("assistant\n\n<think>x</think>\nHello<|im_end|>\n")


# --- the families' own Jinja ---


GEMMA_JINJA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
               "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
               "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
               "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3_JINJA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}"""
PHI3_JINJA = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
              "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
              "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
              "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_JINJA = ("{% for message in messages %}{% if (message['role'] == 'system') %}"
              "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'user') %}"
              "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'assistant') %}"
              "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
DEEPSEEK_JINJA = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
                  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
                  "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
                  "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                  "{{ 'Assistant:' }}{% endif %}")
# DeepSeek-V3's and R1's, without their tool branches; R1 cuts reasoning out of assistant messages and prompts with
# "<think>\n".
DEEPSEEK3_JINJA = ("{% set ns = namespace(system_prompt='') %}{%- for message in messages %}"
                   "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}"
                   "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
                   "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
                   "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}CUT"
                   "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor -%}"
                   "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}GEN{% endif %}")
DEEPSEEKR1_JINJA = (DEEPSEEK3_JINJA.replace("CUT", "{% if '</think>' in content %}"
                                                   "{% set content = content.split('</think>')[-1] %}{% endif %}")
                    .replace("GEN", "{{ '<think>\\n' }}"))
DEEPSEEK3_JINJA = DEEPSEEK3_JINJA.replace("CUT", "").replace("GEN", "")
# glm-4-9b-chat's: tools ride on a message (`tools`), a call is an assistant message with `metadata` (its name).
GLM4_JINJA = ("[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
              "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
              "你的任务是针对用户的问题和要求提供适当的答复和支持。"
              "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
              "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
              "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
              "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
LLAMA2_JINJA = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}"
                "{% if loop.index0 == 0 and system_message != false %}"
                "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
                "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA4_JINJA = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}
{%- if user_supplied_system_message %}
    {{- "<|header_start|>system<|header_end|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot|>" }}
{%- endif %}
{%- if tools_in_user_message and not tools is none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|header_start|>user<|header_end|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}
        {{- message['content'] }}
        {{- "<|eot|>" }}
    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}
       {{- '<|header_start|>assistant<|header_end|>\n\n' -}}
       {{- '<|python_start|>' }}
        {{- message['content'] }}
       {{- '<|python_end|>' }}
        {%- for tool_call in message.tool_calls %}
           {{- '{"name": "' + tool_call.function.name + '", ' }}
           {{- '"parameters": ' }}
           {{- tool_call.function.arguments | tojson }}
           {{- "}" }}
        {%- endfor %}
       {{- "<|eot|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|header_start|>ipython<|header_end|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\n\n' }}
{%- endif %}"""
ZEPHYR_JINJA = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
                "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
                "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
                "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
                "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
COHERE_JINJA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
                "{% set system_message = false %}{% endif %}{% if system_message != false %}"
                "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
                "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}"
                "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
                "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
                "{% elif message['role'] == 'assistant' %}"
                "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")
CHATML_JINJA = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
                "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")  # Yi-34B-Chat's
INTERN2_JINJA = "{{ bos_token }}" + CHATML_JINJA
MISTRAL_SMALL_JINJA = ("{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
                       "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
                       "{%- endif %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
                       "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
                       "{{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
                       "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}")


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def ministral_jinja() -> str:
    """Mistral's tekken template (Nemo, Ministral-8B): v0.3's without the spaces after control tokens or the trim."""
    text = fixture("mistral-7b-instruct-v0.3")
    for old, new in (('"[AVAILABLE_TOOLS] ["', '"[AVAILABLE_TOOLS]["'), ('"[INST] "', '"[INST]"'),
                     ('"[TOOL_CALLS] ["', '"[TOOL_CALLS]["'), ("'[TOOL_RESULTS] {", "'[TOOL_RESULTS]{"),
                     ('" " + message["content"]|trim', 'message["content"]')):
        assert old in text
        text = text.replace(old, new)
    return text


def hf_messages(conv: list[dict], style: str = "openai") -> list[dict]:
    """peftkit's canonical turns as the families' templates take them: OpenAI tool calls (with Mistral's ids), or
    GLM-4's metadata and observations."""
    out = []
    for m in conv:
        if m["role"] == "function_call":
            call = json.loads(m["content"])
            if style == "glm4":
                out.append({"role": "assistant", "metadata": call["name"], "content": json.dumps(call["arguments"])})
            else:
                out.append({"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": call, "id": CALL_ID}]})
        elif m["role"] == "tool":
            out.append({"role": "observation", "content": m["content"]} if style == "glm4" else
                       {"role": "tool", "content": m["content"], "tool_call_id": CALL_ID})
        else:
            out.append(dict(m))
    return out


@dataclasses.dataclass(frozen=True)
class Jinja:
    name: str  # the peftkit template
    source: str | tuple[str, ...]  # the Jinja, or a fixture's name
    convs: tuple[str, ...] = ("chat",)  # which conversations: "chat", "chat without system", "tools"
    whole: bool = True  # the whole conversation renders alike (not only every generation prompt)
    user_prompts: bool = False  # only the generation prompts that end with a user message render alike
    end: str = ""  # what peftkit adds after a whole conversation (the last answer's eos where turns have no end)

    def jinja(self) -> str:
        return fixture(self.source[0]) if isinstance(self.source, tuple) else self.source


JINJA = [
    Jinja("qwen", ("qwen2.5-instruct",), ("chat", "tools")),
    Jinja("qwen3", ("qwen3-8b",), ("chat", "tools", "reasoning")),
    Jinja("qwen3_nothink", ("qwen3-8b",), ("chat", "tools")),
    Jinja("llama3", ("meta-llama-3-8b-instruct",), ("chat",)),
    Jinja("llama3", ("meta-llama-3.1-8b-instruct",), ("tools",)),  # 3.1's format is the one with tools
    Jinja("llama4", LLAMA4_JINJA, ("chat", "tools")),
    Jinja("llama2", LLAMA2_JINJA),
    # Mistral's template writes the system text only when the conversation ends with the user message it opens:
    # whole conversations are compared without one, generation prompts with one.
    Jinja("mistral", ("mistral-7b-instruct-v0.3",), ("chat without system", "tools without system")),
    Jinja("mistral", ("mistral-7b-instruct-v0.3",), ("chat", "tools"), whole=False, user_prompts=True),
    Jinja("ministral", ministral_jinja(), ("chat without system", "tools without system")),
    Jinja("ministral", ministral_jinja(), ("chat", "tools"), whole=False, user_prompts=True),
    Jinja("mistral_small", MISTRAL_SMALL_JINJA),
    Jinja("gemma", GEMMA_JINJA, ("chat without system",)),
    Jinja("gemma2", GEMMA_JINJA, ("chat without system",)),
    Jinja("gemma3", GEMMA3_JINJA),
    Jinja("phi", PHI3_JINJA),
    Jinja("phi4", PHI4_JINJA),
    Jinja("deepseek", DEEPSEEK_JINJA),
    Jinja("deepseek3", DEEPSEEK3_JINJA),
    # R1's template drops the reasoning of every answer: its whole conversations are not what R1 is trained on.
    Jinja("deepseekr1", DEEPSEEKR1_JINJA, ("chat", "reasoning"), whole=False),
    Jinja("glm4", GLM4_JINJA, ("chat", "tools"), end="<|endoftext|>"),
    Jinja("yi", CHATML_JINJA),
    Jinja("chatml", CHATML_JINJA),
    Jinja("intern2", INTERN2_JINJA),
    Jinja("cohere", COHERE_JINJA),
    Jinja("zephyr", ZEPHYR_JINJA),
]
CONVS = {"chat": (CHAT, None), "chat without system": (CHAT[1:], None), "tools": (TOOL_CHAT, TOOLS),
         "tools without system": (TOOL_CHAT[1:], TOOLS), "reasoning": (REASONING_CHAT, None)}


def apply_jinja(case: Jinja, tok, conv: list[dict], tools: str | None, generation_prompt: bool, **kw) -> str:
    style = "glm4" if case.name == "glm4" else "openai"
    messages, schemas = hf_messages(conv, style), [json.loads(SCHEMA)] if tools else None
    if case.name == "glm4" and schemas:  # glm-4-9b-chat reads the tools off the first message
        messages[0] = {**messages[0], "tools": schemas}
        schemas = None
    return tok.apply_chat_template(messages, tools=schemas, chat_template=case.jinja(), tokenize=False,
                                   add_generation_prompt=generation_prompt, **kw)


@pytest.mark.parametrize("case", JINJA, ids=lambda c: f"{c.name}-{c.source if isinstance(c.source, tuple) else 'str'}"
                         f"{'' if c.whole else '-prompts'}")
def test_render_equals_the_familys_own_jinja(case: Jinja) -> None:
    tok = tokenizer(case.name)
    for thinking in (True, False) if case.name.startswith("qwen3") else (True,):  # R1's knows no other mode
        template = get_template(case.name, tok, enable_thinking=thinking)
        jinja_thinking = thinking if template.thinking is None else template.thinking
        kw = {"enable_thinking": False} if jinja_thinking is False and case.name.startswith("qwen3") else {}
        for key in case.convs:
            conv, tools = CONVS[key]
            if case.whole and (key != "reasoning" or thinking):
                ours = template.render(conv, tok, tools=tools)
                assert ours == apply_jinja(case, tok, conv, tools, False, **kw) + case.end, key
            for k, m in enumerate(conv):  # every generation prompt, each ending on a user message or a result
                user_turn = conv[k - 1]["role"] == "user"
                if m["role"] in ("assistant", "function_call") and (user_turn or not case.user_prompts):
                    ours = template.render(conv[:k], tok, tools=tools, add_generation_prompt=True)
                    assert ours == apply_jinja(case, tok, conv[:k], tools, True, **kw), (key, k)


def test_every_family_with_a_chat_template_is_checked_against_it() -> None:
    """Only LLaMA-Factory's own formats, Falcon's and Vicuna's (no chat template), Baichuan 2's (its chat format is
    code) and Mistral Small's tool calls go without a Jinja check."""
    assert set(TEMPLATES) - {c.name for c in JINJA} == {"default", "alpaca", "empty", "fewshot", "falcon",
                                                                 "vicuna", "baichuan2"}


# --- names, stop tokens, the tool data set, enable_thinking in the data pipeline ---

def test_an_unknown_name_lists_every_known_one() -> None:
    with pytest.raises(ConfigError) as info:
        get_template("qwen4", tokenizer("qwen"))
    message = str(info.value)
    assert all(f" {name}," in message or f" {name};" in message for name in TEMPLATES)
    assert "leave `template` unset to use the tokenizer's own chat template" in message


@pytest.mark.parametrize("name, stops", [
    ("qwen3", ["<|im_end|>"]), ("llama3", ["<|eot_id|>", "<|eom_id|>"]), ("llama4", ["<|eot|>", "<|eom|>"]),
    ("gemma3", ["<eos>", "<end_of_turn>"]), ("phi", ["<|endoftext|>", "<|end|>"]),
    ("glm4", ["<|endoftext|>", "<|user|>", "<|observation|>"]), ("baichuan2", ["</s>", "<reserved_106>"]),
    ("cohere", ["<|END_OF_TURN_TOKEN|>"]), ("mistral", ["</s>"]),
])
def test_stop_tokens(name, stops) -> None:
    tok = tokenizer(name)
    assert get_template(name, tok).stop_token_ids(tok) == tok.convert_tokens_to_ids(stops)


@pytest.mark.parametrize("name, call", [
    ("qwen", r'<tool_call>\n\{"name": "\w+", "arguments": \{.*\}\}\n</tool_call><\|im_end\|>'),
    ("qwen3", r'<tool_call>\n\{"name": "\w+", "arguments": \{.*\}\}\n</tool_call><\|im_end\|>'),
    ("llama3", r'\{"name": "\w+", "parameters": \{.*\}\}<\|eot_id\|>'),
    ("mistral", r'\[TOOL_CALLS\] \[\{"name": "\w+", "arguments": \{.*\}, "id": "[0-9a-f]{9}"\}\]</s>'),
    ("glm4", r'\w+\n\{.*\}<\|observation\|>'),
])
def test_glaive_tool_data_trains_with_the_family_tool_format(name, call) -> None:
    """LLaMA-Factory's glaive_toolcall_en_demo: every conversation encodes, each answer is one labelled run, and
    every call is trained in the family's format, through its end token."""
    tok = tokenizer(name)
    template = get_template(name, tok)
    convs, _ = load_conversations("glaive_toolcall_en_demo", SHARED_DATA, max_samples=40)
    calls = 0
    for conv in convs:
        example, _ = encode(conv, template, tok, cutoff_len=8192)
        runs = [tok.decode(run) for run in labelled_runs(example)]
        roles = [m["role"] for m in conv.messages if m["role"] in ("assistant", "function_call")]
        assert len(runs) == len(roles)
        for run, role in zip(runs, roles):
            assert bool(re.fullmatch(call, run, re.DOTALL)) == (role == "function_call"), run
            calls += role == "function_call"
    assert calls > 5


def test_enable_thinking_reaches_the_data_and_its_cache(tmp_path) -> None:
    tok = tokenizer("qwen3")
    kw = dict(template="qwen3", cutoff_len=512, max_samples=3, cache_dir=str(tmp_path))
    trained, _ = build_sft_dataset(tok, "alpaca_en_demo", SHARED_DATA, **kw)
    prompted, _ = build_sft_dataset(tok, "alpaca_en_demo", SHARED_DATA, enable_thinking=False, **kw)
    assert len(list(tmp_path.glob("sft-*.npz"))) == 2  # a cache each
    for a, b in zip(trained, prompted):
        assert a["input_ids"] == b["input_ids"]  # the same text; only what is trained differs
        first = a["labels"].index(next(x for x in a["labels"] if x != IGNORE_INDEX))
        assert tok.decode(a["input_ids"][first:]).startswith(EMPTY_THINK)
        assert not tok.decode([x for x in b["labels"] if x != IGNORE_INDEX]).startswith("<think>")
