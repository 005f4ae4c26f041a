"""What a training run knows about the model it exports, gathered for its model card."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import lightning as L

import medrl
from medrl.core.hashing import file_digest
from medrl.core.versions import code_revision
from medrl.models.model_card import CardFacts, base_license

# The options a reader of a card needs, per option group of the GRPO module (the rest stay in the config).
GRPO_OPTIONS = {
    "sampling": ("num_generations", "temperature", "top_p", "max_completion_length", "dynamic_sampling"),
    "loss": ("aggregation", "advantage_estimator", "beta", "epsilon_low", "epsilon_high", "mu", "importance_sampling"),
    "care": ("enabled", "bonus"),
    "optim": ("lr", "weight_decay", "warmup_steps", "max_grad_norm"),
}
DATA_OPTIONS = (
    "flag", "size", "mode", "num_options", "answer_with", "train_samples", "val_samples", "seed", "synthetic",
)  # fmt: skip
METHODS = {"SFTModule": "SFT", "GRPOModule": "GRPO", "ProbeModule": "probe"}


@functools.lru_cache(maxsize=32)
def _md5(path: str, size: int, mtime: float) -> str:  # size and mtime key the cache: a rewritten file is hashed anew
    return file_digest(path, "md5")


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    return value


def training_options(module: L.LightningModule, trainer: L.Trainer | None) -> dict[str, Any]:
    """The options that matter, flattened to ``group.name`` (GRPO) or plain names (SFT), plus the optimizer's lr."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    out: dict[str, Any] = {key: hparams[key] for key in ("finetune", "vision") if hparams.get(key) is not None}
    lora = _plain(hparams.get("lora"))
    if isinstance(lora, dict) and hparams.get("finetune") == "lora":
        out |= {f"lora.{k}": lora[k] for k in ("r", "alpha", "dropout") if k in lora}
    for group, names in GRPO_OPTIONS.items():
        values = _plain(hparams.get(group))
        if isinstance(values, dict):
            out |= {f"{group}.{name}": values[name] for name in names if name in values}
    if isinstance(hparams.get("rewards"), dict):
        out["rewards"] = ", ".join(f"{k} x{v:g}" for k, v in hparams["rewards"].items())
    if trainer is not None and trainer.optimizers and "optim.lr" not in out:
        out["lr"] = trainer.optimizers[0].param_groups[0].get("initial_lr", trainer.optimizers[0].param_groups[0]["lr"])
    return out


def data_facts(trainer: L.Trainer | None) -> dict[str, Any]:
    """The datamodule's settings that say what was trained on, and its file by name and MD5."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is None:
        return {}
    hparams = dict(getattr(dm, "hparams", {}) or {})
    out: dict[str, Any] = {"data": type(dm).__name__}
    if getattr(dm, "flag", None):  # a per-flag DataModule presets it: hparams hold None
        out["flag"] = dm.flag
    out |= {key: hparams[key] for key in DATA_OPTIONS if hparams.get(key) is not None}
    try:
        path = Path(dm.path) if hasattr(dm, "path") else None
    except Exception:  # noqa: BLE001 - a datamodule whose path cannot be resolved just has no file line
        path = None
    if path is not None and path.is_file():
        stat = path.stat()
        out[f"file {path.name} (MD5)"] = _md5(str(path), stat.st_size, stat.st_mtime)
    return out


def evaluation_rows(trainer: L.Trainer | None) -> list[dict[str, Any]]:
    """The latest Pass@K evaluation of the run (any callback with ``last_summary``), a row per group."""
    for callback in getattr(trainer, "callbacks", None) or []:
        summary = getattr(callback, "last_summary", None)
        if summary:
            return [{"group": group, **metrics} for group, metrics in summary.items()]
    return []


def reproduce_commands(trainer: L.Trainer | None) -> list[str]:
    """``medrl fit --config <the run's saved config>``, its path relative to the run folder."""
    if trainer is None or not trainer.log_dir:
        return []
    config = Path(trainer.log_dir) / "config.yaml"
    if not config.is_file():
        return []
    return [f"medrl fit --config {os.path.relpath(config, trainer.default_root_dir)}"]


def card_facts(module: L.LightningModule, trainer: L.Trainer | None, kind: str) -> CardFacts:
    """Everything the card of ``module``'s export says (``kind``: model, merged or adapter)."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    base = str(hparams.get("model") or "")
    folder = getattr(getattr(module, "model", None), "name_or_path", None)
    return CardFacts(
        method=METHODS.get(type(module).__name__, type(module).__name__),
        kind=kind,
        base=base,
        options=training_options(module, trainer),
        steps=trainer.global_step if trainer is not None else None,
        data=data_facts(trainer),
        datasets=["OctoMed/PMC-VQA"] if "PMC" in type(getattr(trainer, "datamodule", None)).__name__ else [],
        license=base_license(folder) if folder and Path(str(folder)).is_dir() else None,
        version=medrl.__version__,
        revision=code_revision(),
        evaluation=evaluation_rows(trainer),
        commands=reproduce_commands(trainer),
    )
