"""What ``--ckpt_path`` resumes: ``last`` found in the run folder, and a checkpoint that belongs to this command.

Lightning resolves ``--ckpt_path last`` through the checkpoint callbacks of the *new* run, whose folder is a
fresh ``version_N``: it finds nothing, warns, and trains from step 0. Here ``last`` is the newest
``last.ckpt`` (or ``last-vN.ckpt``) under the run folder (``trainer.default_root_dir``) and the checkpoint
folders the config names; with none, the command stops with one line.

LightningCLI then replaces the command's model options with the ones saved in the checkpoint. A checkpoint of
another module (an SFT checkpoint given to GRPO) would build the wrong module, and an option changed on the
command line (``sampling.num_generations``, ``loss.aggregation``) would be dropped without a word; both are
refused here, naming what differs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from medrl.core.errors import ConfigError, UserError

_LAST = re.compile(r"last(-v\d+)?\.ckpt")
# Keys Lightning adds to a checkpoint's hyperparameters that are not options.
_BOOKKEEPING = ("_class_path", "_instantiator")
# A module's kind in words, for the message about a checkpoint of another module.
_KINDS = {"SFTModule": "an SFT", "GRPOModule": "a GRPO", "ProbeModule": "a probe"}


def _get(settings: Any, dotted: str) -> Any:
    value = settings
    for key in dotted.split("."):
        if value is None:
            return None
        value = value.get(key) if hasattr(value, "get") else getattr(value, key, None)
    return value


def checkpoint_folders(settings: Any) -> list[Path]:
    """Where a run's checkpoints are: its ``default_root_dir`` (or the working folder) and each callback's
    ``dirpath`` in the config."""
    folders = [Path(_get(settings, "trainer.default_root_dir") or os.getcwd())]
    callbacks = _get(settings, "trainer.callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        dirpath = _get(callback, "init_args.dirpath")
        if dirpath:
            folders.append(Path(dirpath))
    return folders


def resolve_last(settings: Any) -> Path:
    """The newest ``last.ckpt`` under :func:`checkpoint_folders`; one line naming them when there is none."""
    folders = checkpoint_folders(settings)
    found = {p for folder in folders if folder.is_dir() for p in folder.rglob("last*.ckpt") if _LAST.fullmatch(p.name)}
    if not found:
        where = ", ".join(str(f) for f in dict.fromkeys(folders))
        raise UserError(
            f"--ckpt_path last: no last.ckpt under {where}; pass the run's folder as --trainer.default_root_dir "
            "(or a checkpoint file as --ckpt_path), or leave --ckpt_path out to start a new run"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _plain(value: Any) -> Any:
    """A value as comparable JSON-like data (namespaces and dataclasses as dicts, numbers as floats)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        value = {name: getattr(value, name) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    return str(value)


def _differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """``name: saved -> given`` for every option whose value differs (nested groups by dotted name)."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in saved:
            # None: not given (options the data fills in later, such as a probe's num_classes, parse as None).
            if key in given and given[key] is not None and key not in _BOOKKEEPING:
                out += _differences(saved[key], given[key], f"{prefix}{key}.")
        return out
    return [] if saved == given else [f"{prefix.rstrip('.')} {_shown(saved)} -> {_shown(given)}"]


def _shown(value: Any) -> str:
    """A compared value as the user wrote it: ``4``, not the ``4.0`` it was compared as."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def check_resume(ckpt_path: str | os.PathLike, model: Any, resuming: bool = True) -> None:
    """``ckpt_path`` was written by the module the command trains, with the options the command gives.

    ``model`` is the command's parsed ``model`` (``class_path`` and ``init_args``). Raises one line when the
    checkpoint is another module's, or, when ``resuming`` a fit, when an option differs (LightningCLI would use
    the checkpoint's value). For ``validate``/``test``/``predict`` a difference is said on stderr instead.
    """
    import torch

    # mmap: only the hyperparameters are read here, not the weights.
    hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters") or {}
    saved_class, wanted = hparams.get("_class_path"), _get(model, "class_path")
    if saved_class and wanted and saved_class != wanted:
        kind = _KINDS.get(str(saved_class).rsplit(".", 1)[-1], "another module's")
        raise UserError(
            f"--ckpt_path {ckpt_path} is {kind} checkpoint ({saved_class}) and this command trains {wanted}: "
            "resume it with the config that wrote it, or start the new training from its exported model "
            "(--model.init_args.model with the checkpoint's .hf folder) without --ckpt_path"
        )
    changed = _differences(_plain(hparams), _plain(_get(model, "init_args") or {}))
    if changed and not resuming:
        print(f"medrl: {ckpt_path} keeps its own model options: {'; '.join(changed)}", file=sys.stderr)
    elif changed:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with other model options than this command gives ("
            + "; ".join(changed)
            + "): a resumed run keeps its checkpoint's options, so drop the changed ones, or start a new run "
            "without --ckpt_path"
        )
