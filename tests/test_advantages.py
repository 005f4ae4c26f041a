"""Group advantages against hand-worked values and a loop implementation; the dynamic-sampling filter."""

from __future__ import annotations

import doctest
import statistics

import pytest
import torch

from medrl.rl import advantages
from medrl.rl.advantages import as_groups, group_advantages, group_stats, signal_groups


def test_doctests() -> None:
    result = doctest.testmod(advantages)
    assert result.attempted >= 3 and result.failed == 0


def test_group_scale_hand_worked() -> None:
    # One right answer out of four: mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5.
    # Advantages: 0.75 / (0.5 + 1e-4) = 1.49970 for the right one, -0.25 / 0.5001 = -0.49990 for the others.
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "group", eps=1e-4)
    assert adv.tolist()[0] == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])


def test_batch_scale_hand_worked() -> None:
    # Centring is per group: [[0.5, -0.5], [0, 0]]. The spread is the batch's: rewards 1, 0, 3, 3 have mean 1.75,
    # squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, unbiased variance 6.75 / 3 = 2.25, std 1.5.
    adv = group_advantages(torch.tensor([[1.0, 0.0], [3.0, 3.0]]), "batch", eps=1e-4)
    assert adv.flatten().tolist() == pytest.approx([0.5 / 1.5001, -0.5 / 1.5001, 0.0, 0.0])


def test_no_scale_only_centres() -> None:
    # Dr. GRPO: r - mean, so a group of (2, 0, 1) gives (1, -1, 0) whatever its spread.
    assert group_advantages(torch.tensor([[2.0, 0.0, 1.0]]), "none").tolist() == [[1.0, -1.0, 0.0]]


def _loop(rewards: list[list[float]], scale: str, eps: float) -> list[list[float]]:
    flat = [r for g in rewards for r in g]
    batch_std = statistics.stdev(flat)
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        spread = {"group": statistics.stdev(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out.append([(r - mean) / spread for r in group])
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_loop(scale: str) -> None:
    gen = torch.Generator().manual_seed(1)
    # Rewards like the study's: accuracy + format in {0, 1} each, plus the occasional 0.5 CARE bonus.
    rewards = (torch.randint(0, 2, (32, 8), generator=gen) + torch.randint(0, 2, (32, 8), generator=gen)).float()
    rewards += 0.5 * (torch.rand(32, 8, generator=gen) > 0.8)
    expected = torch.tensor(_loop(rewards.tolist(), scale, 1e-4))
    torch.testing.assert_close(group_advantages(rewards, scale, 1e-4), expected)


def test_equal_groups_have_zero_advantage_and_are_filtered() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert signal_groups(rewards).tolist() == [False, True, False]


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(torch.ones(2, 2), "grp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="groups of 3"):
        as_groups(torch.ones(4), 3)


def test_group_stats() -> None:
    acc = as_groups(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), 2)  # groups: all right, all wrong, mixed
    assert group_stats(acc) == pytest.approx({"all_correct": 1 / 3, "all_wrong": 1 / 3})
