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


# GRPO options that were scalars and are groups now: `engine: vllm` is `engine: {name: vllm}`.
SCALAR_GROUPS = {"engine": "engine.name", "care": "care.enabled"}


def moved_grpo_options(args: list[str]) -> list[tuple[str, str]]:
    """``(old, new)`` for each flat GRPO option name (from before the options were grouped) that ``args`` use.

    Looks at ``--model.init_args.NAME`` / ``--model.NAME`` flags and at the ``model.init_args`` of every
    ``--config`` file whose model is :class:`medrl.lit.grpo.GRPOModule`. Used for a hint after a parse error,
    so an old config says where each option went instead of only that it is unknown.
    """
    import re
    from pathlib import Path

    import yaml

    from medrl.lit.grpo_args import MOVED_OPTIONS

    names: list[str] = []
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    models = []
    for path in configs:
        try:
            model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        models += [model] if isinstance(model, dict) else []
    # Later configs often give only init_args (the study's override.yaml): one GRPO class_path covers them all.
    grpo = any(str(m.get("class_path", "")).endswith("GRPOModule") for m in models)
    for model in models if grpo else []:
        init = model.get("init_args") or {}
        names += [k for k in init if k in MOVED_OPTIONS or (k in SCALAR_GROUPS and not isinstance(init[k], dict))]
    for arg in args:
        match = re.match(r"--model\.(?:init_args\.)?(\w+)(?:=|$)", arg)
        name = match.group(1) if match else ""
        if (name in MOVED_OPTIONS or name in SCALAR_GROUPS) and (grpo or name != "gradient_checkpointing"):
            names.append(name)
    moved = MOVED_OPTIONS | SCALAR_GROUPS
    return [(name, moved[name]) for name in dict.fromkeys(names)]
