"""The CARE reference model: an exponential moving average of the policy, swapped in only to score.

Only the trainable parameters are averaged (with LoRA, the adapter; with full fine-tuning, everything that
trains): frozen weights are the same in the policy and its average, so no second model is ever held. The
average is kept in float32 even when the model trains in bf16, where a 0.5 % step would round away.
Under FSDP the average is sharded like the parameters (:meth:`EMAReference.shard_like`); checkpoints hold
it whole, so they load on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


class EMAReference:
    """EMA shadow of a model's trainable parameters (CARE: decay 0.995 applied every 10 optimizer steps).

    Args:
        model: the policy; its parameters that require grad are tracked, by name.
        decay: weight of the old average in each update, ``ema = decay * ema + (1 - decay) * param``.
        every: apply one update every this many optimizer steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, every: int = 10) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1 step, got {every}")
        self.decay, self.every = decay, every
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("EMAReference: the model has no trainable parameters to average")

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMAReference: the model lacks tracked parameters, e.g. {missing[0]!r}")
        return {n: params[n] for n in self.shadow}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA update from the model's current weights."""
        for name, p in self._params(model).items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - self.decay)

    def maybe_update(self, model: nn.Module, step: int) -> bool:
        """Update when ``step`` (optimizer steps taken so far, counted from 1) is a multiple of ``every``."""
        if step > 0 and step % self.every == 0:
            self.update(model)
            return True
        return False

    def shard_like(self, model: nn.Module) -> EMAReference:
        """Shard each average like its (FSDP-sharded) parameter, so each process keeps only its part."""
        for name, p in self._params(model).items():
            s = self.shadow[name]
            if isinstance(p, DTensor) and not isinstance(s, DTensor):
                self.shadow[name] = distribute_tensor(s.to(p.device), p.device_mesh, p.placements)
        return self

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model's tracked parameters hold the EMA weights; restored on exit."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if units:
            with self._copied_in(model, units):
                yield model
            return
        params = self._params(model)
        saved = {}
        try:
            for name, p in params.items():
                saved[name] = p.data
                p.data = self.shadow[name].to(device=p.device, dtype=p.dtype)
            yield model
        finally:
            for name, data in saved.items():
                params[name].data = data

    @contextmanager
    def _copied_in(self, model: nn.Module, units: list[nn.Module]) -> Iterator[None]:
        # FSDP gathers from shard storage it holds a view of: swapping `.data` would go unseen, so copy into the
        # shards, with every unit resharded first (a unit left whole would keep computing with what it holds).
        for unit in units:
            unit.reshard()
        params = self._params(model)
        saved = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.shadow[name].to(p.dtype))
            yield
        finally:
            for unit in units:
                unit.reshard()
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def to(self, device: torch.device | str) -> EMAReference:
        """Move the shadow weights (e.g. next to the model after Lightning placed it)."""
        self.shadow = {n: s.to(device) for n, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        """Tensors and numbers only: safe to load with ``weights_only=True``. Sharded averages are gathered
        whole (on CPU), so every process must call this."""
        shadow = {n: s.full_tensor().cpu() if isinstance(s, DTensor) else s for n, s in self.shadow.items()}
        return {"decay": self.decay, "every": self.every, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore the average written by :meth:`state_dict` (names must match the tracked parameters)."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra = sorted(set(shadow) ^ set(self.shadow))[:3]
            raise KeyError(f"EMAReference: checkpoint tracks different parameters than the model, e.g. {extra}")
        self.decay, self.every = float(state["decay"]), int(state["every"])
        current = self.shadow
        self.shadow = {}
        for n, t in shadow.items():
            like = current[n]
            t = t.to(device=like.device, dtype=torch.float32)
            self.shadow[n] = distribute_tensor(t, like.device_mesh, like.placements) if isinstance(like, DTensor) else t
