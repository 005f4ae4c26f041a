"""Per-token estimators of KL(policy || reference) from samples of the policy (Schulman, "Approximating KL
divergence", 2020), and verl's clamped k3.

With ``d = ref - logp`` (the log of ``p_ref / p_policy`` at a sampled token):

- ``k1 = -d``: unbiased, high variance, negative on some tokens;
- ``k2 = d^2 / 2``: biased, low variance, non-negative;
- ``k3 = exp(d) - d - 1``: unbiased, low variance, non-negative (GRPO's paper, TRL's only estimator, medrl's
  default);
- ``low_var_kl``: k3 clamped to ``[-10, 10]``, as verl's ``low_var_kl``, against rare huge ratios.

TRL can also weigh the per-token KL by the importance ratio (``use_bias_correction_kl``, off by default);
:func:`kl_estimate` takes that weight as ``ratio``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
LOW_VAR_KL_CLAMP = 10.0  # verl's bound


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``; ``[N, L]``.

    Unbiased, non-negative, and zero exactly where the two log-probs agree.

    >>> kl = k3_kl(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, 0.0]]))  # d=0 -> 0; d=1 -> e - 2 = 0.71828
    >>> [round(v, 5) for v in kl[0].tolist()]
    [0.0, 0.71828]
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3", ratio: Tensor | None = None
) -> Tensor:
    """``[N, L]`` per-token KL estimate; multiplied by ``ratio`` (``[N, L]`` or ``[N, 1]``) when given.

    >>> logp, ref = torch.tensor([[-1.0]]), torch.tensor([[0.0]])  # d = 1
    >>> [round(kl_estimate(logp, ref, e).item(), 5) for e in ("k1", "k2", "k3", "low_var_kl")]
    [-1.0, 0.5, 0.71828, 0.71828]
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    elif estimator == "k3":
        kl = torch.exp(d) - d - 1
    elif estimator == "low_var_kl":
        kl = (torch.exp(d) - d - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    else:
        raise ValueError(f"kl_estimator must be k1, k2, k3 or low_var_kl, got {estimator!r}")
    return kl if ratio is None else kl * ratio
