"""``ModelCheckpoint`` whose ``last`` checkpoint is always the final step of training.

Lightning 2.6 saves ``last`` whenever it saves on a schedule (``every_n_train_steps``, each epoch) and, at
the end of training, only if no ``last`` was saved yet. With ``every_n_train_steps: 5`` and ``max_steps:
12`` the run ends with ``last.ckpt`` from step 10: resuming from it repeats two steps, and an export made
from it misses them. :class:`Checkpoint` saves ``last`` once more at the end whenever the final step is not
the one saved.
It also never writes non-finite weights: a save of a model holding NaN or inf stops the run
(:class:`medrl.callbacks.finite.NonFiniteError`) and leaves the earlier checkpoints as they are.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from medrl.callbacks.finite import NonFiniteError, nonfinite_parameter, stop_message


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments), with ``last`` brought to the final step at the end."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        final = trainer.global_step
        if self.save_last and final > 0 and not trainer.fast_dev_run and self._last_global_step_saved != final:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        bad = nonfinite_parameter(trainer.lightning_module)
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            what = f"the weight {bad or 'on another process'}"
            raise NonFiniteError(stop_message(trainer.global_step, what, trainer))
        super()._save_checkpoint(trainer, filepath)
