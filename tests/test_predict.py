"""Predict and eval: LLaMA-Factory's metrics checked by hand, batched left-padded generation, the output files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, TunedModel
from peftkit.cli import main
from peftkit.config import load_config
from peftkit.evaluate import run_predict, sample_scores, similarity
from peftkit.models import load_tokenizer, resolve_model_path
from peftkit.serve import ChatEngine, GenerationParams

DATA = "examples/data"


# --- metrics, against numbers worked out by hand ---
def test_chinese_pair_by_hand() -> None:
    """Prediction 我爱北京天安门 (7 chars; jieba: 我/爱/北京/天安门), label 我爱北京 (4 chars; 我/爱/北京).
    BLEU-4 on characters: precisions 4/7, 3/6, 2/5, 1/4, no brevity penalty (7 > 4): (4/7 * 3/6 * 2/5 * 1/4)^(1/4).
    ROUGE-1: 3 of 4 predicted words match, all 3 label words: F = 2 * 3/4 * 1 / (3/4 + 1) = 6/7.
    ROUGE-2: bigrams 我爱, 爱北京 match of 3 predicted: F = 2 * 2/3 * 1 / (2/3 + 1) = 4/5. ROUGE-L: LCS 3 words, 6/7."""
    scores = sample_scores("我爱北京天安门", "我爱北京")
    assert scores["bleu-4"] == pytest.approx(100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-3)
    assert scores["rouge-1"] == pytest.approx(100 * 6 / 7, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(80.0, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(100 * 6 / 7, abs=1e-3)


def test_english_pairs_by_hand() -> None:
    """'the cat sat on the mat' vs 'the cat is on the mat': distinct unigrams {the cat sat on mat} vs {the cat is on
    mat}, 4 shared: F = 4/5. Bigrams: the cat, on the, the mat shared of 5 each: 3/5. LCS: the cat on the mat, 5 of 6
    words each side: 5/6. BLEU on characters: 'abcdef' against 'abcdefgh' matches every n-gram, so only the brevity
    penalty exp(1 - 8/6) remains."""
    scores = sample_scores("the cat sat on the mat", "the cat is on the mat")
    assert (scores["rouge-1"], scores["rouge-2"]) == pytest.approx((80.0, 60.0), abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert sample_scores("abcdef", "abcdefgh")["bleu-4"] == pytest.approx(100 * math.exp(1 - 8 / 6), abs=1e-3)
    assert sample_scores("", "the cat") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_similarity_averages_samples_and_adds_corpus_bleu() -> None:
    preds, labels = ["我爱北京天安门", "", "the cat sat on the mat"], ["我爱北京", "x", "the cat sat on the mat"]
    scores = similarity(preds, labels)
    per = [sample_scores(p, lab) for p, lab in zip(preds, labels)]
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert scores[key] == pytest.approx(sum(s[key] for s in per) / 3, abs=1e-3)
    assert per[2]["bleu-4"] == pytest.approx(100.0) and per[2]["rouge-l"] == pytest.approx(100.0)
    assert 0 < scores["sacrebleu"] < 100
    same = "the quick brown fox jumps over the lazy dog"
    assert similarity([same], [same])["sacrebleu"] == pytest.approx(100.0)


# --- generation ---
@pytest.fixture(scope="module")
def small_model_dir(smollm2_home, tmp_path_factory):
    """A random 2-layer Llama with smollm2's vocabulary, saved with smollm2's tokenizer (ChatML template): real
    prompts and templates, generation in milliseconds."""
    folder = tmp_path_factory.mktemp("small_llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKIT_HOME", str(smollm2_home))
        tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_batched_left_padded_generation_equals_one_at_a_time(small_model_dir) -> None:
    from peftkit.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(small_model_dir))
    engine = ChatEngine(model, tokenizer)
    prompts = [engine.prompt_ids([{"role": "user", "content": text}])
               for text in ("Hi", "Who are you? Tell me all about yourself.", "What is one plus one?")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is padded
    params = GenerationParams(max_new_tokens=12)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [len(p) for p in prompts]
    assert all(c.completion_tokens <= 12 and c.finish_reason in ("stop", "length") for c in batched)


def predict_cfg(model_dir, tmp_path, **kw):
    settings = dict(model_name_or_path=str(model_dir), eval_dataset="identity", dataset_dir=DATA, max_samples=5,
                    max_new_tokens=8, per_device_eval_batch_size=2, output_dir=str(tmp_path / "pred"), do_train=False,
                    do_predict=True)
    return load_config(None, **{**settings, **kw})


def test_predict_writes_llama_factory_files(small_model_dir, tmp_path) -> None:
    results = run_predict(predict_cfg(small_model_dir, tmp_path))
    keys = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
            "predict_samples_per_second", "predict_steps_per_second", "predict_sacrebleu",
            "predict_model_preparation_time"}
    text = (tmp_path / "pred" / "predict_results.json").read_text()
    assert keys == set(results) == set(json.loads(text))
    assert text == json.dumps(results, indent=4, sort_keys=True) + "\n"  # as transformers' save_metrics writes it
    assert 0 <= results["predict_model_preparation_time"] < results["predict_runtime"]
    rows = [json.loads(line) for line in (tmp_path / "pred" / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(list(r)[:3] == ["prompt", "predict", "label"] and "messages" in r for r in rows)
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and "Ember" in rows[0]["label"]
    scored = similarity([r["predict"] for r in rows], [r["label"] for r in rows])
    assert results["predict_bleu-4"] == scored["bleu-4"]
    # batch size changes nothing (left padding; greedy)
    again = run_predict(predict_cfg(small_model_dir, tmp_path / "b1", per_device_eval_batch_size=1))
    assert again["predict_rouge-l"] == results["predict_rouge-l"]


def test_predict_and_eval_commands_with_an_adapter(small_model_dir, tmp_path, capsys) -> None:
    from peftkit.models import load_model

    tuned = TunedModel(load_model(str(small_model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.5)
    tuned.save(tmp_path / "adapter")
    common = [f"model_name_or_path={small_model_dir}", "eval_dataset=identity", f"dataset_dir={DATA}", "max_samples=4"]
    assert main(["eval", "/dev/null", *common, f"output_dir={tmp_path / 'e0'}"]) == 0
    base = json.loads((tmp_path / "e0" / "eval_results.json").read_text())
    assert main(["eval", "/dev/null", *common, f"adapter_name_or_path={tmp_path / 'adapter'}",
                 f"output_dir={tmp_path / 'e1'}"]) == 0
    adapted = json.loads((tmp_path / "e1" / "eval_results.json").read_text())
    assert base["eval_perplexity"] == pytest.approx(math.exp(base["eval_loss"]), rel=1e-4)
    assert base["eval_samples"] == adapted["eval_samples"] == 4 and base["eval_loss"] != adapted["eval_loss"]
    assert main(["predict", "/dev/null", *common, f"adapter_name_or_path={tmp_path / 'adapter'}", "max_new_tokens=4",
                 f"output_dir={tmp_path / 'p'}"]) == 0
    assert "predict_rouge-l" in capsys.readouterr().out
    assert main(["predict", "/dev/null", *common, "max_new_tokens=4", f"output_dir={tmp_path / 'p0'}"]) == 0
    read = lambda d: [json.loads(x)["predict"]  # noqa: E731
                      for x in (tmp_path / d / "generated_predictions.jsonl").read_text().splitlines()]
    assert read("p") != read("p0")  # the adapter was used


def test_train_with_do_predict_predicts_with_the_trained_adapter(small_model_dir, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["train", "/dev/null", f"model_name_or_path={small_model_dir}", "dataset=identity",
                 "eval_dataset=identity", f"dataset_dir={DATA}", "max_samples=4", "max_steps=2", "do_predict=true",
                 "max_new_tokens=4", "learning_rate=1e-3", f"output_dir={out}"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "predict_results.json").is_file()


def test_llama_factory_predict_config_needs_no_do_train(small_model_dir) -> None:
    """LLaMA-Factory's predict examples set do_predict and eval_dataset but no dataset and no do_train."""
    cfg = load_config(None, model_name_or_path=str(small_model_dir), do_predict=True, eval_dataset="identity",
                      predict_with_generate=True)
    assert cfg.do_train is False and cfg.do_predict


def test_train_with_nothing_to_do_says_so(capsys) -> None:
    assert main(["train", "/dev/null", "model_name_or_path=m"]) == 1
    assert "Nothing to do" in capsys.readouterr().err


def test_predict_and_eval_follow_the_template_the_adapter_was_trained_with(small_model_dir, tmp_path) -> None:
    from peftkit.evaluate import run_eval
    from peftkit.models import load_model

    tuned = TunedModel(load_model(str(small_model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    tuned.save(tmp_path / "adapter")
    (tmp_path / "adapter" / "train_config.json").write_text(json.dumps({"template": "alpaca"}))
    common = dict(adapter_name_or_path=str(tmp_path / "adapter"), max_samples=2, max_new_tokens=2)

    def first_prompt(out: str, **kw) -> str:
        run_predict(predict_cfg(small_model_dir, tmp_path / out, **common, **kw))
        lines = (tmp_path / out / "pred" / "generated_predictions.jsonl").read_text().splitlines()
        return json.loads(lines[0])["prompt"]

    assert first_prompt("recorded").startswith("Below is an instruction that describes a task.")
    assert first_prompt("chatml", template="chatml").startswith("<|im_start|>user\n")  # the config overrides
    losses = {name: run_eval(predict_cfg(small_model_dir, tmp_path / f"e-{name}", **common, **kw))["eval_loss"]
              for name, kw in (("recorded", {}), ("alpaca", {"template": "alpaca"}),
                               ("chatml", {"template": "chatml"}))}
    assert losses["recorded"] == losses["alpaca"] != losses["chatml"]
