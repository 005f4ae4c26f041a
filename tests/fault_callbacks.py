"""Callbacks that inject a fault into a real `medrl fit` (named by class path in a test's config fragment)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class ReadOnlyAfterStep(Callback):
    """Make the whole run folder read-only once ``step`` training steps have run, as a full quota or a
    remounted disk would."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            root = Path(trainer.default_root_dir)
            for path in [root, *root.rglob("*")]:
                os.chmod(path, 0o555 if path.is_dir() else 0o444)
