"""Group-relative advantages and the dynamic-sampling filter.

Rewards arrive as ``[B, G]``: B prompts, G samples each. GRPO's advantage is the reward minus its group's
mean, divided by a spread: the group's standard deviation (``group``, the paper's and the authors' choice),
the whole batch's (``batch``, steadier when groups are small), or nothing (``none``, Dr. GRPO, which argues
the division over-weights easy and hopeless prompts).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Scale = Literal["group", "batch", "none"]


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
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages wants [B, G] rewards, got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2 and scale != "none":
        raise ValueError("group-normalised advantages need at least 2 samples per prompt (G >= 2)")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


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
