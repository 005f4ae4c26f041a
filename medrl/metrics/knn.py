"""The weighted cosine k-nearest-neighbour classifier on frozen features (the DINO evaluation rule, which the
study's authors also report in their release as ``knn.py``).

Features are L2-normalised; each query's ``k`` most similar training features vote for their labels with
weight ``exp(similarity / T)``; the votes, normalised to sum to 1, are the class probabilities (per label for
multi-label data: the weighted share of neighbours carrying it). The training bank is scanned in chunks, so
memory stays ``[batch, chunk]`` whatever the training set's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def knn_probabilities(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    k: int,
    num_classes: int,
    multilabel: bool = False,
    temperature: float = TEMPERATURE,
    chunk: int = 16384,
) -> Tensor:
    """``[Q, C]`` probabilities of ``[Q, D]`` queries from a ``[N, D]`` bank with labels ``[N, 1]`` (class
    indices) or ``[N, C]`` (multi-label 0/1).

    >>> bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    >>> labels = torch.tensor([[0], [1], [1]])
    >>> p = knn_probabilities(torch.tensor([[1.0, 0.1]]), bank, labels, k=2, num_classes=2, temperature=1.0)
    >>> [round(v, 4) for v in p[0].tolist()]  # neighbours: [1, 0] (sim 0.995, class 0), [.8,.6] (0.856, class 1)
    [0.5348, 0.4652]
    """
    q = F.normalize(queries.float(), dim=-1)
    b = F.normalize(bank.float(), dim=-1)
    k = min(k, b.shape[0])
    best_sim = torch.full((q.shape[0], 0), -2.0)
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, b.shape[0], chunk):
        sim = q @ b[start : start + chunk].T
        top = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim = torch.cat([best_sim, top.values], dim=1)
        best_idx = torch.cat([best_idx, top.indices + start], dim=1)
        keep = best_sim.topk(min(k, best_sim.shape[1]), dim=1)
        best_sim, best_idx = keep.values, best_idx.gather(1, keep.indices)
    weights = torch.exp(best_sim / temperature)  # [Q, k]
    labels = bank_labels[best_idx]  # [Q, k, 1] or [Q, k, C]
    if multilabel:
        votes = (weights.unsqueeze(-1) * labels.float()).sum(1)
    else:
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, labels[..., 0].long(), weights)
    return votes / weights.sum(1, keepdim=True)
