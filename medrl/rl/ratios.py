"""The importance ratio between the policy being trained and the one that sampled, per token or per sequence.

- ``token`` (GRPO, PPO): ``r_t = exp(logp_t - old_t)``, clipped token by token.
- ``sequence`` (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization"; TRL's
  ``importance_sampling_level="sequence"``): ``s = exp(mean_t (logp_t - old_t))`` over the sequence's
  completion tokens, one ratio per sequence, clipped per sequence. Length-normalised so long and short
  completions have ratios on one scale.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

ImportanceLevel = Literal["token", "sequence"]


def log_importance_weights(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor | None, level: ImportanceLevel
) -> Tensor:
    """``[N, L]`` log-ratios (``token``) or ``[N, 1]`` length-normalised sums of them over the completion
    tokens of ``mask`` (``sequence``; the mask is not read at ``token`` level).

    >>> import torch
    >>> logp, old = torch.tensor([[0.0, -1.0, 5.0]]), torch.tensor([[-1.0, -1.0, 0.0]])
    >>> mask = torch.tensor([[True, True, False]])  # the third column is padding
    >>> log_importance_weights(logp, old, mask, "token").tolist()[0][:2]
    [1.0, 0.0]
    >>> log_importance_weights(logp, old, mask, "sequence").tolist()  # (1 + 0) / 2 tokens
    [[0.5]]
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        if mask is None:
            raise ValueError("sequence-level importance sampling needs the completion mask")
        m = mask.to(log_ratio.dtype)
        return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    raise ValueError(f"importance_sampling must be 'token' or 'sequence', got {level!r}")
