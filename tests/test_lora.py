"""LoRA, rsLoRA and DoRA: training, PEFT interop both ways, merging, adapter switching, bad input."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import ATOL, TINY_MODELS, logits, randomize, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import peftkit
from peftkit import AdapterLoadError, ConfigError, LoraConfig, TunedModel


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_only_adapter_params_train(arch: str, input_ids: torch.Tensor) -> None:
    base = TINY_MODELS[arch]()
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    tuned = TunedModel(base, LoraConfig(r=4, lora_alpha=8))
    tuned.train()
    names = [n for n, _ in tuned.trainable_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    opt = torch.optim.AdamW([p for _, p in tuned.trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = tuned(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        for n, p in tuned.model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = {n.replace(".base_layer", ""): p for n, p in tuned.model.named_parameters() if "lora_" not in n}
    for n, p in after.items():
        assert torch.equal(p, frozen_before[n]), f"base parameter {n} changed"


def test_trainable_report_matches_hand_count() -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # per layer: q_proj 32->32: A 4x32 + B 32x4 = 256; v_proj 32->16 (2 kv heads x 8): A 4x32 + B 16x4 = 192
    expected = 2 * (256 + 192)
    trainable, total = tuned.parameter_counts()
    assert trainable == expected
    first, second = tuned.trainable_report().splitlines()
    assert first == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                     f"trainable%: {100 * expected / total:.4f}")
    assert second.startswith(f"AdamW state: {8 * expected / 2**20:,.1f} MiB")


VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "embedding_and_head": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                               modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peftkit_adapter_loads_in_peft(variant: str, tmp_path, input_ids) -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(**VARIANTS[variant]))
    randomize(tuned.method, 0.2)
    ours = logits(tuned, input_ids)
    tuned.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert (logits(tiny_llama(), input_ids) - ours).abs().max() > 1e-3  # the adapter does change the output
    assert (logits(theirs, input_ids) - ours).abs().max() <= ATOL


PEFT_VARIANTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
    "embedding_dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["embed_tokens", "o_proj"]),
    "bias_all": dict(r=2, lora_alpha=4, bias="all", target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
def test_peft_adapter_loads_in_peftkit(variant: str, tmp_path, input_ids) -> None:
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **PEFT_VARIANTS[variant]))
    with torch.no_grad():  # perturb all trainable tensors: biases and saved modules too
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    ours = TunedModel.load(tiny_llama(), tmp_path)
    assert (logits(ours, input_ids) - expected).abs().max() <= ATOL


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_interop(use_dora: bool, tmp_path, input_ids) -> None:
    tuned = TunedModel(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, bias="lora_only"))
    assert tuned.method.config.target_modules == ["c_attn"] and tuned.method.config.fan_in_fan_out
    randomize(tuned.method, 0.2)
    ours = logits(tuned, input_ids)
    tuned.save(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert (logits(theirs, input_ids) - ours).abs().max() <= ATOL

    theirs.save_pretrained(tmp_path / "theirs")
    back = TunedModel.load(tiny_gpt2(), tmp_path / "theirs")
    assert (logits(back, input_ids) - ours).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["lora", "dora", "embedding_dora", "gpt2"])
def test_merge_and_unload(variant: str, tmp_path, input_ids) -> None:
    make = tiny_gpt2 if variant == "gpt2" else tiny_llama
    kwargs = {
        "lora": dict(target_modules="all-linear"),
        "dora": dict(use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
        "embedding_dora": dict(use_dora=True, target_modules=["embed_tokens", "gate_proj"]),
        "gpt2": dict(use_dora=True, target_modules=["c_attn", "c_fc"]),
    }[variant]
    tuned = TunedModel(make(), LoraConfig(r=4, lora_alpha=8, **kwargs))
    randomize(tuned.method, 0.2)
    unmerged = logits(tuned, input_ids)

    tuned.merge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL
    tuned.unmerge_adapter()
    assert (logits(tuned, input_ids) - unmerged).abs().max() <= ATOL

    merged = tuned.merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.AdapterLayer) for m in merged.modules())
    assert (logits(merged, input_ids) - unmerged).abs().max() <= ATOL
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, input_ids) - unmerged).abs().max() <= ATOL


def test_two_adapters_switch_and_disable(tmp_path, input_ids) -> None:
    base_logits = logits(tiny_llama(), input_ids)
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="sql")
    randomize(tuned.method, 0.2, seed=1)
    tuned.add_adapter("chat", LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "o_proj"]))
    assert tuned.active_adapter == "sql"
    assert [p for p, _ in tuned.adapters["chat"].layers()] == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "o_proj")
    ]
    sql = logits(tuned, input_ids)
    tuned.set_adapter("chat")
    randomize(tuned.method, 0.2, seed=2)
    chat = logits(tuned, input_ids)
    assert (sql - chat).abs().max() > 1e-3
    assert (sql - base_logits).abs().max() > 1e-3
    # only the active adapter trains
    assert all(".chat" in n for n, _ in tuned.trainable_parameters())
    with tuned.disable_adapter():
        assert torch.equal(logits(tuned, input_ids), base_logits)
    tuned.set_adapter("sql")
    assert torch.equal(logits(tuned, input_ids), sql)

    # both survive a save/load round trip and still switch
    tuned.save(tmp_path)
    assert ((tmp_path / "sql" / "adapter_config.json").is_file()
            and (tmp_path / "chat" / "adapter_model.safetensors").is_file())
    again = TunedModel.load(tiny_llama(), tmp_path / "sql", name="sql")
    again.load_adapter(tmp_path / "chat", name="chat")
    assert torch.equal(logits(again, input_ids), sql)
    again.set_adapter("chat")
    assert (logits(again, input_ids) - chat).abs().max() <= ATOL


def test_layers_to_transform_and_regex() -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert [p for p, _ in tuned.method.layers()] == ["model.layers.1.self_attn.q_proj"]
    tuned = TunedModel(tiny_llama(), LoraConfig(target_modules=r".*\.0\.mlp\.(up|down)_proj"))
    assert [p for p, _ in tuned.method.layers()] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    tuned = TunedModel(tiny_llama(), LoraConfig(target_modules="all-linear"))
    paths = [p for p, _ in tuned.method.layers()]
    assert len(paths) == 2 * 7 and "lm_head" not in paths


# --- bad input ---
def test_unknown_method_name() -> None:
    with pytest.raises(ConfigError, match="Unknown method 'lorra'.*Did you mean 'lora'"):
        peftkit.get_method("lorra")


def test_target_matching_nothing_lists_candidates() -> None:
    with pytest.raises(ConfigError, match="matched no module.*q_proj") as e:
        TunedModel(tiny_llama(), LoraConfig(target_modules=["query_key_value"]))
    assert "down_proj" in str(e.value)


def test_invalid_config_values() -> None:
    with pytest.raises(ConfigError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="bias must be one of"):
        LoraConfig(bias="some")
    with pytest.raises(ConfigError, match="Did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"lora_alpah": 3})


def test_adapter_for_another_model(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4))
    tuned.save(tmp_path)
    bigger = AutoModelForCausalLM.from_config(
        tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(), "hidden_size": 64, "head_dim": 16})
    )
    with pytest.raises(AdapterLoadError,
                       match=r"Shape mismatch for 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                             r"lora_A\.weight'"):
        TunedModel.load(bigger, tmp_path)
    with pytest.raises(AdapterLoadError, match="does not fit this base model"):
        TunedModel.load(tiny_gpt2(), tmp_path)


def test_corrupt_and_missing_files(tmp_path) -> None:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4))
    tuned.save(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        TunedModel.load(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        TunedModel.load(tiny_llama(), tmp_path)
    with pytest.raises(AdapterLoadError, match="nowhere. does not exist"):
        TunedModel.load(tiny_llama(), tmp_path / "nowhere")


def test_a_module_carries_one_method() -> None:
    """LoRA on a layer IA3 already wraps is refused, naming the layer, instead of nesting wrappers."""
    from peftkit import ConfigError, Ia3Config

    tuned = TunedModel(tiny_llama(), Ia3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match=r"k_proj' already carries a Ia3Layer; lora cannot wrap it again"):
        tuned.add_adapter("lora", LoraConfig(r=4, target_modules=["k_proj"]))


def test_bf16_training_product_matches_fp32_product(input_ids) -> None:
    """On a bf16 base, training computes B A x in bf16 (fast path); inference in fp32, as PEFT. Same loss and
    gradients up to bf16 rounding; the parameters stay fp32."""
    tuned = TunedModel(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   init_lora_weights=False))

    def loss_and_grads(training: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tuned.train(training)
        loss = tuned(input_ids=input_ids, labels=input_ids).loss
        params = [p for _, p in tuned.trainable_parameters()]
        return loss.float(), [g.float() for g in torch.autograd.grad(loss, params)]

    fast, slow = loss_and_grads(True), loss_and_grads(False)
    assert {p.dtype for _, p in tuned.trainable_parameters()} == {torch.float32}
    assert abs(fast[0] - slow[0]) <= 1e-2 * slow[0]
    for a, b in zip(fast[1], slow[1]):
        assert (a - b).norm() <= 1e-1 * b.norm()  # 4-6%: bf16 rounding differs by CPU (5.8% without AVX-512)


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_fp32_training_product_matches_the_inference_product(variant: str, input_ids) -> None:
    """Training on an fp32 base folds the scaling and the sum into one addmm, its rank-r products in other layouts;
    inference keeps PEFT's `B(A x) * s` added to the base output. Same loss and gradients up to summation order
    (GPT-2: Conv1D's transposed weight)."""
    base = (tiny_gpt2 if variant == "gpt2" else tiny_llama)()
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # GPT-2's own dropout: training and inference then differ only in the LoRA product
    tuned = TunedModel(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))

    def loss_and_grads(training: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tuned.train(training)
        loss = tuned(input_ids=input_ids, labels=input_ids).loss
        return loss, list(torch.autograd.grad(loss, [p for _, p in tuned.trainable_parameters()]))

    fused, plain = loss_and_grads(True), loss_and_grads(False)
    assert torch.allclose(fused[0], plain[0], rtol=1e-6, atol=0)
    for a, b in zip(fused[1], plain[1]):  # fp32 summation order: each gradient within 1e-5 of its norm
        assert (a - b).norm() <= 1e-5 * b.norm()
