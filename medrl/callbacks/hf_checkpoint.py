"""Lightning checkpoints plus Hugging Face folders beside them, usable without medrl.

Next to each ``NAME.ckpt`` (Lightning's own, for exact resume) :class:`HFCheckpoint` writes ``NAME.hf/``:

- ``adapter/``: the PEFT adapter and the processor, for ``PeftModel.from_pretrained(base, ".../adapter")``
  (when the module trains LoRA);
- ``model/``: the whole model and processor, for ``AutoModelForImageTextToText.from_pretrained`` (full
  fine-tuning);
- ``merged/`` (with ``merged: true``): the adapter merged into a fresh copy of the base, same loader.

Each folder carries its model card (``README.md``, :mod:`medrl.models.model_card`): base, method and options,
data files with their MD5, the run's latest Pass@K evaluation, medrl's version and code revision, and the
command that reproduces it.

The folder goes when Lightning deletes its checkpoint (``save_top_k``). It works with any LightningModule
that exposes ``model`` (a transformers model, PEFT-wrapped or not) and ``processor``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from medrl.callbacks.card_facts import card_facts
from medrl.callbacks.checkpoint import Checkpoint
from medrl.models.hub import merge_adapter
from medrl.models.lora import is_peft, save_pretrained, write_folder
from medrl.models.model_card import render_card

HF_SUFFIX = ".hf"


def hf_dir(ckpt_path: str | Path) -> Path:
    """The Hugging Face folder that belongs to a Lightning checkpoint: ``run/x.ckpt`` -> ``run/x.hf``."""
    path = Path(ckpt_path)
    return path.with_name(path.stem + HF_SUFFIX)


class HFCheckpoint(Checkpoint):
    """``ModelCheckpoint`` that also exports the policy in Hugging Face / PEFT format beside each checkpoint.

    ``last`` (and its export) is always the final step of training (:class:`medrl.callbacks.checkpoint.Checkpoint`).

    Args:
        merged: also write the adapter merged into its base model (reloads the base on CPU at each save).
        **kwargs: every ``ModelCheckpoint`` argument (dirpath, monitor, save_top_k, every_n_train_steps, ...).
    """

    def __init__(self, merged: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.merged = merged
        self._warned_sharded = False
        self._last_export: tuple[int, Path] | None = None  # (global step, folder) of the latest export

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        out = hf_dir(filepath)
        previous = self._last_export
        if previous and previous[0] == trainer.global_step and previous[1] != out and previous[1].is_dir():
            # The top-k and the `last` checkpoint of one step hold the same weights: copy, don't merge twice.
            write_folder(out, lambda tmp: shutil.copytree(previous[1], tmp, dirs_exist_ok=True))
        elif self.export(trainer.lightning_module, out, trainer) is None:
            return
        self._last_export = (trainer.global_step, out)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(hf_dir(filepath), ignore_errors=True)

    def export(self, module: L.LightningModule, out: Path, trainer: L.Trainer | None = None) -> Path | None:
        """Write ``out/adapter`` (LoRA) or ``out/model`` (full), and ``out/merged`` when asked; None if skipped."""
        if trainer is not None and isinstance(
            trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)
        ):
            if not self._warned_sharded:
                rank_zero_warn(
                    f"{type(self).__name__}: weights are sharded under {type(trainer.strategy).__name__}; no "
                    "Hugging Face folder is written beside the checkpoints (consolidate the checkpoint first)"
                )
                self._warned_sharded = True
            return None
        model, processor = getattr(module, "model", None), getattr(module, "processor", None)
        if model is None or not hasattr(model, "save_pretrained"):
            raise TypeError(f"{type(module).__name__} has no `model` with save_pretrained: nothing to export")

        facts = card_facts(module, trainer, "model")  # gathered once (git, data hash) for every part's card

        def card(kind: str) -> str:
            return render_card(replace(facts, kind=kind))

        if is_peft(model):
            adapter = save_pretrained(model, out / "adapter", processor, card("adapter"))
            if self.merged:
                merge_adapter(adapter, out / "merged", card=card("merged"))
        else:
            save_pretrained(model, out / "model", processor, card("model"))
        return out
