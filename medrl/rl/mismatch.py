"""Correcting for the rollout engine's log-probs differing from the trainer's (bf16, other kernels).

vLLM samples from its own copy of the weights; its log-prob of a token is not exactly the trainer's, so the
rollouts are slightly off-policy even at ``mu = 1``. With ``w = exp(old_trainer - engine)`` (per token, or
summed over the sequence), the policy-gradient term of each token is multiplied by:

- ``tis`` (truncated importance sampling; Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"; TRL's ``*_truncate`` modes): ``min(w, cap)``;
- ``mis`` (masked importance sampling; TRL's ``*_mask`` modes): ``w`` inside ``[low, high]``, else 0 (the token
  or sequence is dropped from the gradient).

At ``sequence`` level ``w`` is the product over the sequence's tokens (the sum of the log differences), as
in TRL. The weights carry no gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Correction = Literal["none", "tis", "mis"]
CorrectionLevel = Literal["token", "sequence"]


def engine_weights(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    correction: Correction,
    level: CorrectionLevel = "token",
    low: float | None = None,
    high: float = 2.0,
) -> Tensor | None:
    """Per-token ``[N, L]`` or per-sequence ``[N, 1]`` weights, or None for ``none``.

    >>> trainer, engine = torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.25, 0.9]]))
    >>> mask = torch.ones(1, 2, dtype=torch.bool)  # w = 0.5 / 0.25 = 2 on the first token, 1 on the second
    >>> [round(v, 4) for v in engine_weights(trainer, engine, mask, "tis", high=1.5)[0].tolist()]
    [1.5, 1.0]
    >>> [round(v, 4) for v in engine_weights(trainer, engine, mask, "mis", low=0.5, high=1.5)[0].tolist()]
    [0.0, 1.0]
    >>> round(engine_weights(trainer, engine, mask, "tis", "sequence", high=5.0).item(), 4)  # 2 x 1
    2.0
    """
    if correction == "none":
        return None
    with torch.no_grad():
        diff = (trainer_logprobs - engine_logprobs).float() * mask
        diff = torch.nan_to_num(diff, nan=0.0)  # a token the engine gave no log-prob for is not corrected
        if level == "sequence":
            diff = diff.sum(-1, keepdim=True)
        elif level != "token":
            raise ValueError(f"mismatch level must be 'token' or 'sequence', got {level!r}")
        w = torch.exp(diff)
        if correction == "tis":
            return w.clamp(min=low, max=high) if low is not None else w.clamp(max=high)
        if correction == "mis":
            lo = -math.inf if low is None else low
            return w.masked_fill((w < lo) | (w > high), 0.0)
    raise ValueError(f"mismatch_correction must be none, tis or mis, got {correction!r}")


def mismatch_stats(
    trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, low: float | None, high: float
) -> dict[str, float]:
    """Mean and max ``|log p_engine - log p_trainer|`` over completion tokens, and the share of tokens whose
    ratio ``w`` falls outside ``[low, high]`` (logged every step, corrected or not).

    >>> t, e = torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, -2.0]])
    >>> mismatch_stats(t, e, torch.ones(1, 2, dtype=torch.bool), 0.5, 2.0)  # |d| = 0 and 1; w = 1 and e
    {'mean': 0.5, 'max': 1.0, 'outside': 0.5}
    """
    with torch.no_grad():
        m = mask.bool()
        d = (trainer_logprobs - engine_logprobs).float()[m]
        d = d[~torch.isnan(d)]
        if d.numel() == 0:
            return {"mean": 0.0, "max": 0.0, "outside": 0.0}
        w = torch.exp(d)
        outside = (w > high) | (w < (-math.inf if low is None else low))
        return {"mean": d.abs().mean().item(), "max": d.abs().max().item(), "outside": outside.float().mean().item()}
