"""medrl's LightningCLI (``medrl fit|validate|test|predict``) and the parse-only check every config gets.

Kept apart from the modules that define LightningModules so that class paths in configs resolve the same
way in the main process, in spawned DDP workers and in vLLM's engine process.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI

from medrl.callbacks.checkpoint_io import AtomicCheckpointIO
from medrl.callbacks.finite import FiniteGuard
from medrl.core.errors import ConfigError, UserError
from medrl.core.io import load_yaml
from medrl.study.resume import check_resume, resolve_last
from medrl.study.trainer_defaults import (
    allow_mlflow_file_store,
    expand_run_dir,
    progress_settings,
    run_loggers,
)

# --ckpt_path values Lightning resolves itself.
_NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


def check_yaml_files(paths: list[str]) -> None:
    """Each ``--config`` file parses as YAML; a syntax error names the file, line and column.

    (jsonargparse reads the text first and then reports the error against ``<unicode string>``.)
    """
    for path in paths:
        if Path(path).is_file():  # a missing one: jsonargparse says so, naming it
            load_yaml(path)


def config_paths_of(args: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order (either spelling)."""
    paths = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def ckpt_path_of(args: list[str]) -> str | None:
    """The ``--ckpt_path`` of a command line (either spelling), or None."""
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def check_checkpoint(ckpt_path: str | os.PathLike | None) -> None:
    """``--ckpt_path`` names a complete checkpoint: a non-empty zip (``torch.save``) or a sharded folder."""
    if ckpt_path is None or str(ckpt_path) in _NAMED_CHECKPOINTS:
        return
    path = Path(ckpt_path)
    if path.is_dir():
        return  # a distributed (FSDP) checkpoint: a folder of shards Lightning checks itself
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such file; pass a checkpoint written by this run (e.g. last.ckpt)")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise UserError(
            f"--ckpt_path {path} is not a complete checkpoint ({size} bytes, not a torch zip archive): it was cut "
            "short while being written or copied; resume from an earlier checkpoint of the run"
        )


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """``folder`` (made if need be) accepts a new file; else one line naming it, before any training step."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".medrl-write-check-"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write {what} to {path}: {exc.strerror or exc}; pass a folder you can write to "
            "(it is checked before the first step so no training is lost at the first save)"
        ) from exc


class MedRLCLI(LightningCLI):
    """LightningCLI with medrl's defaults: any LightningModule and DataModule by class path, configs saved.

    Before it builds anything it checks what would otherwise fail late or unclearly: a learning rate below
    zero; before a fit, that every output folder (checkpoints, logs, Pass@K outputs) is writable. (``medrl``
    checks ``--ckpt_path`` before this class reads the checkpoint's hyperparameters.)
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> None:
        # exit_on_error=False: a parse error is raised (jsonargparse's ArgumentError) instead of printing the
        # usage, so `medrl` can answer it in one line (medrl.study.parse_errors).
        kwargs = {"exit_on_error": exit_on_error}
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**kwargs, **{verb: dict(kwargs) for verb in ("fit", "validate", "test", "predict")}},
            args=args,
            run=run,
        )

    def _settings(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Option values torch would reject only when training starts, rejected now with their names."""
        settings = self._settings()
        lr = (settings.get("optimizer") or {}).get("init_args", {}).get("lr")
        if isinstance(lr, int | float) and lr < 0:
            raise ConfigError(f"--optimizer.init_args.lr must be >= 0, got {lr}")
        trainer = settings.get("trainer")
        if trainer is not None and trainer.get("logger") not in (None, True, False):
            trainer["logger"] = expand_run_dir(trainer["logger"], trainer.get("default_root_dir") or os.getcwd())
            allow_mlflow_file_store(trainer["logger"])

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path last`` is the run folder's newest ``last.ckpt``; a checkpoint of another module, or
        one trained with other model options, is refused (:mod:`medrl.study.resume`)."""
        if self.config.get("subcommand"):
            settings = self.config[self.config.subcommand]
            if settings.get("ckpt_path") == "last":
                settings["ckpt_path"] = str(resolve_last(settings))
                print(f"medrl {self.config.subcommand}: resuming from {settings['ckpt_path']}", file=sys.stderr)
            if settings.get("ckpt_path") and Path(settings["ckpt_path"]).is_file():
                check_resume(settings["ckpt_path"], settings.get("model"), resuming=self.config.subcommand == "fit")
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """The Trainer with medrl's defaults: loggers and progress bar (:mod:`medrl.study.trainer_defaults`),
        checkpoints written atomically in their own folder, and a stop on a non-finite loss or weight."""
        root = config.get("default_root_dir") or os.getcwd()
        config = progress_settings({**config, "logger": run_loggers(config.get("logger"), root)})
        every = [*(config.get("callbacks") or []), *callbacks]
        if not any(isinstance(c, FiniteGuard) for c in every):
            callbacks = [*callbacks, FiniteGuard()]
        trainer = super()._instantiate_trainer(config, callbacks)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin the config chose is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit":
            for folder, what in _output_folders(self.trainer):
                check_writable(folder, what)
        super()._run_subcommand(subcommand)


def _output_folders(trainer: Any) -> list[tuple[Path, str]]:
    """Where a fit will write: the run folder, checkpoint dirpaths, the logger's folder, Pass@K outputs."""
    folders = [(Path(trainer.default_root_dir), "the run (trainer.default_root_dir)")]
    for callback in trainer.callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            folders.append((Path(dirpath), f"checkpoints ({type(callback).__name__}.dirpath)"))
        output_dir = getattr(callback, "output_dir", None)
        if output_dir:
            folders.append((Path(output_dir), f"Pass@K outputs ({type(callback).__name__}.output_dir)"))
    for logger in trainer.loggers:
        root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        if root:
            folders.append((Path(root), f"logs ({type(logger).__name__})"))
    return folders


class _ParseOnlyCLI(MedRLCLI):
    """Parses and type-checks configs against the code, but builds and runs nothing."""

    def instantiate_classes(self) -> None:
        """Skip building the trainer, model and data."""

    def after_instantiate_classes(self) -> None:
        """Nothing was built."""

    def _run_subcommand(self, subcommand: str) -> None:
        """Run nothing."""


def check_configs(paths: list[str], subcommand: str = "fit"):
    """Parse ``--config`` files in order (as ``medrl SUBCOMMAND --config A --config B``) without building anything.

    Raises on an unknown key, a class path that does not import, or a value of the wrong type; returns the
    merged config namespace.
    """
    args = [subcommand, *(arg for path in paths for arg in ("--config", str(path)))]
    with warnings.catch_warnings():
        # Called from inside another command, LightningCLI warns that sys.argv differs from `args`: intended here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return _ParseOnlyCLI(args=args).config


# GRPO options that were scalars and are groups now: `engine: vllm` is `engine: {name: vllm}`.
SCALAR_GROUPS = {"engine": "engine.name", "care": "care.enabled"}


def moved_grpo_options(args: list[str]) -> list[tuple[str, str]]:
    """``(old, new)`` for each flat GRPO option name (from before the options were grouped) that ``args`` use.

    Only when the model is :class:`medrl.lit.grpo.GRPOModule` (by a config's ``class_path``, or ``--model
    medrl.lit.grpo.GRPOModule``): then every config's ``model.init_args`` and every ``--model.init_args.NAME``
    / ``--model.NAME`` flag is read. Used for a hint after a parse error, so an old config says where each
    option went instead of only that it is unknown.
    """
    import re

    from medrl.lit.grpo_args import MOVED_OPTIONS

    models = []
    for path in config_paths_of(args):
        try:
            model = (load_yaml(path) or {}).get("model") or {}
        except (OSError, ConfigError, AttributeError):
            continue
        models += [model] if isinstance(model, dict) else []
    # Later configs often give only init_args (the study's override.yaml): one GRPO class_path covers them all.
    flags = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--model=")
    ]
    classes = [str(m.get("class_path", "")) for m in models] + flags
    if not any(c.endswith("GRPOModule") for c in classes):
        return []
    moved = MOVED_OPTIONS | SCALAR_GROUPS
    names: list[str] = []
    for model in models:
        init = model.get("init_args") or {}
        names += [k for k in init if k in MOVED_OPTIONS or (k in SCALAR_GROUPS and not isinstance(init[k], dict))]
    for arg in args:
        match = re.match(r"--model\.(?:init_args\.)?(\w+)(?:=|$)", arg)
        if match and match.group(1) in moved:
            names.append(match.group(1))
    return [(name, moved[name]) for name in dict.fromkeys(names)]
