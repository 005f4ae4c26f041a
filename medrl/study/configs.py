"""medrl's LightningCLI (``medrl fit|validate|test|predict``) and the parse-only check every config gets.

Kept apart from the modules that define LightningModules so that class paths in configs resolve the same
way in the main process, in spawned DDP workers and in vLLM's engine process.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI


class MedRLCLI(LightningCLI):
    """LightningCLI with medrl's defaults: any LightningModule and DataModule by class path, configs saved."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


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
