"""LoRA (through PEFT) on a VLM's language model, what else trains, and saving in Hugging Face formats.

Vision towers have ``q_proj``/``gate_proj``/... layers of their own (SigLIP's attention, one family's MLPs), so
the usual list of module names would put adapters on the vision tower too. Targets here are a regex over
module paths that matches only the decoder layers outside every family's vision tower. The vision tower and
its projector (each family's ``tower`` / ``projector`` in :mod:`medrl.models.families`: ``visual`` /
``visual.merger``, ``vision_model`` / ``connector``, ``vision_tower`` / ``multi_modal_projector``) stay frozen
unless asked; when asked, they train fully (PEFT
``modules_to_save``) and their weights travel in the adapter folder.

Everything written here (adapter, merged or fully fine-tuned model) is a plain ``save_pretrained`` folder: it
loads with ``PeftModel.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` without medrl.
Folders appear atomically: written under a temporary name, then renamed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from medrl.core.errors import ConfigError
from medrl.core.io import is_no_space, no_space_error, umask_modes
from medrl.models.families import families, vision_modules

LANGUAGE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VisionTraining = Literal["frozen", "projector", "all"]


@dataclass
class LoRAConfig:
    """LoRA settings for the language model.

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: names of the language model's linear layers that get adapters.
        modules_to_save: language-model modules trained in full and saved with the adapter, e.g. ``norm``
            (the final norm, which sets how sharp the output distribution can get) or ``lm_head``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_PROJECTIONS))
    modules_to_save: list[str] = field(default_factory=list)


def language_target_regex(names: Sequence[str]) -> str:
    """A PEFT ``target_modules`` regex: the named projections of decoder layers, never inside the vision tower.

    >>> import re
    >>> pattern = language_target_regex(["q_proj", "down_proj"])
    >>> bool(re.fullmatch(pattern, "model.language_model.layers.3.mlp.down_proj"))
    True
    >>> bool(re.fullmatch(pattern, "model.visual.blocks.0.mlp.down_proj"))
    False
    """
    if not names:
        raise ConfigError("LoRA needs at least one target module name (e.g. q_proj, v_proj)")
    alternatives = "|".join(re.escape(n) for n in names)
    towers = "|".join(sorted({re.escape(f.tower) for f in families().values()}))
    return rf"^(?!.*\b(?:{towers})\b).*\blayers\.\d+\.(?:self_attn|mlp)\.(?:{alternatives})$"


def _vision_modules_to_save(vision: VisionTraining, model: torch.nn.Module) -> list[str] | None:
    if vision not in ("frozen", "projector", "all"):
        raise ConfigError(f"vision must be 'frozen', 'projector' or 'all', got {vision!r}")
    if vision == "frozen":
        return None
    names = [name for name, _ in model.named_parameters()]
    tower, projector = vision_modules(names)
    if vision == "projector":
        return [projector]
    nested = any({tower, projector} <= set(name.split(".")) for name in names)  # a projector inside the tower
    return [tower] if nested else [tower, projector]


def apply_lora(model: torch.nn.Module, config: LoRAConfig, vision: VisionTraining = "frozen"):
    """Wrap ``model`` in a ``PeftModel`` whose only trainable weights are the adapters (plus vision, if asked).

    Raises a ``ValueError`` naming the missing layers when a target name matches nothing in the language model.
    """
    from peft import LoraConfig, get_peft_model

    pattern = language_target_regex(config.target_modules)
    matched = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if re.fullmatch(pattern, name)}
    missing = sorted(set(config.target_modules) - matched)
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} match no language-model layer of {type(model).__name__}; "
            f"the language model's projections are named {LANGUAGE_PROJECTIONS}"
        )
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=pattern,
        modules_to_save=[*config.modules_to_save, *(_vision_modules_to_save(vision, model) or [])] or None,
        bias="none",
    )
    return get_peft_model(model, peft_config)


def set_full_finetune(model: torch.nn.Module, vision: VisionTraining = "frozen") -> torch.nn.Module:
    """Make every language-model weight trainable; the vision tower and projector only as ``vision`` asks."""
    _vision_modules_to_save(vision, model)
    tower, projector = vision_modules([name for name, _ in model.named_parameters()])
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_projector = projector in parts  # inside the tower in one family, beside it in the others
        in_vision = tower in parts or in_projector
        param.requires_grad_(not in_vision or vision == "all" or (vision == "projector" and in_projector))
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def is_peft(model: torch.nn.Module) -> bool:
    """True for a PEFT-wrapped model."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def write_folder(target: str | os.PathLike, write: Callable[[Path], None], needed_bytes: int = 0) -> Path:
    """Run ``write(tmp)`` into a sibling temp folder, then put it at ``target`` (replacing an older copy).

    A full disk is one line naming the folder and about ``needed_bytes`` (the caller's estimate) to free.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp)
        umask_modes(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException as exc:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(exc):
            # At least what was written before the disk filled; the model's own size is the better guess.
            raise no_space_error(target.parent, f"{target.name}/", max(written, needed_bytes)) from exc
        raise
    return target


def save_pretrained(
    model: torch.nn.Module, out_dir: str | os.PathLike, processor=None, card: str | None = None
) -> Path:
    """``model.save_pretrained`` (adapter only for a PEFT model) plus the processor, and ``card`` as its
    ``README.md`` (replacing the stub PEFT writes), all appearing at once."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)

    adapter_only = is_peft(model)  # an adapter folder holds the trained weights only
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if not adapter_only or p.requires_grad)
    return write_folder(out_dir, write, needed)


def save_merged(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    card: str | None = None,
) -> Path:
    """Merge a saved adapter into a fresh copy of its base model and ``save_pretrained`` the result.

    The base is loaded again (on CPU) instead of merging the live training model, whose weights a merge
    and unmerge in bf16 would perturb. (:func:`medrl.models.hub.merge_adapter` finds the base an adapter
    records.)

    Args:
        adapter_dir: a PEFT adapter folder (as written by :func:`save_pretrained`).
        out_dir: where the merged model goes.
        base_path: the base model's folder.
        dtype: weight dtype to load and save in; default: the base model's own.
        card: the merged model's ``README.md``.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir = Path(adapter_dir)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    has_processor = (adapter_dir / "preprocessor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(adapter_dir if has_processor else base_path)
    return save_pretrained(merged, out_dir, processor, card)
