"""Which tokens carry the policy gradient when only high-entropy ones should (Wang et al. 2025, "Beyond the
80/20 rule: high-entropy minority tokens drive effective RL"; TRL's ``top_entropy_quantile``).

With ``q = top_entropy_quantile``, a completion token takes part when its entropy is at least the ``1 - q``
quantile of the entropies of every completion token considered (the whole batch, across processes, so the
threshold is the same on any number of GPUs). ``q = 1`` keeps every token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_threshold(entropies: Tensor, quantile: float) -> float:
    """The ``1 - quantile`` quantile of a flat tensor of token entropies (``-inf`` when there are none).

    >>> entropy_threshold(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), 0.2)  # the top 20 %: from the 0.8 quantile
    0.42000001668930054
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {quantile}")
    if entropies.numel() == 0 or quantile == 1:
        return float("-inf")
    return torch.quantile(entropies.float(), 1 - quantile).item()


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """``[N, L]`` bool: completion tokens (``mask``) whose entropy is at least ``threshold``.

    >>> high_entropy_mask(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[True, True, False]]), 0.5).tolist()
    [[False, True, False]]
    """
    return (entropies >= threshold) & mask.bool()
