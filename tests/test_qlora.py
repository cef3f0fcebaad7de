"""QLoRA: LoRA (and the other adapter methods) on a base model whose linear layers bitsandbytes keeps in 4 or 8 bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import helpers
import pytest
import torch
from helpers import changed, logits, make_cfg, read_log, snapshot, synthetic_examples, tiny_llama
from transformers import AutoModelForCausalLM

from peftkit import LoraConfig, TunedModel, available_methods, get_method
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.errors import ConfigError, ModelLoadError, PeftkitError
from peftkit.methods.lora import LoraLinear
from peftkit.models import load_model
from peftkit.quantization import QuantizationConfig, quantized_bits, quantized_storage, trained_quantization
from peftkit.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
NF4 = QuantizationConfig(4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama (grouped-query attention) saved as a model folder, the way a user's base model arrives."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(initializer_range=0.3).save_pretrained(folder)
    return folder


def quantized(base_dir: Path, q: QuantizationConfig = NF4) -> torch.nn.Module:
    return load_model(str(base_dir), dtype="float32", quantization=q).eval()


def qlora(base_dir: Path, q: QuantizationConfig = NF4, **lora) -> TunedModel:
    torch.manual_seed(0)
    return TunedModel(quantized(base_dir, q), LoraConfig(**{"r": 8, "target_modules": "all-linear", **lora}))


# --- the 4-bit base ---
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_load_quantizes_every_linear_in_blocks_of_64(base_dir, quant_type, double_quant) -> None:
    model = quantized(base_dir, QuantizationConfig(4, quant_type, double_quant))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, plus lm_head
    for name, module in linears.items():
        if name == "lm_head":  # transformers keeps the output head in full precision, as QLoRA does
            assert not isinstance(module, bnb.nn.Linear4bit)
            continue
        assert isinstance(module, bnb.nn.Linear4bit), name
        state = module.weight.quant_state
        assert (state.blocksize, state.quant_type, state.nested) == (64, quant_type, double_quant)
        assert state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)  # quantized constants
    for name, p in model.named_parameters():
        if "norm" in name:
            assert p.dtype == torch.float32, name  # norms stay in full precision
    assert quantized_bits(model) == 4


def test_lora_attaches_to_the_4bit_linears_with_the_hand_counted_parameters(base_dir) -> None:
    tuned = qlora(base_dir)
    layers = [m for m in tuned.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    # hidden 32, intermediate 64, 4 heads of 8 with 2 key/value heads (k, v: 16 out), rank 8: r * (in + out) each
    per_layer = 8 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    trainable, total = tuned.parameter_counts()
    assert trainable == 2 * per_layer == 8192
    full = sum(p.numel() for p in tiny_llama().parameters())  # a 4-bit weight counts what it stands for, not bytes
    assert total == full + trainable
    assert all(p.dtype == torch.float32 for _, p in tuned.trainable_parameters())


def test_training_lowers_the_loss_and_changes_only_lora(base_dir, tmp_path) -> None:
    tuned = qlora(base_dir)
    before = snapshot(tuned)
    packed = {n: m.weight.data.clone() for n, m in tuned.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    losses = helpers.train_losses(tuned, tmp_path, steps=30)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert changed(tuned, before) and all(".lora_" in n for n in changed(tuned, before))
    for name, module in tuned.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(module.weight.data, packed[name]), name


@pytest.fixture(scope="module")
def trained_adapter(base_dir, tmp_path_factory) -> Path:
    """A QLoRA adapter after a short run (so lora_B is not zero), saved by the trainer."""
    tmp = tmp_path_factory.mktemp("qlora_run")
    tuned = qlora(base_dir)
    helpers.train_losses(tuned, tmp, steps=10)
    return tmp / "out"


def test_save_load_round_trip_gives_identical_logits_on_the_4bit_base(base_dir, trained_adapter, input_ids) -> None:
    tuned = qlora(base_dir)
    tuned.load_adapter(trained_adapter, name="trained")
    tuned.set_adapter("trained")
    expected = logits(tuned, input_ids)
    reloaded = TunedModel.load(quantized(base_dir), trained_adapter)
    assert torch.equal(logits(reloaded, input_ids), expected)
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "quantization_bit" not in config  # plain PEFT LoRA


def test_peft_loads_the_adapter_onto_the_same_4bit_base(base_dir, trained_adapter, input_ids) -> None:
    from peft import PeftModel

    ours = logits(TunedModel.load(quantized(base_dir), trained_adapter), input_ids)
    peft_model = PeftModel.from_pretrained(quantized(base_dir), str(trained_adapter)).eval()
    assert "bnb" in type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__
    assert (logits(peft_model, input_ids) - ours).abs().max() <= 1e-4


def test_peft_loads_the_adapter_onto_a_full_precision_base(base_dir, trained_adapter, input_ids) -> None:
    from peft import PeftModel

    full = lambda: AutoModelForCausalLM.from_pretrained(base_dir).eval()  # noqa: E731
    ours = logits(TunedModel.load(full(), trained_adapter), input_ids)
    theirs = logits(PeftModel.from_pretrained(full(), str(trained_adapter)).eval(), input_ids)
    assert (theirs - ours).abs().max() <= 1e-5


def test_dora_on_the_4bit_base_matches_peft(base_dir, input_ids, tmp_path) -> None:
    """DoRA needs the base weight's norms: they come from the dequantized 4-bit weight, as in PEFT."""
    from peft import PeftModel

    tuned = qlora(base_dir, use_dora=True)
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    tuned.save(tmp_path / "dora")
    peft_model = PeftModel.from_pretrained(quantized(base_dir), str(tmp_path / "dora")).eval()
    assert (logits(peft_model, input_ids) - logits(tuned.eval(), input_ids)).abs().max() <= 1e-4


def test_resume_on_the_4bit_base_is_exact(base_dir, tmp_path) -> None:
    data = synthetic_examples(16)
    common = dict(max_steps=6, save_steps=2, lr_scheduler_type="cosine", warmup_steps=1)
    ref_cfg = make_cfg(tmp_path / "ref", **common)
    helpers.run(ref_cfg, data, qlora(base_dir, lora_dropout=0.1))
    reference = {e["step"]: e["loss"] for e in read_log(ref_cfg)}

    class Interrupt(Exception):
        pass

    def die(step: int) -> None:
        if step == 3:
            raise Interrupt

    cfg = make_cfg(tmp_path / "killed", **common)
    trainer = Trainer(cfg, qlora(base_dir, lora_dropout=0.1), data, SFTCollator(pad_token_id=0))
    trainer.method.on_step_end = die
    with pytest.raises(Interrupt):
        trainer.train()
    resumed_cfg = make_cfg(tmp_path / "killed", resume_from_checkpoint=True, **common)
    helpers.run(resumed_cfg, data, qlora(base_dir, lora_dropout=0.1))
    resumed = {e["step"]: e["loss"] for e in read_log(resumed_cfg)}
    for step in range(3, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_gradient_checkpointing_on_the_4bit_base_gives_the_same_losses(base_dir, tmp_path) -> None:
    data = synthetic_examples(8)
    plain, _ = helpers.run(make_cfg(tmp_path / "a", max_steps=3), data, qlora(base_dir))
    ckpt, _ = helpers.run(make_cfg(tmp_path / "b", max_steps=3, gradient_checkpointing=True), data, qlora(base_dir))
    assert [e["loss"] for e in read_log(plain.cfg)] == pytest.approx([e["loss"] for e in read_log(ckpt.cfg)], abs=1e-5)


# Each method's settings from its own test file: the learning rates that move it in a short run.
SETTINGS = {"adalora": dict(steps=30, lr=5e-2), "adapter": dict(steps=20, lr=5e-2),
            "bitfit": dict(steps=40, lr=1e-1, lr_scheduler_type="constant"),
            "ia3": dict(steps=15, lr=2e-1, per_device_train_batch_size=8),
            "ssf": dict(steps=15, lr=5e-2, per_device_train_batch_size=8), "lora_drop": dict(steps=20, lr=5e-2)}


@pytest.mark.parametrize("name", [n for n in available_methods() if not get_method(n).in_place and n != "lora"])
def test_other_adapter_methods_train_on_the_4bit_base(base_dir, tmp_path, name) -> None:
    cls = get_method(name)
    virtual = "num_virtual_tokens" in cls.config_class.__dataclass_fields__
    torch.manual_seed(0)
    tuned = TunedModel(quantized(base_dir), cls.config_class(**({"num_virtual_tokens": 4} if virtual else {})))
    settings = SETTINGS.get(name, dict(steps=40, lr=1e-1, per_device_train_batch_size=8))  # the virtual-token ones
    losses = helpers.train_losses(tuned, tmp_path, **settings)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


# --- merging ---
@pytest.mark.parametrize("bits", [4, 8])
def test_merging_into_the_quantized_model_is_refused_with_the_way_out(base_dir, bits) -> None:
    tuned = qlora(base_dir, QuantizationConfig(bits))
    with pytest.raises(PeftkitError,
                       match=f"Merging into a {bits}-bit quantized model is not possible.*peftkit export"):
        tuned.merge_and_unload()
    assert tuned.adapters  # nothing was changed or unloaded


def test_export_merges_a_qlora_adapter_on_the_full_precision_base_and_says_so(base_dir, trained_adapter, tmp_path,
                                                                               input_ids, capsys) -> None:
    from test_cli import save_word_tokenizer

    from peftkit.cli import main

    save_word_tokenizer(base_dir)
    assert trained_quantization(trained_adapter) is None  # a bare Trainer run records no TrainConfig quantization
    (trained_adapter / "train_config.json").write_text(json.dumps({"quantization_bit": 4}))
    assert trained_quantization(trained_adapter) == NF4
    out = tmp_path / "merged"
    assert main(["export", f"model_name_or_path={base_dir}", f"adapter_name_or_path={trained_adapter}",
                 f"export_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "trained against 4-bit quantized base weights" in printed
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert quantized_bits(merged) is None
    expected = logits(TunedModel.load(AutoModelForCausalLM.from_pretrained(base_dir).eval(), trained_adapter),
                      input_ids)
    assert (logits(merged, input_ids) - expected).abs().max() <= 1e-5


# --- 8 bits ---
def test_8bit_base_trains_lora(base_dir, tmp_path, input_ids) -> None:
    tuned = qlora(base_dir, QuantizationConfig(8))
    assert isinstance(tuned.model.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear8bitLt)
    losses = helpers.train_losses(tuned, tmp_path, steps=20)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    reloaded = TunedModel.load(quantized(base_dir, QuantizationConfig(8)), tmp_path / "out")
    assert torch.equal(logits(reloaded, input_ids), logits(tuned.eval(), input_ids))


# --- memory ---
@pytest.mark.slow
def test_smollm2_4bit_linear_weights_take_at_most_0_6_bytes_per_parameter(smollm2) -> None:
    model = load_model(smollm2, quantization=NF4)
    params, nbytes = quantized_storage(model)
    assert params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q o, k v (3 of 9 heads), gate up down
    assert nbytes / params <= 0.6  # NF4: 0.5; absmax per 64 in 8 bits: 1/64; second-level constants: ~nothing
    no_dq = quantized_storage(load_model(smollm2, quantization=QuantizationConfig(4, double_quant=False)))[1]
    assert nbytes < no_dq  # double quantization shrinks the constants from 4 bytes to 1 per block


# --- errors ---
def test_missing_bitsandbytes_names_the_install_command(base_dir, monkeypatch) -> None:
    import peftkit.quantization as quantization

    monkeypatch.setattr(quantization, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r'pip install "bitsandbytes>=0.50"'):
        quantized(base_dir)


def test_a_gguf_file_or_an_otherwise_quantized_checkpoint_is_refused(base_dir, tmp_path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="gguf file.*cannot quantize it"):
        load_model(str(gguf), quantization=NF4)
    quantized(base_dir).save_pretrained(tmp_path / "prequantized")
    with pytest.raises(ModelLoadError, match="already quantized in 4 bits; set quantization_bit: 4"):
        load_model(str(tmp_path / "prequantized"), quantization=QuantizationConfig(8))


def test_config_keys_and_their_errors() -> None:
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", "quantization_bit=4"])
    assert cfg.quantization() == QuantizationConfig(4, "nf4", True)
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", "quantization_bit=4", "quantization_type=fp4",
                             "double_quantization=false", "quantization_method=bnb"])
    assert cfg.quantization() == QuantizationConfig(4, "fp4", False)
    assert load_config(None, ["model_name_or_path=m", "dataset=d"]).quantization() is None
    for bad, message in [("quantization_bit=3", "must be 4 .* or 8"), ("quantization_type=int4", "nf4, fp4"),
                         ("quantization_method=hqq", "not supported; use bnb"),
                         ("finetuning_type=full", "trains the base weights themselves"),
                         ("finetuning_type=freeze", "trains the base weights themselves")]:
        extra = [] if "quantization_bit" in bad else ["quantization_bit=4"]
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model_name_or_path=m", "dataset=d", bad, *extra])


# --- end to end on the real model ---
@pytest.mark.slow
def test_qlora_train_chat_and_export_on_smollm2(smollm2, tmp_path) -> None:
    """`peftkit train` with quantization_bit: 4, then chat (on the 4-bit base, as trained) and export (merged on the
    full-precision base, with the note)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "qlora"
    cli = [sys.executable, "-m", "peftkit.cli"]
    done = subprocess.run(
        [*cli, "train", "examples/quickstart.yaml", f"model_name_or_path={smollm2}", f"output_dir={out}",
         "quantization_bit=4", "max_steps=3", "logging_steps=1", "save_steps=2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    assert trained_quantization(out) == NF4 and (out / "checkpoint-2" / "adapter_model.safetensors").is_file()

    done = subprocess.run([*cli, "chat", "--model", smollm2, "--adapter", str(out), "--once", "Who are you?",
                           "--max-new-tokens", "8"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    assert "Loading the base in 4-bit NF4 with double quantization" in done.stderr

    done = subprocess.run([*cli, "export", f"model_name_or_path={smollm2}", f"adapter_name_or_path={out}",
                           f"export_dir={tmp_path / 'merged'}"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained against 4-bit quantized base weights" in done.stdout
    assert (tmp_path / "merged" / "model.safetensors").is_file()
