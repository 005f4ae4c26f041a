"""Group-relative advantages, three estimators of them, and the dynamic-sampling filter.

Rewards arrive as ``[B, G]``: B prompts, G samples each. GRPO's advantage is the reward minus its group's
mean, divided by a spread: the group's standard deviation (``group``, the paper's and the authors' choice),
the whole batch's (``batch``, steadier when groups are small), or nothing (``none``, Dr. GRPO, which argues
the division over-weights easy and hopeless prompts).

Estimators (:func:`compute_advantages`):

- ``grpo``: the above;
- ``rloo`` (REINFORCE leave-one-out; Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j``, unscaled;
- ``grpo_passk`` (Pass@k-aware, as verl and EasyR1 ship it, after arXiv:2503.19595): only the best sample of
  each group moves, with advantage ``r_max - r_second_max`` (divided by the spread as for ``grpo``). It pays
  for the one sample that reaches further than the rest, the quantity Pass@k rewards, instead of pushing the
  whole group towards its mean.

A group whose rewards are all equal has no signal: its advantages are exactly 0 under every estimator
(float32 arithmetic would otherwise leave ``|A|`` up to ~1e-3 for an all-1.2 group).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
Estimator = Literal["grpo", "grpo_passk", "rloo"]


def group_advantages(
    rewards: Tensor, scale: Scale = "group", eps: float = 1e-4, batch_std: Tensor | float | None = None
) -> Tensor:
    """``[B, G]`` rewards -> ``[B, G]`` advantages ``(r - mean_group) / (std + eps)``.

    The standard deviation is the unbiased one (``torch.std``), as in the authors' trainer; ``eps = 1e-4`` is
    their value. A group whose rewards are all equal gets zero advantages whatever the scale. ``batch_std``
    replaces the ``batch`` scale's std when the batch spans processes (:func:`medrl.rl.distributed.global_std`).

    >>> import torch
    >>> adv = group_advantages(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))  # (1, 0): +-0.5 / (0.7071 + 1e-4)
    >>> [[round(v, 4) for v in row] for row in adv.tolist()]
    [[0.707, -0.707], [0.0, 0.0]]
    >>> group_advantages(torch.full((1, 8), 1.2)).tolist()  # the float mean of 1.2s is off by 1e-7: still 0
    [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages wants [B, G] rewards, got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2 and scale != "none":
        raise ValueError("group-normalised advantages need at least 2 samples per prompt (G >= 2)")
    # The mean of equal floats can miss them by an ulp, which (std + eps) would blow up to ~1e-3: centre flat
    # groups at exactly 0, as the docstring promises.
    centred = torch.where(
        signal_groups(rewards).unsqueeze(1), rewards - rewards.mean(dim=1, keepdim=True), torch.zeros_like(rewards)
    )
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


def rloo_advantages(rewards: Tensor) -> Tensor:
    """``[B, G]`` -> ``[B, G]``: each reward minus the mean of the others in its group.

    >>> import torch
    >>> rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]])).tolist()  # 1 - 0; 0 - (1 + 0) / 2
    [[1.0, -0.5, -0.5]]
    """
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt (G >= 2)")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def passk_advantages(rewards: Tensor, spread: Tensor | float | None = None, eps: float = 1e-4) -> Tensor:
    """``[B, G]`` -> ``[B, G]``: ``(r_max - r_second_max) / (spread + eps)`` on each group's best sample (the
    first of equal bests), 0 elsewhere; ``spread`` is ``[B, 1]``, a number, or None (no division).

    >>> import torch
    >>> passk_advantages(torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])).tolist()  # 1 - 0.5; 1 - 1
    [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    """
    if rewards.shape[1] < 2:
        raise ValueError("the Pass@k advantage compares the two best samples: it needs G >= 2")
    top = rewards.topk(2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    if spread is not None:
        gap = gap / (torch.as_tensor(spread, dtype=rewards.dtype).reshape(-1) + eps)
    out = torch.zeros_like(rewards)
    out.scatter_(1, top.indices[:, :1], gap.unsqueeze(1))
    return out


def compute_advantages(
    rewards: Tensor,
    estimator: Estimator = "grpo",
    scale: Scale = "group",
    eps: float = 1e-4,
    batch_std: Tensor | float | None = None,
) -> Tensor:
    """``[B, G]`` advantages by ``estimator`` (see the module docstring), exactly 0 for groups with no signal.

    >>> import torch
    >>> compute_advantages(torch.tensor([[1.2, 1.2, 1.2]]), "grpo").tolist()  # all equal: no signal, exactly 0
    [[0.0, 0.0, 0.0]]
    """
    if estimator == "grpo":
        adv = group_advantages(rewards, scale, eps, batch_std)
    elif estimator == "rloo":
        adv = rloo_advantages(rewards)
    elif estimator == "grpo_passk":
        if scale == "group":
            spread = rewards.std(dim=1)
        elif scale == "batch":
            spread = rewards.std() if batch_std is None else batch_std
        else:
            spread = None
        adv = passk_advantages(rewards, spread, eps)
    else:
        raise ValueError(f"advantage_estimator must be grpo, grpo_passk or rloo, got {estimator!r}")
    return torch.where(signal_groups(rewards).unsqueeze(1), adv, torch.zeros_like(adv))


def signal_groups(rewards: Tensor) -> Tensor:
    """``[B, G]`` rewards -> ``[B]`` bool: True for groups whose rewards are not all equal.

    A group where every sample scored the same has zero advantage everywhere and so no policy gradient;
    dynamic sampling (DAPO) drops such groups and refills the batch with new prompts.

    >>> import torch
    >>> signal_groups(torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])).tolist()
    [True, False, False]
    """
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def group_stats(accuracy: Tensor) -> dict[str, float]:
    """Fractions of all-correct and all-wrong groups from ``[B, G]`` accuracy (logged each step).

    >>> import torch
    >>> group_stats(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    {'all_correct': 0.25, 'all_wrong': 0.5}
    """
    correct = accuracy > 0
    return {
        "all_correct": correct.all(dim=1).float().mean().item(),
        "all_wrong": (~correct).all(dim=1).float().mean().item(),
    }


def as_groups(values: Tensor, group_size: int) -> Tensor:
    """``[N]`` -> ``[N / G, G]``, checking that N is a whole number of groups."""
    if values.dim() != 1 or values.shape[0] % group_size:
        raise ValueError(f"{tuple(values.shape)} values do not split into groups of {group_size}")
    return values.view(-1, group_size)
