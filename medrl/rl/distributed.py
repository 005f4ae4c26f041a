"""What GRPO agrees on across processes, so one step means the same on 1 process and on many.

Each process generates, scores and normalises its own prompts' groups (a group never straddles processes,
so group statistics need no communication). Only these need the other processes:

- decisions every process must take together, or the collective calls of DDP/FSDP would hang: whether a
  dynamic-sampling step waits or trains and on how many groups (:func:`global_min`), how many forward passes
  a sharded model runs (:func:`global_max`);
- statistics of the whole batch: the ``batch`` advantage scale (:func:`global_std`) and ``dapo``'s token
  count (:func:`medrl.rl.losses.global_token_count`);
- per-process state a checkpoint keeps (:func:`gather_objects`).

On one process (or without ``torch.distributed``) every function reduces to its local meaning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(value: float, op: Any, device: torch.device | str) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def global_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``value`` over all processes (``device``: where the backend reduces, e.g. cuda for nccl)."""
    return value if world_size() == 1 else int(_all_reduce(value, dist.ReduceOp.MIN, device))


def global_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all processes."""
    return value if world_size() == 1 else int(_all_reduce(value, dist.ReduceOp.MAX, device))


def global_std(values: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Unbiased standard deviation of ``values`` (any shape) pooled over all processes, as ``torch.std`` of
    their concatenation would give.

    >>> round(global_std(torch.tensor([1.0, 2.0, 3.0, 4.0])).item(), 4)  # one process: torch.std
    1.291
    """
    flat = values.detach().double().flatten()
    if world_size() == 1:
        return flat.std().to(values.dtype)
    # Sums, not a mean of per-process stds: processes may hold different numbers of values.
    stats = torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(), (flat * flat).sum()]).to(device)
    dist.all_reduce(stats)
    count, total, squares = stats.tolist()
    mean = total / count
    var = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    return torch.tensor(var**0.5, dtype=values.dtype)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
