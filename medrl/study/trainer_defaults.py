"""What every ``medrl fit`` gets unless its config says otherwise: TensorBoard beside CSV, and a Rich progress bar
when a person is watching.

Loggers. With no ``trainer.logger`` in any config, a run logs to TensorBoard and to CSV in one folder,
``<default_root_dir>/lightning_logs/version_N/`` (``events.out.tfevents.*``, ``metrics.csv`` and
``hparams.yaml``). A config that names loggers (``configs/loggers/*.yaml``, added with ``--config``) gets
exactly those, with a CSV logger added first in the same ``version_N`` folder unless one is among them:
``metrics.csv`` is what ``medrl report`` reads, and the folder is where the completions and Pass@K outputs
go. ``--trainer.logger false`` turns logging off entirely.

Progress. Lightning's default bar prints a line per refresh into a log file; here the bar is Rich's on a
terminal and none when stderr is not one (``MEDRL_PROGRESS=1`` forces it on). A progress bar a config names
itself is kept as it is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from medrl.core.env import show_progress

LOG_NAME = "lightning_logs"
# In a logger's options (configs/loggers/*.yaml), replaced by the run's trainer.default_root_dir.
RUN_DIR = "${default_root_dir}"


def expand_run_dir(value: Any, root: str | os.PathLike) -> Any:
    """``value`` (a parsed ``trainer.logger``: namespaces, dicts, lists) with every ``${default_root_dir}``
    in its strings replaced by ``root``, so a logger fragment writes into whichever run it is added to."""
    if isinstance(value, str):
        return value.replace(RUN_DIR, str(root))
    if isinstance(value, list | tuple):
        return type(value)(expand_run_dir(v, root) for v in value)
    if isinstance(value, dict):
        return {k: expand_run_dir(v, root) for k, v in value.items()}
    if hasattr(value, "items") and hasattr(value, "__setitem__"):  # a jsonargparse Namespace
        for key, item in list(value.items()):
            value[key] = expand_run_dir(item, root)
    return value


def allow_mlflow_file_store(logger_config: Any) -> None:
    """Let MLflow 3 open a ``file:`` tracking store when a logger asks for one (configs/loggers/mlflow.yaml).

    MLflow 3 refuses its file store (in maintenance mode) unless ``MLFLOW_ALLOW_FILE_STORE`` is true; a local
    folder is the one store that needs no server and no database, so a ``file:`` URI in the config is taken
    as that choice. A value the user set is kept.
    """
    if any(str(uri).startswith("file:") for uri in _values_of(logger_config, "tracking_uri")):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _values_of(value: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed config (namespaces, dicts, lists)."""
    if isinstance(value, list | tuple):
        return [v for item in value for v in _values_of(item, key)]
    items = value.items() if hasattr(value, "items") else []
    return [v for k, item in items for v in ([item] if str(k).rsplit(".", 1)[-1] == key else _values_of(item, key))]


def next_version(root: str | os.PathLike) -> int:
    """The first unused ``version_N`` under ``root/lightning_logs`` (Lightning's numbering)."""
    folder = Path(root) / LOG_NAME
    taken = [int(m.group(1)) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


def claim_version(root: str | os.PathLike) -> int:
    """Create the first free ``root/lightning_logs/version_N`` and return N.

    ``mkdir`` either creates the folder or fails because it exists, so two runs started together on one
    ``default_root_dir`` get two folders (listing first and creating later, as Lightning does, let both take
    the same one and interleave their ``metrics.csv``).
    """
    folder = Path(root) / LOG_NAME
    folder.mkdir(parents=True, exist_ok=True)
    version = next_version(root)
    while True:
        try:
            (folder / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def run_loggers(configured: Any, root: str | os.PathLike) -> list[Logger] | bool:
    """The loggers of a run: ``configured`` (``trainer.logger`` as parsed and built) completed as described above."""
    if configured is False or configured == []:
        return False
    loggers = (
        [] if configured in (None, True) else list(configured) if isinstance(configured, list | tuple) else [configured]
    )
    # A TensorBoard logger of the run's own folder picks its version lazily, by the folders it finds: give it
    # the claimed one (unless its config fixed a version), so it and the CSV logger share one folder.
    shared = [lg for lg in loggers if isinstance(lg, TensorBoardLogger) and _same_dir(lg, root)]
    if shared and shared[0]._version is not None:
        version = shared[0].version
    else:
        version = claim_version(root)
        for logger in shared:
            logger._version = version
    csv = CSVLogger(root, name=LOG_NAME, version=version)
    if configured is None or configured is True:
        loggers: list[Logger] = [csv]
        if _TENSORBOARD_AVAILABLE:
            # default_hp_metric off: a `hp_metric` of -1 in every run's scalars means nothing to a reader.
            loggers.append(TensorBoardLogger(root, name=LOG_NAME, version=version, default_hp_metric=False))
        return loggers
    if not any(isinstance(logger, CSVLogger) for logger in loggers):
        loggers.insert(0, csv)
    return loggers


def _same_dir(logger: TensorBoardLogger, root: str | os.PathLike) -> bool:
    return logger.name == LOG_NAME and Path(logger.save_dir).resolve() == Path(root).resolve()


def progress_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (the Trainer's arguments) with the progress bar chosen as described above."""
    config = dict(config)
    if config.get("enable_progress_bar") is False:
        return config
    callbacks = list(config.get("callbacks") or [])
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return config
    if not show_progress():
        config["enable_progress_bar"] = False
        return config
    config["callbacks"] = [*callbacks, RichProgressBar(console_kwargs={"stderr": True})]
    return config
