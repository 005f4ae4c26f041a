"""Hugging Face exports of the policy at chosen optimizer steps of one run.

A model trained for N steps of a schedule is the same model as the longer run's weights after step N
(same seed, data order and learning-rate schedule), so one run with :class:`StepExports` gives every rung of
a ladder of training budgets (the study's support-boundary sweep) without training each rung anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from medrl.callbacks.hf_checkpoint import HFCheckpoint
from medrl.core.errors import ConfigError


def step_export_dir(dirpath: str | Path, step: int) -> Path:
    """Where :class:`StepExports` writes the export of optimizer step ``step``: ``dirpath/step-N.hf``."""
    return Path(dirpath) / f"step-{step}.hf"


class StepExports(L.Callback):
    """Export the policy (as :class:`HFCheckpoint` does) after each of ``steps`` optimizer steps.

    Args:
        steps: the optimizer steps (``trainer.global_step`` after the update) to export at.
        dirpath: the folder that receives ``step-N.hf/`` per step.
        merged: also write the adapter merged into its base model (LoRA runs).
    """

    def __init__(self, steps: Sequence[int], dirpath: str, merged: bool = False) -> None:
        if any(int(s) < 1 for s in steps):
            raise ConfigError(f"StepExports: steps must be >= 1, got {list(steps)}")
        self.steps = sorted({int(s) for s in steps})
        self.dirpath = dirpath
        self._exporter = HFCheckpoint(merged=merged)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Export once the update that makes ``global_step`` one of ``steps`` has been applied."""
        step = trainer.global_step
        if step not in self.steps or not trainer.is_global_zero:
            return
        out = step_export_dir(self.dirpath, step)
        # With gradient accumulation several batches end on one step; the first one exports it. A resumed
        # run does not export again what it already wrote.
        if not out.exists():
            self._exporter.export(pl_module, out, trainer)
