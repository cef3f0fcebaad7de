"""Full fine-tuning: everything trains, tied embeddings stay tied, the output is a plain transformers model folder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import VOCAB, changed, logits, make_cfg, snapshot, synthetic_examples, tiny_llama, train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peftkit import AdapterLoadError, ConfigError, LoraConfig, TunedModel
from peftkit.cli import main
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.errors import PeftkitError
from peftkit.methods.full import FullConfig
from peftkit.train import Trainer

COMMON = dict(model_name_or_path="x", dataset=["identity"])


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama with lm_head tied to embed_tokens (as SmolLM2), and weights large enough to train quickly."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**tiny_llama().config.to_dict(), "tie_word_embeddings": True, "initializer_range": 0.2})
    return LlamaForCausalLM(cfg).eval()


def test_trains_everything_and_keeps_embeddings_tied(tmp_path) -> None:
    tuned = TunedModel(tied_llama(), FullConfig())
    model = tuned.model
    # tiny_llama: per layer q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072, gate/up/down 3 * 32*64 = 6144, two norms 64
    # -> 9280; two layers 18560 + embed_tokens 128*32 = 4096 + final norm 32; the tied lm_head adds nothing.
    expected = 2 * 9280 + 4096 + 32
    assert tuned.parameter_counts() == (expected, expected) == (22688, 22688)
    assert len(tuned.method.state_dict()) == len(list(model.parameters()))
    before = snapshot(model)
    losses = train_losses(tuned, tmp_path, steps=15, lr=1e-2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert changed(model, before) == set(before)  # every tensor moved
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "Gradients: 0.1 MiB" in tuned.trainable_report()


def test_save_is_a_transformers_model_folder(tmp_path, input_ids) -> None:
    tuned = TunedModel(tied_llama(), FullConfig())
    with torch.no_grad():
        tuned.model.model.embed_tokens.weight.add_(1.0)  # differs from a fresh model, and through the tied head too
    expected = logits(tuned, input_ids)
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text("{}\n")  # the run's own files survive
    (out / "adapter_config.json").write_text("{}")  # a stale adapter would hijack from_pretrained
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    tuned.save(out)

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "trainer_log.jsonl"]
    assert set(load_file(out / "model.safetensors")) == set(dict(tuned.model.named_parameters()))  # tied head once
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, input_ids), expected)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight

    with pytest.raises(AdapterLoadError, match="is a full model folder.*pass it as the model"):
        TunedModel.load(tied_llama(), out)
    # merged == unmerged trivially: the weights are the model's own
    assert torch.equal(logits(tuned.merge_and_unload(), input_ids), expected)


def test_trainer_output_chats_and_checkpoints_resume(tmp_path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<unk>", pad_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    data = synthetic_examples(8)

    def train(out: str, **kw) -> TunedModel:
        tuned = TunedModel(tied_llama(), FullConfig())
        cfg = make_cfg(tmp_path, output_dir=str(tmp_path / out), max_steps=4, save_steps=2, **kw)
        Trainer(cfg, tuned, data, SFTCollator(pad_token_id=0), tokenizer=tokenizer).train()
        return tuned

    straight = train("a")
    cfg = json.loads((tmp_path / "a" / "checkpoint-2" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PEFTKIT_FULL"
    resumed = train("b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert not torch.equal(straight.model.model.embed_tokens.weight, tied_llama().model.embed_tokens.weight)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name

    assert main(["chat", "--model", str(tmp_path / "a"), "--once", "w5 w6", "--max-new-tokens", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_bf16_model_trains_in_float32() -> None:
    tuned = TunedModel(tiny_llama().to(torch.bfloat16), FullConfig())
    assert {p.dtype for p in tuned.model.parameters()} == {torch.float32}
    assert "upcast from torch.bfloat16" in tuned.trainable_report()


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="target_modules .* does not apply to finetuning_type 'full'"):
        FullConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        load_config(None, **COMMON, finetuning_type="full", additional_target=["lm_head"])
    with pytest.warns(UserWarning, match="freeze_trainable_layers is a setting of freeze, not of finetuning_type 'fu"):
        load_config(None, **COMMON, finetuning_type="full", freeze_trainable_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(load_config(None, **COMMON, finetuning_type="full").method_config()) is FullConfig

    tuned = TunedModel(tiny_llama(), LoraConfig(r=2))
    with pytest.raises(ConfigError, match="'full' trains the base model's own weights"):
        tuned.add_adapter("all", FullConfig())
    tuned = TunedModel(tiny_llama(), FullConfig())
    with pytest.raises(PeftkitError, match="no base model left"):
        with tuned.disable_adapter():
            pass
