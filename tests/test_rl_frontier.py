"""GSPO, engine-mismatch correction, KL estimators, entropy terms, Pass@k and leave-one-out advantages.

Each has a hand-worked case (the expected value and why, in a comment) and a comparison with a plain loop
written here, on fixed random tensors; where TRL 1.16 has the same option, the loop follows TRL's formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from medrl.rl.advantages import compute_advantages, group_advantages, passk_advantages, rloo_advantages
from medrl.rl.entropy import entropy_threshold, high_entropy_mask
from medrl.rl.kl import kl_estimate
from medrl.rl.losses import policy_loss
from medrl.rl.mismatch import engine_weights, mismatch_stats
from medrl.rl.rewards import overlong_penalty


def _random(n: int = 5, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, length, generator=g) * 2
    old = logp + (torch.rand(n, length, generator=g) - 0.5) * 0.6
    ref = logp + (torch.rand(n, length, generator=g) - 0.5) * 0.6
    adv = torch.randn(n, generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------------------------------- GSPO


def test_gspo_hand_worked() -> None:
    # Sequence 1: log-ratios 0.1, 0.3 -> mean 0.2 -> s = e^0.2 = 1.2214 > 1.2 with A = +1: clipped, loss -1.2.
    # Sequence 2: one token, log-ratio -0.5 -> s = 0.6065 < 0.8 with A = -1: clipped, loss +0.8.
    # grpo aggregation: (-1.2 + 0.8) / 2 = -0.2; clipped high on 2 of 3 tokens, low on 1.
    logp = torch.tensor([[0.1, 0.3], [-0.5, 0.0]])
    old = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    out = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, importance_sampling="sequence")
    assert out.loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert out.clip_fraction_high.item() == pytest.approx(2 / 3) and out.clip_fraction_low.item() == pytest.approx(
        1 / 3
    )
    assert out.ratio_max.item() == pytest.approx(math.exp(0.2)) and out.ratio_min.item() == pytest.approx(
        math.exp(-0.5)
    )


def test_gspo_matches_a_loop_with_trls_formula() -> None:
    logp, old, _, adv, mask = _random()
    logp.requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, importance_sampling="sequence", epsilon_low=0.1, epsilon_high=0.15)
    out.loss.backward()
    fast_grad = logp.grad.clone()
    logp.grad = None
    total = 0.0
    for i in range(logp.shape[0]):
        # TRL: log w = sum(log_ratio * mask) / mask.sum(); coef_1 = exp(log w); coef_2 = clamp(coef_1);
        # per-token loss -min(coef_1 A, coef_2 A); "grpo": token mean per sequence, then mean over sequences.
        m = mask[i]
        s = torch.exp((logp[i] - old[i])[m].sum() / m.sum())
        per_token = -torch.minimum(s * adv[i], s.clamp(1 - 0.1, 1 + 0.15) * adv[i]).expand(int(m.sum()))
        total = total + per_token.mean()
    loop = total / logp.shape[0]
    loop.backward()
    assert out.loss.item() == pytest.approx(loop.item(), abs=1e-6)
    torch.testing.assert_close(fast_grad, logp.grad, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_match_a_loop(estimator: str) -> None:
    logp, _, ref, _, _ = _random()
    fast = kl_estimate(logp, ref, estimator)
    for (i, j), lp in zip(torch.cartesian_prod(torch.arange(5), torch.arange(7)).tolist(), logp.flatten(), strict=True):
        d = float(ref[i, j] - lp)
        want = {
            "k1": -d,
            "k2": d * d / 2,
            "k3": math.exp(d) - d - 1,
            "low_var_kl": max(-10, min(10, math.exp(d) - d - 1)),
        }
        assert fast[i, j].item() == pytest.approx(want[estimator], abs=1e-6)


def test_kl_hand_worked_and_trls_bias_correction() -> None:
    # d = ref - logp = 1: k1 = -1, k2 = 0.5, k3 = e - 2; low_var_kl clamps k3 at 10 (d = 5: e^5 - 6 = 142.4 -> 10).
    logp, ref = torch.tensor([[-1.0, -5.0]]), torch.tensor([[0.0, 0.0]])
    assert kl_estimate(logp, ref, "low_var_kl")[0].tolist() == pytest.approx([math.e - 2, 10.0])
    # TRL's use_bias_correction_kl: the per-token k3 times coef_1, the importance ratio exp(logp - old).
    logp, old, ref, adv, mask = _random(seed=1)
    beta = 0.3
    with_bc = policy_loss(logp, old, adv, mask, ref_logprobs=ref, beta=beta, kl_bias_correction=True)
    without = policy_loss(logp, old, adv, mask, ref_logprobs=ref, beta=beta)
    kl_bc = (torch.exp(ref - logp) - (ref - logp) - 1) * torch.exp(logp - old)
    per_seq = lambda t: ((t * mask).sum(-1) / mask.sum(-1)).mean()  # noqa: E731
    assert (with_bc.loss - without.loss).item() == pytest.approx(
        beta * (per_seq(kl_bc) - per_seq(torch.exp(ref - logp) - (ref - logp) - 1)).item(), abs=1e-6
    )


# ------------------------------------------------------------------------------------------- mismatch


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_engine_weights_match_trls_formula_in_a_loop(correction: str, level: str) -> None:
    trainer, engine, _, _, mask = _random(seed=2)
    fast = engine_weights(trainer, engine, mask, correction, level, low=0.8, high=1.2)
    for i in range(trainer.shape[0]):
        diffs = [(trainer[i, j] - engine[i, j]).item() if mask[i, j] else 0.0 for j in range(trainer.shape[1])]
        ratios = [math.exp(sum(diffs))] if level == "sequence" else [math.exp(d) for d in diffs]
        if correction == "tis":  # TRL *_truncate: clamp(min, max)
            want = [min(max(r, 0.8), 1.2) for r in ratios]
        else:  # TRL *_mask: 0 outside [min, max]
            want = [r if 0.8 <= r <= 1.2 else 0.0 for r in ratios]
        assert fast[i].tolist() == pytest.approx(want, abs=1e-6)


def test_corrected_policy_loss_weighs_each_token() -> None:
    logp, old, _, adv, mask = _random(seed=3)
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(9))
    out = policy_loss(logp, old, adv, mask, token_weights=weights, aggregation="dapo")
    ratio = torch.exp(logp - old)
    per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * weights
    assert out.loss.item() == pytest.approx(((per_token * mask).sum() / mask.sum()).item(), abs=1e-6)


def test_mismatch_is_logged_uncorrected_too() -> None:
    # |d| = 0.1 and 0.7 on the two real tokens; w = e^0.7 = 2.01 is outside [0.5, 2.0].
    trainer = torch.tensor([[0.0, 0.0, 9.0]])
    engine = torch.tensor([[-0.1, -0.7, 0.0]])
    stats = mismatch_stats(trainer, engine, torch.tensor([[True, True, False]]), 0.5, 2.0)
    assert stats == pytest.approx({"mean": 0.4, "max": 0.7, "outside": 0.5})


# ------------------------------------------------------------------------------------------- entropy


def test_entropy_bonus_lowers_the_loss_by_coef_times_the_mean_entropy_and_has_a_gradient() -> None:
    logp, old, _, adv, mask = _random(seed=4)
    entropy = torch.rand(logp.shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    plain = policy_loss(logp, old, adv, mask)
    bonus = policy_loss(logp, old, adv, mask, entropy=entropy, entropy_coef=0.1)
    mean_entropy = (entropy * mask).sum() / mask.sum()
    assert (plain.loss - bonus.loss).item() == pytest.approx(0.1 * mean_entropy.item(), abs=1e-6)
    bonus.loss.backward()
    torch.testing.assert_close(entropy.grad, -0.1 * mask.float() / mask.sum())


def test_top_entropy_quantile_matches_trls_rule() -> None:
    # TRL: threshold = quantile(entropies of completion tokens, 1 - q); keep tokens with entropy >= threshold.
    entropies = torch.tensor([[0.1, 0.9, 0.4, 7.0], [0.3, 0.2, 0.8, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    q = 0.5
    threshold = entropy_threshold(entropies[mask], q)
    assert threshold == pytest.approx(torch.quantile(entropies[mask], 1 - q).item())
    keep = high_entropy_mask(entropies, mask, threshold)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]  # 0.9, 0.4, 0.3, 0.8 of 7
    assert entropy_threshold(entropies[mask], 1.0) == float("-inf")


# ------------------------------------------------------------------------------------------- advantages


def test_rloo_and_passk_hand_worked() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    # RLOO: 1 - (0 + 0 + 0.5) / 3 = 0.8333; 0 - 1.5 / 3 = -0.5; 0.5 - 1 / 3 = 0.1667.
    assert rloo_advantages(rewards)[0].tolist() == pytest.approx([5 / 6, -0.5, -0.5, 1 / 6])
    # Pass@k: only the best (1.0) moves, by 1.0 - 0.5 = 0.5 (unscaled), or / (std 0.4787 + 1e-4) per group.
    assert passk_advantages(rewards)[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    scaled = compute_advantages(rewards, "grpo_passk", "group")
    assert scaled[0, 0].item() == pytest.approx(0.5 / (rewards.std().item() + 1e-4)) and scaled[0, 1:].eq(0).all()


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "grpo_passk"])
def test_estimators_match_a_loop(estimator: str) -> None:
    g = torch.Generator().manual_seed(6)
    rewards = torch.randint(0, 3, (6, 5), generator=g).float() / 2
    fast = compute_advantages(rewards, estimator, "group", 1e-4)
    for b, row in enumerate(rewards.tolist()):
        mean, std = sum(row) / len(row), torch.tensor(row).std().item()
        if len(set(row)) == 1:
            want = [0.0] * len(row)
        elif estimator == "grpo":
            want = [(r - mean) / (std + 1e-4) for r in row]
        elif estimator == "rloo":
            want = [r - (sum(row) - r) / (len(row) - 1) for r in row]
        else:  # verl's grpo_passk: the first maximum gets (max - second max) / (std + eps), the rest 0
            best = row.index(max(row))
            second = sorted(row, reverse=True)[1]
            want = [((max(row) - second) / (std + 1e-4)) if i == best else 0.0 for i in range(len(row))]
        assert fast[b].tolist() == pytest.approx(want, abs=1e-5), (estimator, row)


def test_groups_without_signal_get_exactly_zero() -> None:
    # In float32 the mean of eight 1.2s is not exactly 1.2: plain (r - mean) / (std + eps) leaves a small
    # same-sign advantage (measured 1.19e-3 before the fix). Every estimator, and group_advantages itself as
    # its docstring says, must give exactly 0.
    rewards = torch.full((1, 8), 1.2)  # G = 8, the authors' group size
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    assert (centred / (rewards.std(dim=1, keepdim=True) + 1e-4)).abs().max().item() == pytest.approx(1.19e-3, rel=0.01)
    assert group_advantages(rewards).abs().max().item() == 0.0
    for estimator in ("grpo", "rloo", "grpo_passk"):
        assert compute_advantages(rewards, estimator).abs().max().item() == 0.0


# ------------------------------------------------------------------------------------------- overlong


def test_overlong_penalty_hand_worked() -> None:
    # max 100, buffer 20: 0 up to 80 tokens, then (80 - L) / 20: -0.25 at 85, -1 at 100 and beyond.
    got = overlong_penalty(["x"] * 5, [10, 80, 85, 100, 120], [100] * 5, [20] * 5)
    assert got == [0.0, 0.0, -0.25, -1.0, -1.0]
