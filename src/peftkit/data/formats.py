"""Alpaca, ShareGPT and OpenAI-messages rows -> one canonical `Conversation`, so templates see a single shape.

Canonical roles: `system` (first only), then alternating prompt turns (`user`, `tool` = a tool's result) and answer
turns (`assistant`, `function_call` = the model calling a tool, content a JSON `{"name", "arguments"}`), ending on an
answer. Rows that break this are skipped by the caller and counted, never silently repaired.

A stage reads one kind of row (`KINDS`): `sft` conversations; `text` documents (pretraining); `pairs`, a conversation
whose last answer is the chosen one, plus the rejected answer (LLaMA-Factory's `ranking: true`); `kto`, a
conversation plus its desirable/undesirable tag (`kto_tag`); `prompts`, the turns up to the last prompt turn (an answer
after it, if any, is dropped), with the row's columns kept for reward functions (RL stages).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import ConfigError
from .sources import json_kind

KINDS = ("sft", "text", "pairs", "kto", "prompts")
ROLES = ("system", "user", "assistant", "function_call", "tool")
PROMPT_ROLES = ("user", "tool")
ANSWER_ROLES = ("assistant", "function_call")

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


@dataclasses.dataclass
class Conversation:
    """One training conversation: `messages` as [{"role", "content"}], `tools` a JSON list of tool schemas or None."""

    messages: list[dict[str, str]]
    tools: str | None = None
    source: str = ""  # the dataset it came from, for reports
    row: int = -1  # its row in that dataset, for reports
    rejected: dict[str, str] | None = None  # pairs: the rejected last answer ({"role", "content"}); messages end chosen
    kto_tag: bool | None = None  # kto: whether the last answer is desirable
    text: str | None = None  # text: the document (messages stay empty)
    columns: dict[str, Any] | None = None  # prompts: the row's columns, for reward functions


class RowError(ValueError):
    """A row that cannot become a valid conversation; the message is the reason shown to the user."""


def to_conversation(row: Any, formatting: str, columns: dict[str, str], tags: dict[str, str],
                    kind: str = "sft") -> Conversation:
    if not isinstance(row, dict):  # a `null` or a number among the rows of a JSON file
        raise RowError(f"not a JSON object ({json_kind(row)})")
    if kind == "text":
        return Conversation(messages=[], text=_document(row, formatting, columns))
    if kind == "pairs":
        return _pair(row, formatting, columns, tags)
    if kind == "prompts":
        return _prompt(row, formatting, columns, tags)
    if formatting == "alpaca":
        messages, tools = _alpaca(row, columns), None
    else:
        messages, tools = _sharegpt(row, columns, tags, openai=formatting == "openai")
    check_turns(messages)
    conv = Conversation(messages=messages, tools=tools)
    if kind == "kto":
        conv.kto_tag = _tag(row, columns.get("kto_tag", "kto_tag"))
    return conv


def _document(row: dict[str, Any], formatting: str, columns: dict[str, str]) -> str:
    """Pretraining text: the `prompt` column (LLaMA-Factory's `columns: {prompt: text}`), else the first message."""
    if formatting == "alpaca":
        text = "\n".join(t for t in (_text(row, columns.get("prompt", "instruction"), required=True),
                                     _text(row, columns.get("query"))) if t)
    else:
        messages, _ = _sharegpt(row, columns, {}, openai=formatting == "openai")
        text = messages[0]["content"] if messages else ""
    if not text.strip():
        raise RowError("empty text")
    return text


def _pair(row: dict[str, Any], formatting: str, columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """A preference row: the prompt turns, then the chosen answer as the last message; the rejected one beside."""
    if formatting == "alpaca":
        messages = _alpaca({**row, "__answer": ""}, {**columns, "response": "__answer"})[:-1]
        chosen = {"role": "assistant", "content": _text(row, columns.get("chosen", "chosen"), required=True)}
        rejected = {"role": "assistant", "content": _text(row, columns.get("rejected", "rejected"), required=True)}
        tools = None
    else:
        messages, tools = _sharegpt(row, columns, tags, openai=formatting == "openai")
        chosen = _answer_message(row, columns.get("chosen", "chosen"), tags, formatting)
        rejected = _answer_message(row, columns.get("rejected", "rejected"), tags, formatting)
    for name, m in (("chosen", chosen), ("rejected", rejected)):
        if not m["content"].strip():
            raise RowError(f"empty {name} answer")
    if chosen["content"].strip() == rejected["content"].strip():
        raise RowError("chosen and rejected answers are identical")
    if messages and messages[-1]["role"] in ANSWER_ROLES:
        raise RowError("the prompt turns end with an answer; the chosen and rejected answers must follow a user turn")
    check_turns(messages + [chosen])
    return Conversation(messages=messages + [chosen], tools=tools, rejected=rejected)


def _prompt(row: dict[str, Any], formatting: str, columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """An RL prompt: the turns up to the last prompt turn (alpaca: the answer column is optional and left out)."""
    if formatting == "alpaca":
        messages = _alpaca({**row, "__answer": ""}, {**columns, "response": "__answer"})[:-1]
        tools = None
    else:
        messages, tools = _sharegpt(row, columns, tags, openai=formatting == "openai")
        if messages and messages[-1]["role"] in ANSWER_ROLES:
            messages = messages[:-1]
    if not messages or messages[-1]["role"] not in PROMPT_ROLES:
        raise RowError("no prompt turn to answer (the turns must end with a user or tool turn, or an answer after one)")
    check_turns(messages + [{"role": "assistant", "content": "-"}])
    return Conversation(messages=messages, tools=tools, columns=row)


def _answer_message(row: dict[str, Any], column: str, tags: dict[str, str], formatting: str) -> dict[str, str]:
    """A chosen/rejected answer: a message object in the dataset's role/content tags, or plain text."""
    if column not in row:
        raise RowError(f"missing column '{column}' (row has: {', '.join(sorted(row))})")
    value = row[column]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if not isinstance(value, dict):
        raise RowError(f"column '{column}' holds {json_kind(value)}, not a message object or text")
    tag = {**(OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS), **tags}
    role = value.get(tag["role_tag"], tag["assistant_tag"])
    roles = {tag["assistant_tag"]: "assistant", tag["function_tag"]: "function_call"}
    if role not in roles:
        raise RowError(f"column '{column}' has role '{role}'; a chosen or rejected answer must be "
                       f"'{tag['assistant_tag']}' or '{tag['function_tag']}'")
    return {"role": roles[role], "content": _content_text(value.get(tag["content_tag"]), 0)}


def _tag(row: dict[str, Any], column: str) -> bool:
    """A KTO tag: true (desirable) or false (undesirable); CSV's "true"/"false" text is accepted."""
    if column not in row or row[column] is None:
        raise RowError(f"missing kto_tag column '{column}'")
    value = row[column]
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RowError(f"kto_tag column '{column}' holds {value!r}; it must be true or false")


def check_turns(messages: list[dict[str, str]]) -> None:
    """Raise RowError unless the turns alternate prompt -> answer and end on an answer."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("no turns")
    for i, m in enumerate(turns):
        role = m["role"]
        if role == "system":
            raise RowError(f"system turn at position {i + 1}; only the first turn may be a system prompt")
        if not m["content"].strip():
            raise RowError("empty answer" if role in ANSWER_ROLES else f"empty {role} turn")
        want = PROMPT_ROLES if i % 2 == 0 else ANSWER_ROLES
        if role not in want:
            if i == 0:
                raise RowError(f"starts with a '{role}' turn; the first turn must be user")
            side = "prompt" if role in PROMPT_ROLES else "answer"
            raise RowError(f"two {side} turns in a row ('{turns[i - 1]['role']}' then '{role}') at turn {i}")
    if turns[-1]["role"] not in ANSWER_ROLES:
        raise RowError(f"does not end with an assistant turn (ends with '{turns[-1]['role']}')")


def _text(row: dict[str, Any], column: str | None, *, required: bool = False) -> str:
    if column is None:
        return ""
    if column not in row:
        if required:
            raise RowError(f"missing column '{column}' (row has: {', '.join(sorted(row))})")
        return ""
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column '{column}' holds {type(value).__name__}, not text")
    return value


def _alpaca(row: dict[str, Any], columns: dict[str, str]) -> list[dict[str, str]]:
    """instruction + "\\n" + input is the user turn, output the answer; history pairs come first."""
    prompt = _text(row, columns.get("prompt", "instruction"), required=True)
    answer = _text(row, columns.get("response", "output"), required=True)
    query = _text(row, columns.get("query", "input"))
    messages = []
    system = _text(row, columns.get("system"))
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get(columns["history"]) if columns.get("history") else None
    if history:
        if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
        ):
            raise RowError(f"column '{columns['history']}' must be a list of [user, assistant] text pairs")
        for old_prompt, old_answer in history:
            messages += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_answer}]
    user = "\n".join(t for t in (prompt, query) if t)
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def _sharegpt(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str], *, openai: bool):
    tag = {**(OPENAI_TAGS if openai else SHAREGPT_TAGS), **tags}
    column = columns.get("messages", "messages" if openai else "conversations")
    if column not in row:
        raise RowError(f"missing column '{column}' (row has: {', '.join(sorted(row))})")
    raw = row[column]
    if isinstance(raw, str):  # CSV and some parquet exports store the list as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise RowError(f"column '{column}' is text that is not a JSON list of messages") from None
    if not isinstance(raw, list):
        raise RowError(f"column '{column}' holds {type(raw).__name__}, not a list of messages")
    role_of = {tag["user_tag"]: "user", tag["assistant_tag"]: "assistant", tag["observation_tag"]: "tool",
               tag["function_tag"]: "function_call", tag["system_tag"]: "system"}
    messages: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"message {i} is {type(m).__name__}, not an object")
        raw_role = m.get(tag["role_tag"])
        if raw_role not in role_of:
            raise RowError(f"message {i} has role '{raw_role}' under key '{tag['role_tag']}'; known roles: "
                           f"{', '.join(map(str, role_of))} (set `tags` in dataset_info.json if yours differ)")
        role, content = role_of[raw_role], m.get(tag["content_tag"])
        if role == "assistant" and m.get("tool_calls"):  # OpenAI style: a tool call hidden in an assistant message
            role, content = "function_call", calls_content(m["tool_calls"])
        add_turn(messages, role, _content_text(content, i))
    system = _text(row, columns.get("system"))
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages = messages[1:]
    return messages, _tools(row, columns.get("tools", "tools" if openai else None))


def calls_content(tool_calls: list[Any]) -> str:
    """An assistant message's OpenAI `tool_calls` as a function_call turn's content: the call's JSON (a list for
    parallel calls). Training data and the serving engine both read OpenAI messages through here."""
    calls = [c.get("function", c) if isinstance(c, dict) else c for c in tool_calls]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def add_turn(messages: list[dict[str, str]], role: str, content: str) -> None:
    """Append a turn; consecutive tool results (the answers to parallel calls) become one tool turn."""
    if role == "tool" and messages and messages[-1]["role"] == "tool":
        messages[-1]["content"] += "\n" + content
    else:
        messages.append({"role": role, "content": content})


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)  # OpenAI content parts, text only
    if isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    raise RowError(f"message {i} content is {type(content).__name__}, not text")


def _tools(row: dict[str, Any], column: str | None) -> str | None:
    value = row.get(column) if column else None
    if value in (None, "", [], "[]"):
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"column '{column}' is not valid JSON") from None
        return value
    return json.dumps(value, ensure_ascii=False)


def detect_format(row: dict[str, Any], name: str, kind: str = "sft") -> tuple[str, dict[str, str], dict[str, str]]:
    """Guess (formatting, columns, tags) for a file not in dataset_info.json, from its first row."""
    extra = {c: c for c in ("chosen", "rejected", "kto_tag") if c in row}
    if kind == "text" and "text" in row:
        return "alpaca", {"prompt": "text"}, {}
    if kind == "pairs" and "instruction" in row and "chosen" in row:
        return "alpaca", {**{c: c for c in ("system", "history") if c in row}, **extra}, {}
    for column in ("messages", "conversations", "conversation"):
        msgs = row.get(column)
        if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
            columns = {"messages": column, **{c: c for c in ("system", "tools") if c in row}, **extra}
            if "role" in msgs[0]:
                return "openai", columns, {}
            if "from" in msgs[0]:
                return "sharegpt", columns, {}
    if "instruction" in row and ("output" in row or kind in ("text", "prompts")):
        return "alpaca", {**{c: c for c in ("system", "history") if c in row}, **extra}, {}
    plain = set(row) == {"text"} and kind != "text"
    hint = " It looks like plain text for pretraining, which only `stage: pt` trains on." if plain else ""
    raise ConfigError(
        f"Cannot tell the format of '{name}' from its columns ({', '.join(sorted(row))}).{hint} Register it in "
        "dataset_info.json with `formatting` and `columns` (alpaca: prompt/query/response; sharegpt: messages)."
    )
