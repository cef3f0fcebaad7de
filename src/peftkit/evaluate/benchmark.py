"""`peftkit eval --task mmlu|cmmlu|ceval`: LLaMA-Factory's multiple-choice benchmarks (`llamafactory-cli eval`).

LLaMA-Factory reads each benchmark through a Hugging Face dataset script over a zip; here the benchmarks' own CSV files
are read as they are published, one file per subject and split, so nothing is downloaded at evaluation time:

    task_dir/<task>/mapping.json          {"<subject>": {"name": "abstract algebra", "category": "STEM"}, ...}
    task_dir/<task>/<split>/<subject>_<split>.csv   MMLU: no header, columns question,A,B,C,D,answer
                                                    C-Eval: header id,question,A,B,C,D,answer,explanation
    task_dir/<task>/<split>/<subject>.csv           CMMLU: header ,Question,A,B,C,D,Answer

`<split>` is `dev` (the solved examples shown before each question), `val` or `test`; a `data/` folder between the
task and its splits (as MMLU's tarball unpacks) is read too. Categories are LLaMA-Factory's: STEM, Social Sciences,
Humanities, Other.

Scoring is LLaMA-Factory's: the first `n_shot` dev rows as earlier user/assistant turns (the subject's system line
opening the first), rendered with the chat template; the logits at the prompt's last position for the four letters
(the last token of encoding each), softmax over those four, argmax is the prediction. LLaMA-Factory draws the shots
at random for every question; here they are the first `n_shot` rows, as the benchmarks' own scripts take them, so a
run repeats exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data import get_template
from ..errors import ConfigError
from ..io.atomic import atomic_write
from .predict import inference_template, load_evaluated

logger = logging.getLogger(__name__)

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")  # LLaMA-Factory's, in its order
AVERAGE = "Average"
RESULTS_NAME, LOG_NAME = "results.json", "results.log"
# LLaMA-Factory's eval templates: the system line opens the first question; each question ends with the answer cue
SYSTEM = {"en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
          "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"}
ANSWER = {"en": "\nAnswer:", "zh": "\n答案："}
# LLaMA-Factory's split names (its tasks mmlu_test, ceval_validation) and ours -> the benchmarks' folder names
SPLITS = {"test": "test", "validation": "val", "val": "val", "dev": "dev", "train": "dev"}
DEFAULT_SPLIT = {"ceval": "val"}  # C-Eval publishes no test answers; every other benchmark: test
LAYOUT = ("task_dir/<task>/mapping.json and task_dir/<task>/<dev|val|test>/<subject>_<split>.csv (MMLU, C-Eval) or "
          "<subject>.csv (CMMLU)")


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of CHOICES


@dataclasses.dataclass(frozen=True)
class Subject:
    key: str  # the files' name
    name: str  # as the prompt says it
    category: str


def parse_task(task: str) -> tuple[str, str]:
    """`mmlu_test` / `ceval_validation` (LLaMA-Factory's) or `mmlu` -> (benchmark folder, split folder)."""
    name, _, split = task.rpartition("_")
    if name and split in SPLITS:
        return name, SPLITS[split]
    return task, DEFAULT_SPLIT.get(task, "test")


def read_mapping(folder: Path) -> list[Subject]:
    """The subjects of `folder/mapping.json`, in its order."""
    path = folder / "mapping.json"
    if not path.is_file():
        raise ConfigError(f"No benchmark '{folder.name}' in {folder.parent}: {path} is missing. Set task_dir to the "
                          f"folder that holds {folder.name}/ (layout: {LAYOUT}).")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{path} must map each subject to {{\"name\": ..., \"category\": ...}}.")
    subjects = []
    for key, entry in mapping.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                entry.get("category"), str):
            raise ConfigError(f"{path}: subject '{key}' must be {{\"name\": ..., \"category\": ...}}, got {entry!r}.")
        subjects.append(Subject(key, entry["name"], entry["category"]))
    return subjects


def subject_file(folder: Path, subject: str, split: str) -> Path:
    """The subject's CSV for `split`, in MMLU's / C-Eval's naming or CMMLU's."""
    tried = [root / split / name for root in (folder, folder / "data")
             for name in (f"{subject}_{split}.csv", f"{subject}.csv")]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise ConfigError(f"No {split} file for subject '{subject}' of {folder.name}: looked for {tried[0]} and "
                          f"{tried[1]}. Put the benchmark's per-subject CSV files there (layout: {LAYOUT}).")
    return found


def read_questions(path: Path) -> list[Question]:
    """A subject file: headerless question,A,B,C,D,answer rows (MMLU), or a header naming those columns among others
    (C-Eval's id and explanation, CMMLU's index)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path} is not a UTF-8 CSV file ({e}).") from None
    wanted = ("question", *(c.lower() for c in CHOICES), "answer")
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if set(wanted) <= set(header):
        columns, start = [header.index(w) for w in wanted], 1
    else:
        columns, start = list(range(len(wanted))), 0
    questions = []
    for line, row in enumerate(rows[start:], start + 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns):
            raise ConfigError(f"{path} line {line}: {len(row)} columns; expected question,A,B,C,D,answer (MMLU, no "
                              "header), or a header naming question, A, B, C, D and answer (C-Eval, CMMLU).")
        question, *choices, answer = (row[c] for c in columns)
        answer = answer.strip()
        if answer not in CHOICES:
            hint = " (C-Eval's test split has no answers: use task ceval_validation)" if not answer else ""
            raise ConfigError(f"{path} line {line}: the answer must be one of A, B, C, D, got {answer!r}{hint}.")
        questions.append(Question(question, tuple(choices), answer))  # type: ignore[arg-type]
    if not questions:
        raise ConfigError(f"{path} holds no questions.")
    return questions


def _example(q: Question, lang: str) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.choices))
    return q.question + options + ANSWER[lang]


def question_messages(question: Question, shots: Sequence[Question], subject_name: str,
                      lang: str) -> list[dict[str, str]]:
    """The solved examples as earlier turns, then the question; the subject's system line opens the first turn."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": _example(shot, lang)}, {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": _example(question, lang)})
    messages[0]["content"] = SYSTEM[lang].format(subject=subject_name) + messages[0]["content"]
    return messages


def choice_token_ids(tokenizer: Any) -> list[int]:
    """The token each letter's encoding ends with (LLaMA-Factory's): `▁A` for SentencePiece, `A` for BPE."""
    return [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in CHOICES]


@torch.no_grad()
def predict_letters(model: Any, prompts: Sequence[list[int]], letter_ids: list[int], pad_id: int) -> list[str]:
    """One right-padded batch: softmax over the four letters' logits at each prompt's last token, argmax."""
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    device = next(model.parameters()).device
    last = lengths - 1
    keep = torch.unique(last)  # logits only where a prompt ends
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                   use_cache=False).logits
    at = logits[torch.arange(len(prompts), device=device), torch.searchsorted(keep, last).to(device)]
    probs = torch.softmax(at[:, letter_ids].float(), dim=-1)
    return [CHOICES[k] for k in probs.argmax(-1).tolist()]


def _benchmark_template(cfg: Any, tokenizer: Any) -> Any:
    """The config's template (or the adapter's); a tokenizer without a chat template (a base model) gets
    LLaMA-Factory's `fewshot`, which its evaluation examples use."""
    name = inference_template(cfg)
    if name is None and not getattr(tokenizer, "chat_template", None):
        logger.info("The tokenizer has no chat template: prompting with template fewshot.")
        name = "fewshot"
    return get_template(name, tokenizer, enable_thinking=cfg.enable_thinking)


def _prompt(template: Any, tokenizer: Any, question: Question, shots: list[Question], subject: Subject, lang: str,
            limit: int) -> tuple[list[int], bool]:
    """The question's prompt ids, dropping solved examples (the last first) until it fits `limit` tokens, as MMLU's
    own script does; (ids, whether it was shortened)."""
    for k in range(len(shots), -1, -1):
        text = template.render(question_messages(question, shots[:k], subject.name, lang), tokenizer,
                               add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return ids, k < len(shots)
    return ids[-limit:], True


def accuracy_table(accuracy: dict[str, float]) -> str:
    """LLaMA-Factory's score lines: `{category:>15}: {percent:.2f}`."""
    return "\n".join(f"{name:>15}: {value:.2f}" for name, value in accuracy.items())


def run_benchmark(cfg: Any, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate `cfg.task` from `cfg.task_dir`; write `results.json` (accuracies per category and subject, every
    prediction) and `results.log` (the score lines) to `output_dir`, and return what results.json holds."""

    task, split = parse_task(cfg.task)
    folder = Path(cfg.task_dir) / task
    subjects = read_mapping(folder)
    # every file is read (and checked) before the model loads: a bad row fails in a second, not after minutes
    data = {s.key: (read_questions(subject_file(folder, s.key, split)),
                    read_questions(subject_file(folder, s.key, "dev"))[:cfg.n_shot] if cfg.n_shot else [])
            for s in subjects}
    if model is None:
        model, tokenizer = load_evaluated(cfg)
    template = _benchmark_template(cfg, tokenizer)
    letter_ids = choice_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bs = cfg.per_device_eval_batch_size
    correct: dict[str, list[bool]] = {AVERAGE: []}
    per_subject: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, str]] = {}
    shortened = 0
    bar = tqdm(subjects, desc=f"{task} {split}", unit="subject", dynamic_ncols=True)
    for subject in bar:
        bar.set_postfix_str(subject.name)
        questions, shots = data[subject.key]
        prompts = []
        for q in questions:
            ids, cut = _prompt(template, tokenizer, q, shots, subject, cfg.lang, cfg.cutoff_len)
            prompts.append(ids)
            shortened += cut
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
        letters: dict[int, str] = {}
        for start in tqdm(range(0, len(order), bs), desc=subject.key, unit="batch", leave=False, dynamic_ncols=True):
            chunk = order[start:start + bs]
            letters.update(zip(chunk, predict_letters(model, [prompts[i] for i in chunk], letter_ids, pad_id)))
        hits = [letters[i] == q.answer for i, q in enumerate(questions)]
        correct[AVERAGE] += hits
        correct.setdefault(subject.category, []).extend(hits)
        per_subject[subject.key] = {"name": subject.name, "category": subject.category,
                                    "accuracy": 100 * sum(hits) / len(hits), "correct": sum(hits),
                                    "total": len(hits)}
        predictions[subject.key] = {str(i): letters[i] for i in range(len(questions))}
    if shortened:
        logger.warning("%d prompts were longer than cutoff_len (%d tokens) and were shown fewer solved examples.",
                       shortened, cfg.cutoff_len)
    order = [AVERAGE, *CATEGORIES, *(c for c in correct if c not in CATEGORIES and c != AVERAGE)]
    accuracy = {c: 100 * sum(correct[c]) / len(correct[c]) for c in order if correct.get(c)}
    results = {"task": task, "split": split, "n_shot": cfg.n_shot, "lang": cfg.lang, "accuracy": accuracy,
               "subjects": per_subject, "predictions": predictions}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / RESULTS_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    table = accuracy_table(accuracy) + "\n"
    atomic_write(out / LOG_NAME, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    return results
