"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2: PEFT interop both ways, generation with the KV cache,
training, hand-counted parameters, gradient checkpointing, padding-free batches, resume, merge refusal."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import (
    VOCAB,
    changed,
    make_cfg,
    read_log,
    run,
    snapshot,
    synthetic_examples,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    train_losses,
)
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from peftkit import (
    ConfigError,
    PeftkitError,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    TunedModel,
)
from peftkit.train.checkpoint import TRAINED_NAME, list_checkpoints

P = 4
OURS = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=P),
    "p_tuning": lambda: PTuningConfig(num_virtual_tokens=P),
    "p_tuning_lstm": lambda: PTuningConfig(num_virtual_tokens=P, encoder_reparameterization_type="lstm"),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=P),
    "p_tuning_v2": lambda: PTuningV2Config(num_virtual_tokens=P, prefix_init="random"),  # PEFT's init
}
PEFT = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      encoder_reparameterization_type="LSTM"),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     prefix_projection=True),
    "p_tuning_v2": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
}
METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"]


def tiny_mistral(seed: int = 0, sliding_window: int | None = 5) -> MistralForCausalLM:
    """Grouped-query attention and a sliding window shorter than the test inputs, so the window binds."""
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=sliding_window)
    return MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def batch(rows: int = 3, length: int = 9, right_pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if right_pad and rows > 1:
        mask[1, length - 3:] = 0
        ids[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs).logits
    return out[:, -inputs["input_ids"].shape[1]:]  # PEFT's prompt tuning also returns the virtual tokens' logits


def real(out: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Only the positions of real tokens: what a padded position shows is not defined."""
    return out[inputs["attention_mask"].bool()]


def perturb(tuned: TunedModel, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuned.method.state_dict().values():
            t.add_(torch.randn(t.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("method", list(OURS))
def test_peft_adapter_loads_with_equal_logits(method: str, arch: str, tmp_path) -> None:
    make = MODELS[arch]
    oracle = peft.get_peft_model(make(), PEFT[method]()).eval()
    oracle.save_pretrained(tmp_path)
    oracle = peft.PeftModel.from_pretrained(make(), tmp_path).eval()  # the saved values, as a PEFT user runs them
    inputs = batch()
    ours = TunedModel.load(make(), tmp_path)
    assert ours.method.name == ("p_tuning" if method == "p_tuning_lstm" else method)
    diff = (real(logits(ours, inputs), inputs) - real(logits(oracle, inputs), inputs)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(OURS))
def test_our_adapter_loads_in_peft_with_equal_logits(method: str, arch: str, tmp_path) -> None:
    make = MODELS[arch]
    tuned = TunedModel(make(), OURS[method]())
    perturb(tuned)
    inputs = batch()
    ours = logits(tuned, inputs)
    tuned.save(tmp_path)
    oracle = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    diff = (real(ours, inputs) - real(logits(oracle, inputs), inputs)).abs().max().item()
    assert diff <= 1e-5, diff
    again = TunedModel.load(make(), tmp_path)  # and back: the saved values give exactly the trained logits
    assert torch.equal(real(logits(again, inputs), inputs), real(ours, inputs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(OURS))
def test_training_loss_and_gradients_equal_peft(method: str, arch: str) -> None:
    """In training mode too, with PEFT's own initial values copied in (encoders and MLPs included), on a batch with
    labels: the same loss and the same gradient for every trainable tensor."""
    def make() -> torch.nn.Module:  # no dropout: PEFT draws its masks over a longer input than ours
        model = MODELS[arch]()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    oracle = peft.get_peft_model(make(), PEFT[method]())
    tuned = TunedModel(make(), OURS[method]())
    theirs = [p for _, p in oracle.named_parameters() if p.requires_grad]
    ours = [p for _, p in tuned.trainable_parameters()]
    assert [tuple(p.shape) for p in ours] == [tuple(p.shape) for p in theirs]
    with torch.no_grad():
        for mine, their in zip(ours, theirs):
            mine.copy_(their)
    oracle.train()
    tuned.train()
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :3] = -100
    expected = oracle(**inputs, labels=labels).loss
    loss = tuned(**inputs, labels=labels).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    expected.backward()
    loss.backward()
    for mine, their in zip(ours, theirs):
        assert torch.allclose(mine.grad, their.grad, atol=1e-5), (mine.grad - their.grad).abs().max()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_equals_the_longer_input_it_stands_for(method: str, arch: str) -> None:
    """Independent of PEFT: input-level virtual tokens must act exactly like P embeddings placed before the input
    (Mistral: also when its sliding window hides them from later tokens)."""
    tuned = TunedModel(MODELS[arch](), OURS[method]())
    perturb(tuned)
    ids = batch(rows=2, length=9, right_pad=False)["input_ids"]
    layer = tuned.model.get_input_embeddings()
    with torch.no_grad():
        virtual = layer.sources["default"].saved_values()
        long = torch.cat([virtual[None].expand(2, -1, -1), layer(ids)], dim=1)
    with tuned.disable_adapter(), torch.no_grad():  # the plain base model on the longer input
        reference = tuned.model(inputs_embeds=long, use_cache=False).logits[:, P:]
    ours = logits(tuned, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert (ours - reference).abs().max().item() <= 1e-5


def greedy_by_recomputation(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with no cache: a full forward over the whole sequence for every new token."""
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recomputation(method: str, arch: str) -> None:
    tuned = TunedModel(MODELS[arch](), OURS[method]())
    perturb(tuned, scale=1.0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (6, 3, 5)]
    steps = 8
    expected = [greedy_by_recomputation(tuned, p[None], steps)[0] for p in prompts]
    one = tuned.generate(input_ids=prompts[0][None], attention_mask=torch.ones(1, 6, dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert one[0, 6:].tolist() == expected[0].tolist()
    width = max(len(p) for p in prompts)  # batch of 3, left-padded
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = tuned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert [row[width:].tolist() for row in out] == [e.tolist() for e in expected]
    assert len({tuple(e.tolist()) for e in expected}) > 1  # the rows differ, so mixing them up would show


# Tiny Llama: hidden 32, 2 layers, 2 key/value heads of 8 (kv width 16); P = 4 virtual tokens.
COUNTS = {
    "prompt_tuning": 4 * 32,
    "p_tuning": 4 * 32 + 3 * (32 * 32 + 32),  # embedding + MLP 32 -> 32 -> 32 -> 32
    "prefix_tuning": 4 * 16 + (16 * 16 + 16) + (16 * 64 + 64),  # embedding [4, 16] + MLP 16 -> 16 -> 2 * 2 * 16
    "p_tuning_v2": 4 * 2 * 2 * 16,  # [P, layers x (key, value) x kv width]
}


@pytest.mark.parametrize("method", list(OURS))
def test_trainable_count_by_hand_and_as_peft(method: str) -> None:
    tuned = TunedModel(tiny_llama(), OURS[method]())
    oracle = peft.get_peft_model(tiny_llama(), PEFT[method]())
    assert tuned.parameter_counts()[0] == oracle.get_nb_trainable_parameters()[0]
    if method != "p_tuning_lstm":  # the LSTM's count is PyTorch's formula; PEFT agreeing is the check there
        assert tuned.parameter_counts()[0] == COUNTS[method]
    assert "virtual tokens" in tuned.trainable_report()


def trainable_model(arch: str) -> torch.nn.Module:
    """Weights large enough (std 0.2) for the output to depend on what attention sees: with the default 0.02, the
    logits of a random 2-layer model hardly move whatever the prompt, so no prompt could lower the loss."""
    if arch == "llama":
        return tiny_llama(initializer_range=0.2)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_changes_only_prompt_parameters(method: str, arch: str, tmp_path) -> None:
    tuned = TunedModel(trainable_model(arch), OURS[method]())
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp_path, steps=40, lr=1e-1, per_device_train_batch_size=8)
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses  # measured: 0.38 to 0.8 of the first loss
    names = {n for n, _ in tuned.trainable_parameters()}
    assert names and all(".sources.default." in n for n in names)
    assert changed(tuned.model, before) == names
    inputs = batch()
    trained = logits(tuned.eval(), inputs)
    tuned.save(tmp_path / "adapter")
    again = TunedModel.load(trainable_model(arch), tmp_path / "adapter")
    assert torch.equal(real(logits(again, inputs), inputs), real(trained, inputs))


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_and_padding_free_give_the_same_losses(method: str, tmp_path) -> None:
    data = synthetic_examples(8)
    losses = {}
    for name, gc, pf in (("plain", False, False), ("checkpointed", True, False), ("padding_free", False, True),
                         ("both", True, True)):
        cfg = make_cfg(tmp_path / name, max_steps=3, gradient_checkpointing=gc)
        model = tiny_llama()
        model.config.attention_dropout = 0.0
        run(cfg, data, TunedModel(model, OURS[method]()), padding_free=pf)
        losses[name] = [e["loss"] for e in read_log(cfg) if "loss" in e]
    for name in ("checkpointed", "padding_free", "both"):
        assert losses[name] == pytest.approx(losses["plain"], abs=1e-5), name


class Interrupt(Exception):
    pass


def test_resume_restores_the_prompt_encoder_exactly(tmp_path) -> None:
    """The adapter file holds P-tuning's encoder output only; a checkpoint must also keep the encoder to resume."""
    data = synthetic_examples(12)
    common = dict(max_steps=6, save_steps=2, learning_rate=1e-2)
    reference_cfg = make_cfg(tmp_path / "ref", **common)
    run(reference_cfg, data, TunedModel(tiny_llama(), OURS["p_tuning"]()))
    reference = {e["step"]: e["loss"] for e in read_log(reference_cfg) if "loss" in e}

    from peftkit.data import SFTCollator
    from peftkit.train import Trainer

    cfg = make_cfg(tmp_path / "killed", **common)
    trainer = Trainer(cfg, TunedModel(tiny_llama(), OURS["p_tuning"]()), data, SFTCollator(pad_token_id=0))

    def die(step: int) -> None:
        if step == 3:
            raise Interrupt

    trainer.method.on_step_end = die
    with pytest.raises(Interrupt):
        trainer.train()
    checkpoint = list_checkpoints(cfg.output_dir)[-1]
    assert (checkpoint / TRAINED_NAME).is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    run(make_cfg(tmp_path / "killed", resume_from_checkpoint=True, **common), data,
        TunedModel(tiny_llama(), OURS["p_tuning"]()))
    resumed = {e["step"]: e["loss"] for e in read_log(cfg) if "loss" in e}
    for step in range(3, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_checkpoint_folder_is_a_peft_adapter(tmp_path) -> None:
    cfg = make_cfg(tmp_path, max_steps=3, save_steps=2)  # a checkpoint at step 2; the last step saves the adapter
    tuned = TunedModel(tiny_llama(), OURS["prefix_tuning"]())
    run(cfg, synthetic_examples(4), tuned)
    checkpoint = list_checkpoints(cfg.output_dir)[-1]
    assert (checkpoint / TRAINED_NAME).is_file()  # the MLP, for resuming
    oracle = peft.PeftModel.from_pretrained(tiny_llama(), checkpoint).eval()
    ours = TunedModel.load(tiny_llama(), checkpoint)
    inputs = batch()
    assert (real(logits(oracle, inputs), inputs) - real(logits(ours, inputs), inputs)).abs().max() <= 1e-5
    assert not torch.allclose(logits(ours, inputs), logits(tuned.eval(), inputs))  # step 2's prefix, not step 3's


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_refused_and_disable_gives_the_base_model(method: str, tmp_path) -> None:
    base = tiny_llama()
    inputs = batch()
    expected = logits(base, inputs)
    tuned = TunedModel(copy.deepcopy(base), OURS[method]())
    perturb(tuned)
    assert not torch.allclose(logits(tuned, inputs), expected)
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, inputs), expected)
    with pytest.raises(PeftkitError, match="cannot be merged"):
        tuned.merge_adapter()
    tuned.save(tmp_path / "adapter")
    from peftkit.export.merge import export_merged

    with pytest.raises(PeftkitError, match="cannot be merged"):
        export_merged("never-loaded", tmp_path / "adapter", tmp_path / "merged")  # refused before loading


def test_text_init_uses_the_phrase_embeddings(smollm2) -> None:
    from peftkit import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(smollm2)
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_text="Be brief:",
                                tokenizer_name_or_path=smollm2)
    tuned = TunedModel(model, config)
    ids = tokenizer("Be brief:", add_special_tokens=False)["input_ids"]
    ids = (ids * 5)[:5]
    table = model.get_input_embeddings().weight
    assert torch.equal(tuned.method.export_state()["model.embed_tokens.prompt_embeddings"], table[ids].float())


def test_p_tuning_v2_starts_from_the_models_own_keys_and_values_of_vocabulary_tokens() -> None:
    """prefix_init: vocab: the adapted model starts as the base model reading P random tokens before the input."""
    base, model = tiny_llama(), tiny_llama()
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (P,))
    torch.manual_seed(0)
    tuned = TunedModel(model, PTuningV2Config(num_virtual_tokens=P))
    ids = batch(rows=2, right_pad=False)["input_ids"]
    with torch.no_grad():
        expected = base(input_ids=torch.cat([tokens[None].expand(2, -1), ids], dim=1)).logits[:, P:]
    assert (logits(tuned, {"input_ids": ids}) - expected).abs().max() <= 1e-5


def test_bad_settings_fail_at_config_time() -> None:
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="text")
    with pytest.raises(ConfigError, match="random, vocab, text"):
        PromptTuningConfig(prompt_tuning_init="zeros")
    with pytest.raises(ConfigError, match="mlp, lstm"):
        PTuningConfig(encoder_reparameterization_type="gru")
    with pytest.raises(ConfigError, match="prefix_tuning"):
        PTuningV2Config(prefix_projection=True)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="vocab, random"):
        PTuningV2Config(prefix_init="zeros")


def test_adapter_for_another_model_is_refused(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(), OURS["p_tuning_v2"]())
    tuned.save(tmp_path)
    with pytest.raises(PeftkitError, match="num_layers 2"):
        TunedModel.load(tiny_mistral(sliding_window=None).__class__(
            MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)), tmp_path)


@pytest.mark.slow
def test_train_chat_and_export_on_smollm2(smollm2, tmp_path) -> None:
    """`peftkit train` with prefix tuning (padding-free, no fallback), then `peftkit chat` with the adapter, and
    `peftkit export` refusing to merge it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = tmp_path / "prefix"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, env=env,
                              cwd=root, timeout=600)

    done = cli("train", "examples/quickstart.yaml", "finetuning_type=prefix_tuning", "num_virtual_tokens=8",
               "learning_rate=3e-3", "max_steps=6", "logging_steps=1", "cutoff_len=128", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 virtual tokens" in done.stdout and "padding_free" not in done.stderr
    losses = [e["loss"] for e in read_log(make_cfg(tmp_path, output_dir=str(out))) if "loss" in e]
    assert min(losses[-2:]) < losses[0], losses
    answer = cli("chat", "--model", smollm2, "--adapter", str(out), "--once", "Who are you?", "--max-new-tokens", "16")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model_name_or_path: {smollm2}\nadapter_name_or_path: {out}\nexport_dir: {tmp_path / 'merged'}\n")
    refused = cli("export", str(cfg))
    assert refused.returncode != 0 and "cannot be merged" in refused.stderr
