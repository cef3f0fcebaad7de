"""Progressive shrinking (stage kd with shrink_*) on a tiny 6-layer Llama: block influence against a direct
computation, the schedule, a 3-layer result that plain transformers reloads with the trained student's logits and that
llama.cpp runs, a held-out loss below the same layers cut without training, exact resume, and refusals."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_chat_model
from test_gguf import make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from peftkit.cli import main
from peftkit.config import TrainConfig
from peftkit.data import SFTCollator, build_sft_dataset
from peftkit.errors import ConfigError
from peftkit.objectives import kd as kd_module
from peftkit.objectives.shrink import Shrinker, block_influence, decoder_layers, remove_layer
from peftkit.train import run_sft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    # BPE with merges, as llama.cpp wants
    return save_chat_model(tmp_path_factory.mktemp("shrink") / "teacher", make_tokenizer("gpt-2", vocab=400), seed=3,
                           hidden_size=48, intermediate_size=96, num_hidden_layers=6, initializer_range=0.1)


@pytest.fixture
def saved(monkeypatch) -> dict:
    """{"model": the trained student, as the run hands it to save_model_folder}, filled when the run saves."""
    models = {}
    original_save = kd_module.save_model_folder

    def spy(model, directory):
        models["model"] = model
        original_save(model, directory)

    monkeypatch.setattr(kd_module, "save_model_folder", spy)
    return models


def shrink_config(model: Path, out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(model), stage="kd", finetuning_type="full", shrink_target_layers=3,
                shrink_every=2, dataset="identity", dataset_dir=str(data), output_dir=str(out), cutoff_len=128,
                max_steps=10, max_samples=64, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                seed=0, bf16=False, overwrite_cache=True)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainConfig(**base)


def held_out_loss(model: torch.nn.Module, teacher: Path, data: Path, tmp: Path) -> float:
    """Mean answer-token loss on the last 16 identity rows (training reads the first 64)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    rows, _ = build_sft_dataset(tokenizer, "identity", str(data), cutoff_len=128, cache_dir=str(tmp / "c"))
    batch = SFTCollator(0)(rows[-16:])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100).item()


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(teacher) -> None:
    model = LlamaForCausalLM.from_pretrained(teacher).eval()
    batch = {"input_ids": torch.randint(3, 390, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        # hidden_states[i] is layer i's input; the last one has the final norm applied, so take layer 5's output here
        last = {}
        handle = model.model.layers[5].register_forward_hook(lambda m, a, o: last.setdefault("y", o))
        model(**batch)
        handle.remove()
    outputs = list(states[1:-1]) + [last["y"][0] if isinstance(last["y"], tuple) else last["y"]]
    mask = batch["attention_mask"].bool()
    expected = torch.stack([1 - F.cosine_similarity(x, y, dim=-1)[mask].mean() for x, y in zip(states[:-1], outputs)])
    got = block_influence(model, decoder_layers(model), [batch])
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)


def test_schedule_and_layer_removal(teacher) -> None:
    shrinker = Shrinker(2, ["3", "5"], None, "last")
    model = LlamaForCausalLM.from_pretrained(teacher)
    shrinker.bind(model)
    assert shrinker.schedule() == {3: 4, 5: 2}  # 6 -> 2 in two events: two layers each
    every = Shrinker(3, None, 2, "last")
    every.bind(model)
    assert every.schedule() == {2: 5, 4: 4, 6: 3}
    layers = decoder_layers(model)
    third = layers[3]
    gone = remove_layer(model, 2)
    assert model.config.num_hidden_layers == 5 and decoder_layers(model)[2] is third
    assert third.self_attn.layer_idx == 2 and len(gone) == sum(1 for _ in third.parameters())
    with pytest.raises(ConfigError, match="run has 5 steps"):
        every.check_run(5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_shrunk_model_reloads_learns_and_exports(teacher, tmp_path, saved, method) -> None:
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    out = tmp_path / method
    extra = dict(lora_rank=8, lora_target="all", learning_rate=5e-3) if method == "lora" else {}
    run_sft(shrink_config(teacher, out, data, finetuning_type=method, **extra))
    results = json.loads((out / "train_results.json").read_text())
    removed = results["shrink_removed_layers"]
    assert len(removed) == 3 and len(set(removed)) == 3
    assert results["teacher_forwards"] == 10
    assert not (out / "adapter_config.json").exists()  # a plain model folder, the adapter merged

    # plain transformers reloads the 3-layer student with exactly its trained logits
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    student = saved["model"].eval()
    ids = torch.randint(3, 390, (1, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)

    # it learnt: lower held-out loss than the same three layers cut from the teacher without training
    cut = LlamaForCausalLM.from_pretrained(teacher).eval()
    for original in removed:
        remove_layer(cut, [i for i in range(6) if i not in removed[:removed.index(original)]].index(original))
    assert cut.config.num_hidden_layers == 3
    trained, untrained = held_out_loss(reloaded, teacher, data, tmp_path), held_out_loss(cut, teacher, data, tmp_path)
    print(method, removed, trained, untrained)
    assert trained < untrained

    if method == "full":  # peftkit export makes a GGUF of it that llama.cpp runs with the same logits
        from test_gguf import llama, llama_logits

        assert main(["export", f"model_name_or_path={out}", f"export_dir={tmp_path / 'gguf'}",
                     "export_format=gguf", "export_gguf_type=f32"]) == 0
        tokens = ids[0].tolist()
        with llama(tmp_path / "gguf" / "model-f32.gguf", f32_kv=True) as llm:
            diff = np.abs(llama_logits(llm, tokens) - reloaded(input_ids=ids).logits[0].detach().numpy()).max()
        assert diff <= 1e-3, diff


def test_shrinking_resumes_exactly(teacher, tmp_path) -> None:
    """A run resumed from step 4 (two layers already gone) ends with the uninterrupted run's weights."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    whole = tmp_path / "whole"
    run_sft(shrink_config(teacher, whole, data, save_steps=4, shrink_criterion="block_influence"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    run_sft(shrink_config(teacher, resumed, data, save_steps=4, resume_from_checkpoint=str(resumed / "checkpoint-4")))
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((whole / "train_results.json").read_text())["shrink_removed_layers"]
            == json.loads((resumed / "train_results.json").read_text())["shrink_removed_layers"])


def test_shrinking_refusals_before_any_training(teacher, tmp_path, capsys) -> None:
    common = [f"model_name_or_path={teacher}", f"dataset_dir={EXAMPLES}", "dataset=identity", "stage=kd",
              "finetuning_type=full", "max_steps=4"]
    cases = [(["shrink_target_layers=6", "shrink_every=1"], "shrink_target_layers must be in [1, 5]"),
             (["shrink_target_layers=0", "shrink_every=1"], "shrink_target_layers must be at least 1"),
             (["shrink_target_layers=3"], "needs a schedule"),
             (["shrink_target_layers=3", "shrink_every=2"], "removes its last layer after step 6, but the run has 4"),
             (["shrink_target_layers=3", "shrink_steps=3,2"], "increasing step numbers"),
             (["shrink_target_layers=3", "shrink_every=1", "finetuning_type=ia3"], "full or lora")]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["train", *common, *extra, f"output_dir={out}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and err.startswith("error:"), err
        assert not out.exists() or not any(p.name.startswith("checkpoint") for p in out.iterdir())


@pytest.mark.slow
def test_smollm2_shrinks_from_30_to_20_layers(smollm2, tmp_path) -> None:
    """examples/shrink.yaml, shorter: SmolLM2-135M loses 10 layers (one per step) and trains 6 steps more; its
    held-out answer loss beats the same 20 layers cut from the teacher without training."""
    from peftkit.config import load_config
    from peftkit.models import load_model_and_tokenizer

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "shrunk"
    cfg = load_config(root / "examples" / "shrink.yaml", [
        f"output_dir={out}", f"dataset_dir={EXAMPLES}", "shrink_every=1", "max_steps=16", "eval_steps=16",
        "per_device_train_batch_size=4", "plot_loss=false"])
    run_sft(cfg)
    removed = json.loads((out / "train_results.json").read_text())["shrink_removed_layers"]
    assert len(removed) == 10
    shrunk = AutoModelForCausalLM.from_pretrained(out).eval()
    assert shrunk.config.num_hidden_layers == 20
    teacher, tokenizer = load_model_and_tokenizer(smollm2, dtype=torch.float32)
    kept = list(range(30))
    for original in removed:
        remove_layer(teacher, kept.index(original))
        kept.remove(original)
    rows, held = build_sft_dataset(tokenizer, "identity", str(EXAMPLES), cutoff_len=256, val_size=16, seed=42,
                                   cache_dir=str(tmp_path / "c"))

    def loss(model: torch.nn.Module) -> float:
        batch = SFTCollator(tokenizer.pad_token_id)(held)
        with torch.no_grad():
            logits = model.float()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100).item()

    trained, cut = loss(shrunk), loss(teacher)
    print(f"removed {removed}: held-out loss {trained:.3f} trained, {cut:.3f} cut without training")
    assert trained < cut


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shrinking_in_both_dtypes(teacher, tmp_path, monkeypatch, saved, dtype) -> None:
    """LoRA on a shrinking model with the base (and the teacher) in fp32 and in bf16, whichever this CPU would pick:
    PEFTKIT_DTYPE forces it. The saved 3-layer model is in that dtype and reloads with the trained logits."""
    monkeypatch.setenv("PEFTKIT_DTYPE", dtype)
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    out = tmp_path / dtype
    run_sft(shrink_config(teacher, out, data, finetuning_type="lora", lora_target="all", bf16=None, max_steps=6))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    expected = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert reloaded.config.num_hidden_layers == 3 and next(reloaded.parameters()).dtype == expected
    ids = torch.randint(3, 390, (1, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, saved["model"].eval()(input_ids=ids).logits)
