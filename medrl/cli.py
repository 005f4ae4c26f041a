"""The ``medrl`` command: LightningCLI's ``fit|validate|test|predict`` plus the study's own verbs.

Kept apart from the modules that define LightningModules so that class paths in configs resolve the same
way in the main process, in spawned DDP workers and in vLLM's engine process.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")


# verb -> (one-line help, "module:function" or {sub-verb: "module:function"}). Each function's signature
# and docstring are its command line (jsonargparse), so `medrl data verify --help` explains every flag.
# Targets are imported only when their verb runs, so `medrl --help` stays fast.
STUDY_VERBS: dict[str, tuple[str, str | dict[str, str]]] = {
    "data": (
        "MedMNIST files: verify against the official MD5s, synthesise, fetch; PMC-VQA balanced subsets",
        {
            "verify": "medrl.data.commands:verify",
            "synth": "medrl.data.commands:synth",
            "fetch": "medrl.data.commands:fetch",
            "pmc-subset": "medrl.data.pmc_subset:pmc_subset",
        },
    ),
    "probe-table": (
        "linear probes: encoders x flags x sizes -> CSV, markdown and chart",
        "medrl.probe_table:probe_table",
    ),
    "bench-eval": (
        "a model on the six medical VQA benchmarks: Acc@1 (and Pass@K) per benchmark",
        "medrl.bench_eval:bench_eval",
    ),
    "recipe": (
        "the boundary-aware recipe on one target: measure support, SFT while low, GRPO once high",
        "medrl.study.recipe_command:recipe",
    ),
    "reproduce": ("the whole study, narrated and resumable, ending in report.md", "medrl.study.reproduce:reproduce"),
    "eval": ("Acc@1 / Pass@K of a model on MedMNIST VQA: table, JSONL, curve", "medrl.evaluation:evaluate_command"),
    "report": ("report.md and figures from a study run directory", "medrl.report.build:report"),
}
# Verbs whose required arguments are positional (`medrl report RUN_DIR`); the others take only --flags.
POSITIONAL_VERBS = {"report"}


def _load(target: str) -> Callable[..., int]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


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


def _overview() -> str:
    lines = [
        "usage: medrl VERB [options]",
        "",
        "When does RL help medical VLMs? Probes, Pass@K, SFT and GRPO on MedMNIST and PMC-VQA.",
        "",
        "Training and evaluation (LightningCLI; combine several --config files, later ones win):",
        "  fit          train a model:            medrl fit --config configs/probe.yaml",
        "  validate     run the validation loop:  medrl validate --config configs/... --ckpt_path ...",
        "  test         run the test loop",
        "  predict      run the predict loop",
        "",
        "Study verbs:",
        *(f"  {verb:<12} {doc}" for verb, (doc, _) in STUDY_VERBS.items()),
        "",
        "`medrl VERB --help` explains a verb's options; `medrl fit --print_config --config X` shows a full config.",
    ]
    return "\n".join(lines)


def _run_study_verb(verb: str, argv: list[str]) -> int:
    from jsonargparse import auto_cli

    _, target = STUDY_VERBS[verb]
    commands = {sub: _load(t) for sub, t in target.items()} if isinstance(target, dict) else _load(target)
    result = auto_cli(commands, args=argv, as_positional=verb in POSITIONAL_VERBS, prog=f"medrl {verb}")
    return int(result or 0)


class _DropAdverts(logging.Filter):
    """Lightning prints a product tip on every Trainer; in a 36-stage study log it buries the narration."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_known_noise() -> None:
    """Silence third-party messages that say nothing about the run being made."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    # Lightning 2.6 calls a torch 2.13 pytree API that torch deprecated; harmless, printed on every fit.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Without tensorboard installed Lightning logs to CSV, which is what medrl wants; it says so on every fit.
    warnings.filterwarnings("ignore", message="Starting from v1.9.0, `tensorboardX` has been removed")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medrl`` console script."""
    from_command_line = argv is None
    _quiet_known_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    if argv[0] in STUDY_VERBS:
        return _run_study_verb(argv[0], argv[1:])
    if argv[0] not in LIGHTNING_VERBS:
        print(f"medrl: unknown verb {argv[0]!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    # HF tokenizers warn (and can deadlock) when a process forks after using them: DataLoader workers, DDP.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # From the command line LightningCLI reads sys.argv itself (passing it again makes it warn); an explicit
    # argv (tests, other commands) is passed through.
    MedRLCLI(args=None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
