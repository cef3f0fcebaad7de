"""Preference losses (dpo and kto stages) against TRL 1.16 as the oracle, and one full step's gradients.

TRL's own code computes the reference numbers: `DPOTrainer._compute_loss`, `CPOTrainer.cpo_loss`,
`ORPOTrainer.odds_ratio_loss` and `KTOTrainer._compute_loss` are called unbound on fake trainers (SimpleNamespace
with the attributes they read) and a fake model that returns what TRL's fused LM head returns: per-token log-probs of
the labels, 0 where a label is -100. The fake model is a unigram table (the log-prob of token v is table[v] at any
position), so the sums TRL takes over its outputs are known independently: the tests compute them with plain loops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, tiny_llama
from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from peftkit import LoraConfig, TunedModel
from peftkit.data import KtoCollator, PairCollator
from peftkit.objectives.dpo import PREF_LOSSES, Dpo, preference_losses
from peftkit.objectives.kto import Kto, kto_losses
from peftkit.varlen import attention_for

IGNORE_INDEX = -100
VOCAB = 32
CPU = torch.device("cpu")


# --- fakes for TRL's trainers ---
class UnigramLM:
    """A stand-in for a causal LM under TRL's fused LM head: `log_probs[b, t]` is the log-prob of the label at t + 1,
    table[label] here, and 0 where the label is -100; entropy, mean_logits and is_top1 have the same shape."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, input_ids, attention_mask=None, labels=None, use_cache=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head and use_cache is False and labels.shape == input_ids.shape
        self.calls += 1
        targets = labels[:, 1:]
        log_probs = torch.where(targets != IGNORE_INDEX, self.table[targets.clamp(min=0)], 0.0)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.ones_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs),
                               is_top1=torch.zeros(log_probs.shape, dtype=torch.bool))


def fake_accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=CPU, gather_for_metrics=lambda t: t, gather=lambda t: t, unwrap_model=lambda m: m)


def fake_trainer(**attrs) -> SimpleNamespace:
    """What `_compute_loss` reads of a trainer besides its loss settings: one process, training mode."""
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=fake_accelerator(),
                           aux_loss_enabled=False, precompute_ref_logps=True,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           args=SimpleNamespace(gradient_checkpointing_kwargs=None), **attrs)


def random_rows(g: torch.Generator, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask) [rows, width]: a prompt of 2-4 tokens, an answer of 1 or more,
    right padding; the answer lengths differ between rows."""
    ids = torch.randint(1, VOCAB, (rows, width), generator=g)
    attention = torch.zeros(rows, width, dtype=torch.long)
    completion = torch.zeros(rows, width, dtype=torch.long)
    for b in range(rows):
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        answer = int(torch.randint(1, width - prompt + 1, (1,), generator=g))
        attention[b, :prompt + answer] = 1
        completion[b, prompt:prompt + answer] = 1
        ids[b, prompt + answer:] = 0
    return ids, attention, completion


def loop_sums(table: torch.Tensor, ids: torch.Tensor, completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of table[token] over its answer tokens, and their count (plain loops)."""
    sums, counts = [], []
    for b in range(ids.shape[0]):
        answer = [int(ids[b, t]) for t in range(ids.shape[1]) if completion[b, t]]
        sums.append(sum(float(table[v]) for v in answer))
        counts.append(float(len(answer)))
    return torch.tensor(sums, dtype=table.dtype), torch.tensor(counts, dtype=table.dtype)


def dpo_case(seed: int = 0, pairs: int = 6, width: int = 12):
    """A DPO batch for TRL ([chosen rows, rejected rows]) and peftkit's view of it (sums, counts), in float64."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(2 * torch.randn(VOCAB, generator=g, dtype=torch.float64), 0)
    ids, attention, completion = random_rows(g, 2 * pairs, width)
    sums, counts = loop_sums(table, ids, completion)
    ref = sums + 6 * torch.randn(2 * pairs, generator=g, dtype=torch.float64)  # log-ratios of both signs
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    return table, inputs, sums, counts, ref


def peft_losses(loss_type, beta, sums, counts, ref, **kw):
    p = len(sums) // 2
    ref_c, ref_r = (None, None) if ref is None else (ref[:p], ref[p:])
    return preference_losses(loss_type, beta, sums[:p], sums[p:], ref_c, ref_r, counts[:p], counts[p:], **kw)


# --- 1. DPO losses: DPOTrainer._compute_loss ---
@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("hinge", 0.1), ("ipo", 0.5), ("sigmoid", 1.0)])
def test_dpo_losses_match_trl_dpo_trainer(loss_type: str, beta: float) -> None:
    table, inputs, sums, counts, ref = dpo_case()
    model = UnigramLM(table)
    trainer = fake_trainer(ld_alpha=None, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                           f_divergence_type="reverse_kl", label_smoothing=0.0, use_weighting=False)
    trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    assert model.calls == 1

    losses, chosen_rewards, rejected_rewards = peft_losses(loss_type, beta, sums, counts, ref)
    assert losses.shape == (6,) and losses.dtype == torch.float64
    assert abs(losses.mean().item() - trl_loss.item()) <= 1e-9
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-9)
    assert logged["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-9)
    assert logged["rewards/accuracies"] == (chosen_rewards > rejected_rewards).float().mean().item()
    assert logged["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-9)
    assert logged["logps/chosen"] == pytest.approx(sums[:6].mean().item(), abs=1e-9)
    # the case tests something: rewards split both ways, and hinge sees pairs on both sides of its kink
    assert 0 < logged["rewards/accuracies"] < 1
    if loss_type == "hinge":
        assert ((losses == 0).any() and (losses > 0).any()).item()


# --- 2. cDPO (label smoothing) and SimPO: CPOTrainer.cpo_loss ---
def cpo(loss_type: str, beta: float, chosen, rejected, label_smoothing=0.0, simpo_gamma=0.5):
    trainer = SimpleNamespace(beta=beta, alpha=0.0, loss_type=loss_type, simpo_gamma=simpo_gamma,
                              label_smoothing=label_smoothing, accelerator=SimpleNamespace(device=CPU))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_cdpo_label_smoothing_matches_trl_cpo_sigmoid(beta: float) -> None:
    _, _, sums, counts, ref = dpo_case(seed=1)
    losses, chosen_rewards, rejected_rewards = peft_losses("sigmoid", beta, sums, counts, ref, label_smoothing=0.1)
    ratios = sums - ref  # CPO has no reference: given the log-ratios, its sigmoid loss is cDPO's
    trl_losses, trl_chosen, trl_rejected = cpo("sigmoid", beta, ratios[:6], ratios[6:], label_smoothing=0.1)
    torch.testing.assert_close(losses, trl_losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=0, atol=1e-12)
    plain, _, _ = peft_losses("sigmoid", beta, sums, counts, ref)
    assert (losses - plain).abs().min() > 1e-3  # the smoothing changes every pair's loss


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_simpo_on_token_means(beta: float, gamma: float, label_smoothing: float) -> None:
    _, _, sums, counts, _ = dpo_case(seed=2)
    losses, chosen_rewards, rejected_rewards = peft_losses("simpo", beta, sums, counts, None, simpo_gamma=gamma,
                                                           label_smoothing=label_smoothing)
    means = sums / counts
    trl_losses, trl_chosen, trl_rejected = cpo("simpo", beta, means[:6], means[6:], label_smoothing=label_smoothing,
                                               simpo_gamma=gamma)
    torch.testing.assert_close(losses, trl_losses, rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=0, atol=1e-12)
    # the sums' counts differ, so dividing by them matters: the sums themselves give other losses
    on_sums, _, _ = cpo("simpo", beta, sums[:6], sums[6:], label_smoothing=label_smoothing, simpo_gamma=gamma)
    assert (losses - on_sums).abs().max() > 1e-2


# --- 3. ORPO: ORPOTrainer.odds_ratio_loss ---
def test_orpo_odds_ratio_term_matches_trl() -> None:
    """peftkit's orpo loss is LLaMA-Factory's -p_c - beta log sigmoid(log odds); TRL's odds_ratio_loss returns
    beta log sigmoid(log odds), with the NLL added elsewhere. TRL casts to float32, so both run in float32."""
    beta = 0.25
    sums = torch.tensor([-12.0, -3.1, -0.9, -30.2, -2.0, -5.5, -7.7, -1.2, -14.0, -2.4], dtype=torch.float32)
    counts = torch.tensor([6.0, 9.0, 3.0, 10.0, 1.0, 4.0, 3.0, 8.0, 5.0, 2.0], dtype=torch.float32)
    means = sums / counts  # per-token means from -7.7 to -0.1: both branches of TRL's log1mexp (at -ln 2)
    assert (means > -math.log(2)).any() and (means < -math.log(2)).any()
    losses, chosen_rewards, rejected_rewards = peft_losses("orpo", beta, sums, counts, None)
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=CPU)), means[:5], means[5:])
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses - (-means[:5]), -trl_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, trl_chosen, rtol=0, atol=1e-7)
    torch.testing.assert_close(rejected_rewards, trl_rejected, rtol=0, atol=1e-7)


# --- 4. kto_pair: TRL 0.8's formula ---
def trl08_kto_pair(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """DPOTrainer.dpo_loss's "kto_pair" branch of TRL 0.8, verbatim; TRL removed kto_pair after 0.8 (it became the
    separate KTOTrainer), so 1.16 has nothing to call. TRL's loss is losses.mean() over all 2B terms."""
    chosen_KL = (policy_chosen - ref_chosen).mean().clamp(min=0)
    rejected_KL = (policy_rejected - ref_rejected).mean().clamp(min=0)
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    losses = torch.cat((1 - F.sigmoid(beta * (chosen_logratios - rejected_KL)),
                        1 - F.sigmoid(beta * (chosen_KL - rejected_logratios))), 0)
    return losses.mean()


@pytest.mark.parametrize(("chosen_shift", "rejected_shift"), [(4.0, -4.0), (-4.0, 4.0), (3.0, 5.0), (-3.0, -5.0)])
def test_kto_pair_matches_trl_0_8(chosen_shift: float, rejected_shift: float) -> None:
    """The shifts set the signs of the mean log-ratios, so each KL estimate is clamped in some cases, not in others."""
    _, _, sums, counts, ref = dpo_case(seed=3)
    ratios = sums - ref
    chosen, rejected = ratios[:6] - ratios[:6].mean(), ratios[6:] - ratios[6:].mean()
    ratios = torch.cat([chosen + chosen_shift, rejected + rejected_shift])
    ref = sums - ratios  # each half's log-ratios average its shift
    beta = 0.2
    losses, chosen_rewards, rejected_rewards = peft_losses("kto_pair", beta, sums, counts, ref)
    expected = trl08_kto_pair(beta, sums[:6], sums[6:], ref[:6], ref[6:])
    assert abs(losses.mean().item() - expected.item()) <= 1e-12
    torch.testing.assert_close(chosen_rewards, beta * (sums[:6] - ref[:6]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, beta * (sums[6:] - ref[6:]), rtol=0, atol=1e-12)


# --- 5. pref_ftx ---
@pytest.mark.parametrize("loss_type", PREF_LOSSES)
def test_pref_ftx_adds_the_chosen_mean_token_loss(loss_type: str) -> None:
    _, _, sums, counts, ref = dpo_case(seed=4)
    kw = dict(label_smoothing=0.1, simpo_gamma=0.7)
    base, chosen_rewards, rejected_rewards = peft_losses(loss_type, 0.3, sums, counts, ref, **kw)
    with_ftx, chosen_ftx, rejected_ftx = peft_losses(loss_type, 0.3, sums, counts, ref, ftx=0.4, **kw)
    expected = 0.4 * (-sums[:6] / counts[:6])
    assert (expected > 0.1).all()
    torch.testing.assert_close(with_ftx - base, expected, rtol=0, atol=1e-12)
    assert torch.equal(chosen_ftx, chosen_rewards) and torch.equal(rejected_ftx, rejected_rewards)


# --- 6. KTO: KTOTrainer._compute_loss ---
@pytest.mark.parametrize("kl_shift", [3.0, -3.0])
def test_kto_losses_match_trl_kto_trainer(kl_shift: float) -> None:
    """kl_shift > 0: the KL estimate is positive; < 0: it is clamped to 0."""
    g = torch.Generator().manual_seed(5)
    n, beta, w_d, w_u = 7, 0.3, 1.5, 0.6
    table = torch.log_softmax(2 * torch.randn(VOCAB, generator=g, dtype=torch.float64), 0)
    ids, attention, completion = random_rows(g, n, 11)
    kl_ids, kl_attention, kl_completion = random_rows(g, n, 13)
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    policy, _ = loop_sums(table, ids, completion)
    policy_kl, _ = loop_sums(table, kl_ids, kl_completion)
    ref = policy + 5 * torch.randn(n, generator=g, dtype=torch.float64)
    ref_kl = policy_kl + torch.randn(n, generator=g, dtype=torch.float64)
    ref_kl = ref_kl + (policy_kl - ref_kl).mean() - kl_shift  # mean(policy_kl - ref_kl) = kl_shift
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion,
              "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    model = UnigramLM(table)
    trainer = fake_trainer(calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=w_d,
                           undesirable_weight=w_u)
    trainer._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, trainer)  # TRL's own, bound to the fake
    trl_loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    assert model.calls == 2  # the KL sequences, then the examples

    kl = (policy_kl - ref_kl).mean().clamp(min=0)  # as Kto.loss computes it
    assert kl.item() == pytest.approx(max(kl_shift, 0.0), abs=1e-9)
    losses, rewards = kto_losses(beta, policy, ref, label, kl, w_d, w_u)
    assert abs(losses.mean().item() - trl_loss.item()) <= 1e-12
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["kl"] == pytest.approx(kl.item(), abs=1e-12)
    assert logged["rewards/chosen"] == pytest.approx(rewards[label].mean().item(), abs=1e-12)
    assert logged["rewards/rejected"] == pytest.approx(rewards[~label].mean().item(), abs=1e-12)
    assert logged["rewards/margins"] == pytest.approx(rewards[label].mean().item() - rewards[~label].mean().item(),
                                                      abs=1e-12)
    # the weights matter: unweighted losses give another mean
    plain, _ = kto_losses(beta, policy, ref, label, kl)
    assert abs(plain.mean().item() - trl_loss.item()) > 1e-3


# --- 7. one full step on a tiny Llama: gradients against an unbatched computation ---
def tiny_tuned(seed: int = 0) -> TunedModel:
    tuned = TunedModel(tiny_llama(), LoraConfig(r=4, lora_alpha=8))
    randomize(tuned.method, 0.3, seed=seed)  # LoRA B != 0: the policy differs from the reference (adapter disabled)
    return tuned


def answer_logp(tuned: TunedModel, ids: list[int], labels: list[int]) -> torch.Tensor:
    """One sequence alone, no padding: the sum of its answer tokens' log-probs."""
    logits = tuned(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1)
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return logps[keep].gather(-1, targets[keep, None]).sum()


def ref_answer_logp(tuned: TunedModel, ids: list[int], labels: list[int]) -> torch.Tensor:
    with torch.no_grad(), tuned.disable_adapter():
        return answer_logp(tuned, ids, labels)


def sequence(g: torch.Generator, prompt: list[int], answer_len: int) -> tuple[list[int], list[int]]:
    answer = torch.randint(1, 128, (answer_len,), generator=g).tolist()
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def step_grads(tuned: TunedModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    tuned.model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in tuned.trainable_parameters()}


def assert_same_step(tuned, loss, grads, expected_loss, expected_grads) -> None:
    assert abs(loss.item() - expected_loss.item()) <= 1e-6 * max(1.0, abs(expected_loss.item()))
    assert grads.keys() == expected_grads.keys() and grads
    assert all(".lora_A." in n or ".lora_B." in n for n in grads)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in expected_grads.values())).item()
    assert norm > 1e-3
    for name, g in grads.items():
        diff = (g - expected_grads[name]).abs().max().item()
        assert diff <= 1e-5 * norm, f"{name}: gradients differ by {diff:.3g} (norm {norm:.3g})"


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_dpo_step_gradients_match_unbatched(padding_free: bool, loss_type: str) -> None:
    g = torch.Generator().manual_seed(6)
    tuned, beta = tiny_tuned(), {"sigmoid": 0.1, "ipo": 0.5}[loss_type]
    pairs = []
    for prompt_len, chosen_len, rejected_len in [(4, 5, 3), (6, 2, 7), (3, 4, 4)]:
        prompt = torch.randint(1, 128, (prompt_len,), generator=g).tolist()
        (c_ids, c_labels), (r_ids, r_labels) = sequence(g, prompt, chosen_len), sequence(g, prompt, rejected_len)
        pairs.append({"chosen_ids": c_ids, "chosen_labels": c_labels,
                      "rejected_ids": r_ids, "rejected_labels": r_labels})
    batch = PairCollator(0, padding_free=padding_free)(pairs)
    assert ("cu_seq_lens_q" in batch) == padding_free

    obj = Dpo(loss_type, beta)
    obj.attach(tuned)
    assert obj.units(batch) == 3
    with attention_for(tuned, batch):
        loss = obj.loss(tuned, batch)
        grads = step_grads(tuned, loss)

    expected = torch.zeros(())
    deltas = []
    for p in pairs:
        pc, pr = answer_logp(tuned, p["chosen_ids"], p["chosen_labels"]), answer_logp(
            tuned, p["rejected_ids"], p["rejected_labels"])
        rc, rr = ref_answer_logp(tuned, p["chosen_ids"], p["chosen_labels"]), ref_answer_logp(
            tuned, p["rejected_ids"], p["rejected_labels"])
        nc = sum(label != IGNORE_INDEX for label in p["chosen_labels"][1:])
        nr = sum(label != IGNORE_INDEX for label in p["rejected_labels"][1:])
        deltas.append(((pc - rc) - (pr - rr)).item())
        if loss_type == "sigmoid":
            expected = expected - F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
        else:
            expected = expected + ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    assert min(abs(d) for d in deltas) > 1e-2  # the adapter moved the policy away from the reference
    assert_same_step(tuned, loss, grads, expected, step_grads(tuned, expected))


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_kto_step_gradients_match_unbatched(padding_free: bool) -> None:
    g = torch.Generator().manual_seed(7)
    tuned, beta, w_d, w_u = tiny_tuned(seed=1), 0.2, 1.3, 0.8  # seed 1: the KL estimate is positive, not clamped
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    answers = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 2, 4, 3)]
    tags = [True, False, True, False]
    examples = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        other = answers[(i + 1) % len(answers)]  # mismatched pair: this prompt, the next example's answer
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                         "kl_ids": prompt + other, "kl_labels": [IGNORE_INDEX] * len(prompt) + other,
                         "kto_tag": tags[i]})
    batch = KtoCollator(0, padding_free=padding_free)(examples)

    obj = Kto(beta, w_d, w_u)
    obj.attach(tuned)
    with attention_for(tuned, batch):
        loss = obj.loss(tuned, batch)
        grads = step_grads(tuned, loss)

    with torch.no_grad():
        kl = torch.stack([answer_logp(tuned, e["kl_ids"], e["kl_labels"])
                          - ref_answer_logp(tuned, e["kl_ids"], e["kl_labels"]) for e in examples]).mean().clamp(min=0)
    assert kl.item() > 0.05  # the reference point takes part (and must carry no gradient)
    expected = torch.zeros(())
    for e in examples:
        r = answer_logp(tuned, e["input_ids"], e["labels"]) - ref_answer_logp(tuned, e["input_ids"], e["labels"])
        if e["kto_tag"]:
            expected = expected + w_d * (1 - torch.sigmoid(beta * (r - kl)))
        else:
            expected = expected + w_u * (1 - torch.sigmoid(beta * (kl - r)))
    stats = obj.take_stats()
    assert stats["kl"][0] / stats["kl"][1] == pytest.approx(kl.item(), abs=1e-5)
    assert_same_step(tuned, loss, grads, expected, step_grads(tuned, expected))
