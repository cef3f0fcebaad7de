"""lm-evaluation-harness's `peftkit` model type: local tasks (a JSON file, no network) scored through lm-eval, every
request checked against peftkit's own log-likelihood (`sequence_logps`) or a greedy loop written here."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import save_chat_model, save_random_lora
from transformers import AutoModelForCausalLM

from peftkit import TunedModel
from peftkit.cli import main
from peftkit.data.templates import IGNORE_INDEX
from peftkit.models import load_tokenizer
from peftkit.objectives.sequences import token_outputs

pytest.importorskip("lm_eval")

DOCS = [{"question": f"Q{i}: {i} plus {i % 3} is", "choices": [f"{i + i % 3}", f"{i + 1}", "none"],
         "answer": i % 3} for i in range(6)]
COMMON = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
          "test_split: test\n")
TASKS = {
    "pk_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
             "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    "pk_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
              "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
              "metric_list:\n  - metric: exact_match\n",
    "pk_roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{question}}'\n"
               "metric_list:\n  - metric: word_perplexity\n",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> SimpleNamespace:
    """A random byte-level Llama, a LoRA adapter on it (B != 0), and the local tasks over one JSON file."""
    root = tmp_path_factory.mktemp("harness")
    model_dir = save_chat_model(root / "model", initializer_range=0.5)
    save_random_lora(model_dir, root / "adapter", 0.3)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.json").write_text(json.dumps(DOCS))
    for name, body in TASKS.items():
        head = COMMON.format(data=tasks / "docs.json", cache=root / "datasets")
        (tasks / f"{name}.yaml").write_text(f"task: {name}\n{head}{body}")
    adapted = TunedModel.load(AutoModelForCausalLM.from_pretrained(model_dir), root / "adapter").eval()
    return SimpleNamespace(model_dir=model_dir, adapter=root / "adapter", tasks=tasks, adapted=adapted,
                           tokenizer=load_tokenizer(str(model_dir)))


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def evaluated(saved, offline) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import peftkit.evaluate.harness  # noqa: F401  (registers the model type)

    tasks = TaskManager(include_path=str(saved.tasks), include_defaults=False)  # only ours: no index of lm-eval's
    return lm_eval.simple_evaluate(model="peftkit", model_args=f"pretrained={saved.model_dir},adapter={saved.adapter}",
                                   tasks=list(TASKS), task_manager=tasks, batch_size=4, log_samples=True)


def split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the context's trailing spaces go to the continuation; an empty context is the BOS token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tokenizer.bos_token_id], tokenizer.encode(continuation)
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask


def own_loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """peftkit's own per-token log-probabilities (`token_outputs`, what the preference stages sum) of each
    continuation, summed in float64; greedy from the logits. One batch."""
    splits = [split(tokenizer, c, x) for c, x in pairs]
    ids, mask = right_padded([ctx + cont for ctx, cont in splits])
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (ctx, cont) in enumerate(splits):
        labels[i, len(ctx):len(ctx) + len(cont)] = torch.tensor(cont)
    with torch.no_grad():
        tokens = token_outputs(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        argmax = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    sums = torch.zeros(len(pairs), dtype=torch.float64).index_add(0, tokens.sequence, tokens.logps.double())
    greedy = [bool((argmax[i, len(ctx) - 1:len(ctx) + len(cont) - 1] == torch.tensor(cont)).all())
              for i, (ctx, cont) in enumerate(splits)]
    return list(zip(sums.tolist(), greedy))


def greedy_texts(model, tokenizer, prompts: list[str], new_tokens: int, stop: str) -> list[str]:
    """Greedy decoding written out: every row's argmax at its last token, eos ends a row, then cut at `stop`."""
    rows, done = [tokenizer.encode(p) for p in prompts], [False] * len(prompts)
    new: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(new_tokens):
            ids, mask = right_padded([r + n for r, n in zip(rows, new)])
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i in range(len(rows)):
                token = int(logits[i, int(mask[i].sum()) - 1].argmax())
                done[i] = done[i] or token == tokenizer.eos_token_id
                if not done[i]:
                    new[i].append(token)
    return [tokenizer.decode(n, skip_special_tokens=True).split(stop)[0] for n in new]


def accuracy(scores: list[float], docs: list[dict]) -> float:
    """multiple_choice's acc: the choice with the highest log-likelihood is the answer."""
    hits = [max(range(3), key=scores[3 * k:3 * k + 3].__getitem__) == doc["answer"] for k, doc in enumerate(docs)]
    return sum(hits) / len(hits)


def test_multiple_choice_loglikelihoods_equal_peftkits_own(saved, evaluated) -> None:
    samples = sorted(evaluated["samples"]["pk_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    pairs = [tuple(args) for s in samples for args in s["arguments"]]
    got = [resp for s in samples for [resp] in s["resps"]]
    own = own_loglikelihoods(saved.adapted, saved.tokenizer, pairs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, own)) <= 1e-5
    assert [g for _, g in got] == [g for _, g in own]
    assert evaluated["results"]["pk_mc"]["acc,none"] == pytest.approx(accuracy([v for v, _ in own], DOCS), abs=1e-12)


def test_rolling_loglikelihood_and_generation(saved, evaluated) -> None:
    """Rolling: the whole text given the BOS token. Generation: greedy tokens to max_gen_toks, cut at `until`."""
    rolled = sorted(evaluated["samples"]["pk_roll"], key=lambda s: s["doc_id"])
    own = own_loglikelihoods(saved.adapted, saved.tokenizer, [("", d["question"]) for d in DOCS])
    assert max(abs(s["resps"][0][0] - v) for s, (v, _) in zip(rolled, own)) <= 1e-5
    texts = [s["resps"][0][0] for s in sorted(evaluated["samples"]["pk_gen"], key=lambda s: s["doc_id"])]
    assert texts == greedy_texts(saved.adapted, saved.tokenizer, [d["question"] for d in DOCS], 6, "\n")
    assert any(texts)


def test_rolling_windows_cover_every_token_once(saved) -> None:
    """Texts longer than max_length: the first window predicts its tokens from BOS on, each later one predicts the
    next max_length tokens from the max_length tokens before each (lm-eval's `hf` convention), written out here."""
    from peftkit.evaluate.harness import PeftkitLM

    length = 8
    lm = PeftkitLM(pretrained=saved.adapted, tokenizer=saved.tokenizer, max_length=length, batch_size=3)
    texts = ["a longer text of some twenty-seven", "short", "exactly8"]
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts], disable_tqdm=True)
    for text, value in zip(texts, got):
        tokens = saved.tokenizer.encode(text)
        first = min(length, len(tokens))
        windows, done = [([saved.tokenizer.bos_token_id] + tokens[:first - 1], tokens[:first])], first
        while done < len(tokens):
            end = min(len(tokens), done + length)
            windows.append((tokens[end - length - 1:end - 1], tokens[done:end]))
            done = end
        total = 0.0
        with torch.no_grad():
            for inputs, targets in windows:
                logps = torch.log_softmax(saved.adapted(input_ids=torch.tensor([inputs])).logits[0].float(), -1)
                rows = logps[len(inputs) - len(targets):]
                total += float(rows.gather(1, torch.tensor(targets)[:, None]).sum())
        assert abs(value - total) <= 1e-5, text
    assert len(saved.tokenizer.encode(texts[0])) > 3 * length  # several windows, the last one partial


def test_peftkit_lm_eval_command(saved, offline, tmp_path, capsys) -> None:
    """`peftkit lm-eval` hands lm-eval's own arguments over, with the model type registered (base model here)."""
    out = tmp_path / "out"
    assert main(["lm-eval", "--model", "peftkit", "--model_args", f"pretrained={saved.model_dir}", "--tasks", "pk_mc",
                 "--include_path", str(saved.tasks), "--output_path", str(out)]) == 0
    assert "pk_mc" in capsys.readouterr().out  # lm-eval's table
    [written] = out.rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["pk_mc"]["acc,none"]
    base = AutoModelForCausalLM.from_pretrained(saved.model_dir).eval()
    own = own_loglikelihoods(base, saved.tokenizer, [(d["question"], " " + c) for d in DOCS for c in d["choices"]])
    assert acc == pytest.approx(accuracy([v for v, _ in own], DOCS), abs=1e-12)


def test_without_lm_eval_one_line_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails, as when it is not installed
    monkeypatch.delitem(sys.modules, "peftkit.evaluate.harness", raising=False)
    assert main(["lm-eval", "--model", "peftkit", "--tasks", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install lm-eval" in err
