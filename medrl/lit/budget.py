"""Applying the model's prompt budget to the data a LightningModule is about to see."""

from __future__ import annotations

import lightning as L

from medrl.models.budget import prompt_budget


def apply_prompt_budget(module: L.LightningModule, completion_tokens: int, max_prompt_length: int | None) -> None:
    """Drop (and report) the rows of the trainer's datamodule whose prompt the model cannot take.

    Called from ``setup``, after the datamodule has read its splits and before any loader is built. A
    datamodule without ``apply_prompt_budget`` (the probes' features) is left alone.
    """
    apply = getattr(module.trainer.datamodule, "apply_prompt_budget", None)
    if apply is not None:
        apply(prompt_budget(module.processor, module.model.config, completion_tokens, max_prompt_length))
