"""The GRPO policy loss: clipped surrogate, k3 KL, and three ways to average over tokens.

Per token (``[N, L]``): ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL`` with
``ratio = exp(logp - old_logp)`` and the k3 estimator ``KL = exp(ref - logp) - (ref - logp) - 1``.

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

Aggregation = Literal["grpo", "dr_grpo", "dapo"]


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``; ``[N, L]``.

    Unbiased, non-negative, and zero exactly where the two log-probs agree.

    >>> kl = k3_kl(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, 0.0]]))  # d=0 -> 0; d=1 -> e - 2 = 0.71828
    >>> [round(v, 5) for v in kl[0].tolist()]
    [0.0, 0.71828]
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped policy loss ``[N, L]``, whether the clip was active ``[N, L]``, and the ratio ``[N, L]``.

    ``advantages`` is ``[N]`` (one per sequence) or ``[N, L]``. DAPO's clip-higher uses ``epsilon_high >
    epsilon_low`` so unlikely tokens with positive advantage can still grow.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, active, ratio


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
    """The loss to back-propagate and the statistics logged with it (all scalars)."""

    loss: Tensor  # [] with grad
    policy: Tensor  # [] surrogate part, detached
    kl: Tensor  # [] masked mean k3 KL, detached (0 when beta is 0)
    clip_fraction: Tensor  # [] fraction of completion tokens whose clip was active
    ratio_mean: Tensor  # [] masked mean ratio (1 on the first pass over fresh rollouts)


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
) -> PolicyLoss:
    """GRPO's loss for ``[N, L]`` log-probs, ``[N]`` advantages and a ``[N, L]`` completion mask."""
    per_token, active, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, epsilon_low, epsilon_high)
    policy_part = per_token
    kl = torch.zeros_like(per_token)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    kwargs = {"max_length": max_length, "num_sequences": num_sequences, "num_tokens": num_tokens}
    loss = aggregate(per_token, mask, aggregation, **kwargs)
    m = mask.to(per_token.dtype)
    count = m.sum().clamp(min=1)
    with torch.no_grad():
        return PolicyLoss(
            loss=loss,
            policy=aggregate(policy_part.detach(), mask, aggregation, **kwargs),
            kl=(kl.detach() * m).sum() / count,
            clip_fraction=(active.to(m.dtype) * m).sum() / count,
            ratio_mean=(ratio.detach() * m).sum() / count,
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
