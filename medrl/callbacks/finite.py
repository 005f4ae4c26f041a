"""Stop a run the moment its loss or weights stop being finite, before anything non-finite is saved.

An optimizer step that overflows (a learning rate far too high, a bad batch in low precision) leaves NaN or
inf in the weights; training then goes on "successfully": an SFT run ended with exit 0 and a ``last.ckpt``
and ``last.hf`` full of NaN, and its best checkpoint ranked on a NaN ``val/loss``; GRPO died a step later
inside ``torch.multinomial`` with nothing naming the cause. :class:`FiniteGuard` checks the step's loss and the
trained weights after every training batch, and the validation losses after each validation, and stops with
one line (:class:`NonFiniteError`, exit 2 from ``medrl``): the step, what went non-finite, the likely cause.
Lightning's checkpoint callbacks run after it, so the last checkpoint on disk is the last finite one, and
:class:`medrl.callbacks.checkpoint.Checkpoint` refuses to write non-finite weights in any case.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medrl.core.errors import UserError


class NonFiniteError(UserError):
    """Training produced a NaN or inf loss or weight; the message names the step and the likely cause."""


def nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first trained parameter holding a NaN or inf on this process, else None."""
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard
        if not bool(torch.isfinite(local.detach()).all()):
            return name
    return None


def _learning_rate(trainer: L.Trainer) -> str:
    try:
        return f"{trainer.optimizers[0].param_groups[0]['lr']:g}"
    except (IndexError, KeyError, AttributeError, TypeError):
        return "unknown"


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss if isinstance(loss, torch.Tensor) else None


def stop_message(step: int, what: str, trainer: L.Trainer) -> str:
    """The one line a non-finite run stops with."""
    return (
        f"step {step}: {what} is not finite (NaN or inf); the run stopped and saved nothing from this step, so "
        "the checkpoints on disk are the last finite ones. Likely cause: the learning rate "
        f"({_learning_rate(trainer)}) is too high for this model (or the loss overflowed in low precision): "
        "lower it (--optimizer.init_args.lr, or --model.init_args.optim.lr for GRPO) and restart"
    )


class FiniteGuard(Callback):
    """Raise :class:`NonFiniteError` on a non-finite training loss, trained weight or validation loss.

    Args:
        check_weights: also scan the trained weights after each batch (one read of them; off saves it on
            very large models, at the cost of catching a NaN weight only through the next loss).
    """

    def __init__(self, check_weights: bool = True) -> None:
        self.check_weights = check_weights

    def _stop_if(self, trainer: L.Trainer, what: str | None) -> None:
        # Every process decides together: a rank stopping alone would leave the others in a collective.
        bad = trainer.strategy.reduce_boolean_decision(what is not None, all=False)
        if bad:
            raise NonFiniteError(stop_message(trainer.global_step, what or "a value on another process", trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Check the step's loss (when the module returns one) and the trained weights."""
        what = None
        loss = _loss_of(outputs)
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            what = f"the training loss ({loss.detach().float().mean().item()})"
        elif self.check_weights and (name := nonfinite_parameter(pl_module)) is not None:
            what = f"the weight {name}"
        self._stop_if(trainer, what)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every validation loss that was logged (``val/loss`` ranks checkpoints); while fitting only."""
        if trainer.state.fn != "fit":
            return
        what = None
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val") and "loss" in key and not bool(torch.isfinite(torch.as_tensor(value)).all()):
                what = f"{key} ({float(value)})"
                break
        self._stop_if(trainer, what)
