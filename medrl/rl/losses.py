"""The GRPO policy loss: clipped surrogate, KL, entropy bonus, and three ways to average over tokens.

Per token (``[N, L]``): ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL`` with
``ratio = exp(logp - old_logp)`` per token, or one length-normalised ratio per sequence (GSPO,
:mod:`medrl.rl.ratios`), and by default the k3 estimator ``KL = exp(ref - logp) - (ref - logp) - 1``
(:mod:`medrl.rl.kl` has the others).

Aggregations (``mask`` marks completion tokens):

- ``grpo``: token mean within each sequence, then mean over sequences (the paper and the authors' trainer);
  long completions weigh less per token.
- ``dr_grpo``: token sum divided by ``num_sequences x max_length``, a constant, so length carries no bias.
- ``dapo``: token sum divided by the number of completion tokens in the whole batch (every token weighs the
  same); pass ``num_tokens`` as the count over all micro-batches and processes (see
  :func:`global_token_count`) so the loss is the same whatever the number of GPUs.

Each normaliser can be given explicitly (``num_sequences``, ``num_tokens``) so that micro-batches of one
batch add up to exactly the loss of the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from medrl.rl.kl import KLEstimator, k3_kl, kl_estimate
from medrl.rl.ratios import ImportanceLevel, log_importance_weights

Aggregation = Literal["grpo", "dr_grpo", "dapo"]
__all__ = ["Aggregation", "PolicyLoss", "aggregate", "clipped_surrogate", "k3_kl", "policy_loss"]


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    mask: Tensor | None = None,
    level: ImportanceLevel = "token",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped policy loss ``[N, L]``, whether the clip was active, and the ratio; the last two
    ``[N, L]`` (``token``) or ``[N, 1]`` (``sequence``, GSPO: ``mask`` is needed).

    ``advantages`` is ``[N]`` (one per sequence) or ``[N, L]``. DAPO's clip-higher uses ``epsilon_high >
    epsilon_low`` so unlikely tokens with positive advantage can still grow.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_importance_weights(logprobs, old_logprobs, mask, level))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = clip_sides(ratio, adv, epsilon_low, epsilon_high) != 0
    return loss, active, ratio


def clip_sides(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float) -> Tensor:
    """Which clip bites: ``-1`` (ratio below ``1 - epsilon_low``, advantage < 0), ``+1`` (above ``1 +
    epsilon_high``, advantage > 0), ``0`` (neither); ``advantages`` broadcast against ``ratio``.

    >>> clip_sides(torch.tensor([[0.5, 1.5, 1.0]]), torch.tensor([[-1.0], ]), 0.2, 0.2).tolist()
    [[-1, 0, 0]]
    """
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return high.to(torch.int8) - low.to(torch.int8)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "grpo",
    max_length: int | None = None,
    num_sequences: float | None = None,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[N, L]`` per-token loss to a scalar (see the module docstring for the three rules).

    >>> loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> aggregate(loss, mask, "grpo").item()  # ((1 + 3) / 2 + 2 / 1) / 2 sequences
    2.0
    >>> aggregate(loss, mask, "dr_grpo", max_length=4).item()  # (1 + 3 + 2) / (2 sequences x 4)
    0.75
    >>> aggregate(loss, mask, "dapo").item()  # (1 + 3 + 2) / 3 tokens
    2.0
    """
    m = mask.to(per_token.dtype)
    masked = per_token * m
    n_seq = per_token.shape[0] if num_sequences is None else num_sequences
    if aggregation == "grpo":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / n_seq
    if aggregation == "dr_grpo":
        if max_length is None:
            raise ValueError("dr_grpo needs max_length (the maximum completion length)")
        return masked.sum() / (n_seq * max_length)
    if aggregation == "dapo":
        tokens = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.as_tensor(tokens, dtype=per_token.dtype).clamp(min=1)
    raise ValueError(f"loss aggregation must be 'grpo', 'dr_grpo' or 'dapo', got {aggregation!r}")


@dataclass
class PolicyLoss:
    """The loss to back-propagate and the statistics logged with it (all scalars, over completion tokens)."""

    loss: Tensor  # [] with grad
    policy: Tensor  # [] surrogate part, detached
    kl: Tensor  # [] masked mean KL estimate, detached (0 when beta is 0)
    clip_fraction: Tensor  # [] tokens whose clip was active, either side
    clip_fraction_low: Tensor  # [] ratio below 1 - epsilon_low with a negative advantage
    clip_fraction_high: Tensor  # [] ratio above 1 + epsilon_high with a positive advantage
    ratio_mean: Tensor  # [] (1 on the first pass over fresh rollouts)
    ratio_min: Tensor  # []
    ratio_max: Tensor  # []
    approx_kl: Tensor  # [] mean (logp - old)^2 / 2 between the policy and the one that sampled
    entropy_bonus: Tensor  # [] entropy term subtracted from the loss, detached (0 without entropy_coef)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    max_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    num_sequences: float | None = None,
    num_tokens: float | Tensor | None = None,
    importance_sampling: ImportanceLevel = "token",
    kl_estimator: KLEstimator = "k3",
    kl_bias_correction: bool = False,
    token_weights: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_tokens: float | Tensor | None = None,
) -> PolicyLoss:
    """GRPO's loss for ``[N, L]`` log-probs, ``[N]`` advantages and a ``[N, L]`` completion mask.

    Per token: ``w * -min(r A, clip(r) A) + beta * KL``, aggregated by ``aggregation``, minus
    ``entropy_coef x`` the mean entropy.

    Args:
        importance_sampling: ``token`` ratios, or ``sequence`` (GSPO: one length-normalised ratio a sequence).
        kl_estimator: ``k1``, ``k2``, ``k3`` (default) or ``low_var_kl`` (:mod:`medrl.rl.kl`).
        kl_bias_correction: weigh the KL by the importance ratio (TRL's ``use_bias_correction_kl``).
        token_weights: ``[N, L]`` or ``[N, 1]`` weights on the policy term (engine mismatch correction, the
            high-entropy token mask); None: 1.
        entropy: ``[N, L]`` per-token entropy, with gradient when ``entropy_coef > 0``.
        entropy_coef: weight of the entropy bonus (subtracted: more entropy, lower loss).
        entropy_tokens: the bonus's normaliser (the batch's completion tokens, so micro-batches add up);
            default: this call's.
    """
    per_token, active, ratio = clipped_surrogate(
        logprobs, old_logprobs, advantages, epsilon_low, epsilon_high, mask, importance_sampling
    )
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    # An active clip is the high one for a positive advantage, the low one for a negative (clip_sides).
    clip = active.to(torch.int8) * torch.sign(adv).to(torch.int8)
    if token_weights is not None:
        per_token = per_token * token_weights
    policy_part = per_token
    kl = torch.zeros_like(logprobs)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, ratio if kl_bias_correction else None)
        per_token = per_token + beta * kl
    kwargs = {"max_length": max_length, "num_sequences": num_sequences, "num_tokens": num_tokens}
    loss = aggregate(per_token, mask, aggregation, **kwargs)
    m = mask.to(logprobs.dtype)
    count = m.sum().clamp(min=1)
    bonus = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy")
        effective = m if token_weights is None else m * (token_weights != 0).to(m.dtype)
        tokens = effective.sum() if entropy_tokens is None else entropy_tokens
        bonus = (entropy * effective).sum() / torch.as_tensor(tokens, dtype=m.dtype).clamp(min=1)
        loss = loss - entropy_coef * bonus
    with torch.no_grad():
        full = lambda t: t.expand_as(m) if t.shape != m.shape else t  # noqa: E731 - [N, 1] sequence values
        r, c = full(ratio.detach()), full(clip)
        real = m.bool()
        log_ratio = (logprobs - old_logprobs).detach()
        return PolicyLoss(
            loss=loss,
            policy=aggregate(policy_part.detach(), mask, aggregation, **kwargs),
            kl=(kl.detach() * m).sum() / count,
            clip_fraction=((c != 0).to(m.dtype) * m).sum() / count,
            clip_fraction_low=((c < 0).to(m.dtype) * m).sum() / count,
            clip_fraction_high=((c > 0).to(m.dtype) * m).sum() / count,
            ratio_mean=(r * m).sum() / count,
            ratio_min=r[real].min() if real.any() else torch.ones(()),
            ratio_max=r[real].max() if real.any() else torch.ones(()),
            approx_kl=(0.5 * log_ratio.square() * m).sum() / count,
            entropy_bonus=bonus.detach(),
        )


def global_token_count(mask: Tensor) -> Tensor:
    """Completion tokens on this process, summed over all processes and divided by their number.

    DDP averages gradients across processes, so dividing each process's token sum by ``total / world``
    makes the averaged gradient equal to that of the token mean over the global batch (``dapo``).
    """
    count = mask.sum().to(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count


def is_finite(value: Tensor | float) -> bool:
    """False for NaN or infinite losses, which the trainer skips and logs instead of applying."""
    v = value.detach().float().item() if isinstance(value, Tensor) else float(value)
    return math.isfinite(v)
