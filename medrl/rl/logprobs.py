"""Token log-probs and entropies from logits, chunked so a large vocabulary never materialises a full softmax."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, ids: Tensor, chunk: int = 8) -> Tensor:
    """``log softmax(logits)[ids]``: ``[N, L, V]`` logits and ``[N, L]`` ids -> ``[N, L]`` float32.

    Rows are processed ``chunk`` at a time (the full ``[N, L, V]`` log-softmax is the memory peak of a
    GRPO step with a 150k vocabulary).

    >>> logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    >>> [round(v, 4) for v in token_logprobs(logits, torch.tensor([[1, 0]]))[0].tolist()]  # log 1/2, log e^2/(e^2+1)
    [-0.6931, -0.1269]
    """
    out = []
    for lg, ix in zip(logits.split(chunk), ids.split(chunk), strict=True):
        lg = lg.float()
        picked = lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def token_entropy(logits: Tensor, chunk: int = 8, grad: bool = False) -> Tensor:
    """Entropy of each next-token distribution: ``[N, L, V]`` -> ``[N, L]`` float32; differentiable with
    ``grad`` (the entropy bonus), else computed without a graph.

    >>> [round(v, 4) for v in token_entropy(torch.zeros(1, 1, 4))[0].tolist()]  # uniform over 4: log 4
    [1.3863]
    """
    out = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for lg in logits.split(chunk):
            logp = torch.log_softmax(lg.float(), dim=-1)
            out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)
