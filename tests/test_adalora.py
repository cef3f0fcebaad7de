"""AdaLoRA: training prunes the total rank to the target budget, allocation matches PEFT's step by step, adapters move
both ways between peftkit and PEFT (pruned, with a rank_pattern), merging, checkpoint round trip, bad input."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from helpers import (
    changed,
    logits,
    make_cfg,
    randomize,
    rounding_tolerance,
    run,
    snapshot,
    synthetic_examples,
    tiny_gpt2,
    tiny_llama,
    train_losses,
)
from safetensors.torch import load_file

from peftkit import ConfigError, TunedModel
from peftkit.config import load_config
from peftkit.data import SFTCollator
from peftkit.io import peft_format
from peftkit.methods.adalora import AdaLora, AdaLoraConfig
from peftkit.train import Trainer

INIT_R, TARGET_R = 4, 2
N_LINEAR = 2 * 7  # tiny Llama: 2 layers x (q, k, v, o, gate, up, down)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for rounding: the same sums taken in another order, or with zero terms left out."""
    return (a - b).abs().max().item() <= rounding_tolerance(b)


def prune(method: AdaLora, pattern: dict[str, list[bool]]) -> None:
    """Impose a rank pattern by hand, as the allocation would leave it."""
    method.config.rank_pattern = pattern
    method._apply_pattern()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One short AdaLoRA run on every linear layer of a tiny Llama; several tests read its results."""
    tmp = tmp_path_factory.mktemp("adalora")
    tuned = TunedModel(tiny_llama(initializer_range=0.3), AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, target_modules="all-linear", lora_alpha=32, tinit=2, tfinal=4))
    start_ranks = tuned.method.ranks()
    before = snapshot(tuned.model)
    losses = train_losses(tuned, tmp, steps=20, lr=5e-2)
    return SimpleNamespace(tuned=tuned, losses=losses, before=before, start_ranks=start_ranks, out=tmp / "out")


def test_training_lowers_loss_and_prunes_to_target_budget(trained: SimpleNamespace) -> None:
    losses, method = trained.losses, trained.tuned.method
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses  # means: a step's loss is one batch of 2
    assert sum(trained.start_ranks.values()) == INIT_R * N_LINEAR == 56
    # PEFT's budget at total_step - tfinal is exactly target_r x modules; ties aside, the mask keeps exactly that
    assert sum(method.final_ranks.values()) == TARGET_R * N_LINEAR == 28
    assert len(set(method.final_ranks.values())) > 1  # allocated unevenly, not a uniform cut
    for path, layer in method.adalora_layers():  # pruned triplets stayed at λ = 0 through the last tfinal steps
        keep = torch.tensor(method.config.rank_pattern[path])
        assert sum(keep.tolist()) == method.final_ranks[path]
        assert torch.all(layer.lora_E["default"][~keep] == 0)
    assert "AdaLoRA ranks: 28 in all (started at 56, target 28)" in method.notes()[0]
    assert method.config.total_step == 20  # taken from the trainer


def test_only_adalora_parameters_change(trained: SimpleNamespace) -> None:
    moved = changed(trained.tuned.model, trained.before)
    assert moved and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_E", "lora_B") for n in moved), moved
    kept = {p for p, r in trained.tuned.method.final_ranks.items() if r > 0}  # a fully pruned λ ends where it began: 0
    assert kept <= {n.split(".lora_E.")[0] for n in moved if ".lora_E." in n}


def test_saved_adapter_is_pruned_and_loads_identically(trained: SimpleNamespace, input_ids: torch.Tensor) -> None:
    ranks = trained.tuned.method.final_ranks
    config = json.loads((trained.out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 20
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    tensors = load_file(trained.out / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"base_model.model.{q}.lora_A"].shape == (ranks[q], 32)
    assert tensors[f"base_model.model.{q}.lora_B"].shape == (32, ranks[q])
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E")) == 28
    assert not any("ranknum" in k for k in tensors)

    expected = logits(trained.tuned, input_ids)
    assert (expected - logits(tiny_llama(initializer_range=0.3), input_ids)).abs().max() > 1e-2
    ours = TunedModel.load(tiny_llama(initializer_range=0.3), trained.out)
    assert ours.method.ranks() == ranks
    assert close(logits(ours, input_ids), expected)  # fewer (zero) terms summed: not bitwise
    theirs = peft.PeftModel.from_pretrained(tiny_llama(initializer_range=0.3), trained.out).eval()
    assert close(logits(theirs, input_ids), expected)

    merged = ours.merge_and_unload()
    assert close(logits(merged, input_ids), expected)


def test_trainable_count_by_hand() -> None:
    tuned = TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]))
    # per layer, r = 4: q_proj 32->32: Q 4x32 + λ 4 + P 32x4 = 260; v_proj 32->16: Q 4x32 + λ 4 + P 16x4 = 196
    expected = 2 * (260 + 196)
    assert tuned.parameter_counts()[0] == expected
    assert tuned.trainable_report().splitlines()[0].startswith(f"trainable params: {expected:,d} ||")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_unmerged(arch: str, input_ids: torch.Tensor) -> None:
    make = tiny_gpt2 if arch == "gpt2" else tiny_llama
    tuned = TunedModel(make(), AdaLoraConfig(init_r=4, target_r=2, target_modules=None))
    randomize(tuned.method, 0.3)
    path = next(iter(tuned.method.ranks()))
    prune(tuned.method, {path: [True, False, True, False]})
    unmerged = logits(tuned, input_ids)
    tuned.merge_adapter()
    assert close(logits(tuned, input_ids), unmerged)
    tuned.unmerge_adapter()
    assert close(logits(tuned, input_ids), unmerged)


def test_gpt2_conv1d_to_peft_and_back(tmp_path, input_ids: torch.Tensor) -> None:
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"])
    tuned = TunedModel(tiny_gpt2(), cfg)
    assert cfg.fan_in_fan_out
    randomize(tuned.method, 0.3)
    attn, fc = "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"
    prune(tuned.method, {attn: [False] * 4, fc: [True, False, False, True]})  # attn fully pruned: zero-sized tensors
    expected = logits(tuned, input_ids)
    tuned.save(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert close(logits(theirs, input_ids), expected)
    theirs.save_pretrained(tmp_path / "theirs")
    back = TunedModel.load(tiny_gpt2(), tmp_path / "theirs")
    assert (back.method.ranks()[attn], back.method.ranks()[fc]) == (0, 2)
    assert close(logits(back, input_ids), expected)


def test_peft_trained_adapter_loads_in_peftkit(tmp_path, input_ids: torch.Tensor) -> None:
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM"))  # without a task type PEFT's forward skips the orthogonal regulariser
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-2)
    for step in range(1, 5):
        theirs(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.eval()
    expected = logits(theirs, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the zero-sized tensors of fully pruned modules
        theirs.save_pretrained(tmp_path)
    pattern = theirs.peft_config["default"].rank_pattern
    ours = TunedModel.load(tiny_llama(), tmp_path)
    assert sum(ours.method.ranks().values()) == 2 * 6
    assert ours.method.ranks() == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert close(logits(ours, input_ids), expected)


def test_allocation_matches_peft_step_by_step(input_ids: torch.Tensor) -> None:
    """Same weights and same gradients -> the same masks and λ as PEFT's RankAllocator, through warm-up (tinit),
    budgeting every deltaT steps, the final mask at total_step - tfinal, and the fixed phase after it."""
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=7, lora_alpha=8,
              target_modules=["q_proj", "v_proj", "o_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**kw, task_type="CAUSAL_LM"))
    ours = TunedModel(tiny_llama(), AdaLoraConfig(**kw)).method
    mine = dict(ours.trainable_parameters())
    pairs = [(p, mine[n.removeprefix("base_model.model.").replace(".default", "")])
             for n, p in theirs.named_parameters() if p.requires_grad]
    assert len(pairs) == len(mine) == 18
    with torch.no_grad():
        for p, q in pairs:
            p.add_(torch.randn_like(p) * 0.1)  # λ != 0 from the start, so all three importances are live
            q.copy_(p)
    ours.prepare(SimpleNamespace(total_steps=7))

    loss = theirs(input_ids=input_ids, labels=input_ids).loss  # PEFT adds the regulariser inside forward
    tuned_loss = ours.model(input_ids=input_ids, labels=input_ids).loss + ours.loss_term()
    assert abs(loss.item() - tuned_loss.item()) <= 1e-5

    opt = torch.optim.AdamW([p for p, _ in pairs], lr=2e-2)
    masked_counts = []
    for step in range(1, 8):
        theirs(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        with torch.no_grad():
            for p, q in pairs:
                q.copy_(p)
                q.grad = p.grad.clone()
        theirs.base_model.update_and_allocate(step)
        ours.on_step_end(step)
        opt.zero_grad()
        for p, q in pairs:
            assert torch.equal(p, q), step
        masked_counts.append(sum(int((q == 0).sum()) for p, q in pairs if q.shape[1:] == (1,)))
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            assert {k.removesuffix(".lora_E.default").removesuffix(".lora_E"): v for k, v in pattern.items()} \
                == ours.config.rank_pattern
    # step 1 (tinit): nothing pruned; budget 24 -> 12 over steps 2..5: step 2 int(12 * (3/4)^3 + 12) = 17 of 24 kept,
    # step 3 skipped (deltaT = 2), step 4 int(12 * (1/4)^3 + 12) = 12; step 5 = total_step - tfinal fixes the mask
    assert masked_counts[0] == 0 and masked_counts[1] == 24 - 17
    assert masked_counts[3:] == [12, 12, 12, 12]
    assert sum(ours.final_ranks.values()) == 12


def test_checkpoint_round_trip_restores_pruned_triplets(tmp_path, input_ids: torch.Tensor) -> None:
    """A checkpoint saved mid-run holds only kept triplets (PEFT's layout); resuming puts them back in full-rank
    layers and restores the rank pattern."""
    tuned = TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
    randomize(tuned.method, 0.3)
    pattern = {"model.layers.0.self_attn.q_proj": [True, False, False, True],
               "model.layers.1.self_attn.q_proj": [False, True, True, True]}
    prune(tuned.method, pattern)
    expected = logits(tuned, input_ids)
    peft_format.save_adapter(tuned.method, tmp_path, None)
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 32)
    fresh = TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"]))
    peft_format.load_weights(fresh.method, tmp_path)
    assert fresh.method.config.rank_pattern == pattern
    assert fresh.method.state_dict()["model.layers.1.self_attn.q_proj.lora_A"].shape == (4, 32)
    assert (logits(fresh, input_ids) - expected).abs().max() <= 1e-6


# --- bad input ---
@pytest.mark.parametrize("kwargs, match", [
    (dict(init_r=4, target_r=8), "target_r .8. is larger than init_r .4."),
    (dict(target_r=0), "target_r must be an integer >= 1"),
    (dict(init_r=0, target_r=0), "init_r must be an integer >= 1"),
    (dict(deltaT=0), "deltaT must be an integer >= 1"),
    (dict(beta1=1.0), "adalora_beta1"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight must be >= 0"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit=6 and tfinal=4 leave no step"),
])
def test_impossible_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**kwargs)


def test_yaml_keys_and_misplaced_keys() -> None:
    common = dict(model_name_or_path="x", dataset=["identity"])
    with pytest.raises(ConfigError, match="target_r .16. is larger than init_r .8."):
        load_config(None, **common, finetuning_type="adalora", init_r=8, target_r=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AdaLoRA's own keys do not warn
        cfg = load_config(None, **common, finetuning_type="adalora", init_r=6, target_r=3, adalora_beta2=0.9,
                          orth_reg_weight=0.1, lora_target="q_proj,v_proj")
    method_cfg = cfg.method_config()
    assert (method_cfg.init_r, method_cfg.target_r, method_cfg.beta2) == (6, 3, 0.9)
    assert method_cfg.target_modules == ["q_proj", "v_proj"]
    with pytest.warns(UserWarning, match="init_r is a setting of adalora, not of finetuning_type 'lora'"):
        load_config(None, **common, finetuning_type="lora", init_r=16)


def test_schedule_checked_against_trainer_steps_before_training(tmp_path) -> None:
    data, collator = synthetic_examples(4), SFTCollator(pad_token_id=0)
    tuned = TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="tinit=3 and tfinal=2 leave no step for rank allocation in 5 training steps"):
        Trainer(make_cfg(tmp_path, max_steps=5), tuned, data, collator)
    assert not (tmp_path / "out").exists()

    tuned = TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=100, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="total_step=100 differs from the 2 steps this run trains"):
        trainer, _ = run(make_cfg(tmp_path, max_steps=2), data, tuned)
    assert tuned.method.config.total_step == 2 and sum(tuned.method.final_ranks.values()) == 2 * 2
    pattern = dict(tuned.method.config.rank_pattern)
    with pytest.warns(UserWarning, match="ranks were already allocated"):  # a second run keeps the allocation
        run(make_cfg(tmp_path / "again", max_steps=2), data, tuned)
    assert tuned.method.config.rank_pattern == pattern
    for path, layer in tuned.method.adalora_layers():
        assert torch.all(layer.lora_E["default"][~torch.tensor(pattern[path])] == 0)

    with pytest.raises(ConfigError, match="needs total_step"):  # a loop of one's own must say how long it runs
        TunedModel(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"])).method.on_step_end(1)
