"""The ``medrl`` command: LightningCLI's ``fit|validate|test|predict`` plus the study's own verbs.

Kept apart from the modules that define LightningModules so that class paths in configs resolve the same
way in the main process, in spawned DDP workers and in vLLM's engine process.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

from medrl.core.env import DEBUG_ENV, check_switches, is_debug, show_progress

if not show_progress():
    # The hub's, transformers' and datasets' own bars ("Writing model shards") print lines into a log; they
    # read these variables when first imported, which the imports below may do.
    for _name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(_name, "1")

from medrl.core.errors import one_line, user_error_in  # noqa: E402
from medrl.study.parse_errors import one_line_parse_error  # noqa: E402

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")


# verb -> (one-line help, "module:function" or {sub-verb: "module:function"}). Each function's signature
# and docstring are its command line (jsonargparse), so `medrl data verify --help` explains every flag.
# Targets are imported only when their verb runs, so `medrl --help` stays fast.
STUDY_VERBS: dict[str, tuple[str, str | dict[str, str]]] = {
    "data": (
        "MedMNIST files: verify, synthesise, fetch; PMC-VQA and the benchmark suite from the hub; PMC-VQA subsets",
        {
            "verify": "medrl.study.data_commands:verify",
            "synth": "medrl.study.data_commands:synth",
            "fetch": "medrl.study.data_commands:fetch",
            "get": "medrl.study.data_commands:get",
            "pmc-subset": "medrl.study.data_commands:pmc_subset",
        },
    ),
    "probe-table": (
        "linear probes: encoders x flags x sizes -> CSV, markdown and chart",
        "medrl.study.probe_table:probe_table",
    ),
    "bench-eval": (
        "a model on the six medical VQA benchmarks: Acc@1 (and Pass@K) per benchmark",
        "medrl.study.bench_eval:bench_eval",
    ),
    "recipe": (
        "the boundary-aware recipe on one target: measure support, SFT while low, GRPO once high",
        "medrl.study.recipe_command:recipe",
    ),
    "reproduce": ("the whole study, narrated and resumable, ending in report.md", "medrl.study.reproduce:reproduce"),
    "eval": ("Acc@1 / Pass@K of a model on MedMNIST VQA: table, JSONL, curve", "medrl.study.evaluate:evaluate_command"),
    "report": ("report.md and figures from a study run directory", "medrl.study.report_command:report"),
    "export": (
        "a trained model into a clean folder with its model card; --push_to_hub REPO_ID publishes it",
        "medrl.study.export_command:export",
    ),
    "models": (
        "the VLM families medrl knows, what each runs, and their tiny models",
        "medrl.study.models_command:models",
    ),
}
# Verbs whose required arguments are positional (`medrl report RUN_DIR`, `medrl data get pmc-vqa`, `medrl export
# RUN`); the
# others take only --flags.
POSITIONAL_VERBS = {"report", "data get", "export"}


def _load(target: str) -> Callable[..., int]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


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
        f"Errors you can fix (a bad file, row, option or path) print one line and exit 2; {DEBUG_ENV}=1 shows",
        "their traceback.",
    ]
    return "\n".join(lines)


def _run_study_verb(verb: str, argv: list[str]) -> int:
    from jsonargparse import auto_cli

    _, target = STUDY_VERBS[verb]
    if isinstance(target, dict) and argv and f"{verb} {argv[0]}" in POSITIONAL_VERBS:
        verb, target, argv = f"{verb} {argv[0]}", target[argv[0]], argv[1:]
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medrl`` console script; returns the exit code.

    The error boundary: a user error (:func:`medrl.core.errors.user_error_in`: a bad file, row, option or
    path, a model not on disk) prints one line on stderr, ``medrl VERB: error: ...``, and returns 2, with no
    traceback (``MEDRL_DEBUG=1`` raises it instead). Any other exception is a bug and propagates whole.
    """
    from_command_line = argv is None
    _quiet_known_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    verb = argv[0]
    if verb not in STUDY_VERBS and verb not in LIGHTNING_VERBS:
        print(f"medrl: unknown verb {verb!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    try:
        check_switches()
        if verb in STUDY_VERBS:
            return _run_study_verb(verb, argv[1:])
        # Lightning and torch load here, not at import: `medrl --help` and the small verbs stay fast.
        from medrl.study.configs import MedRLCLI, check_checkpoint, check_yaml_files, ckpt_path_of, config_paths_of

        # HF tokenizers warn (and can deadlock) when a process forks after using them: DataLoader workers, DDP.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        check_yaml_files(config_paths_of(argv))
        check_checkpoint(ckpt_path_of(argv))  # LightningCLI reads the checkpoint's hyperparameters first
        # From the command line LightningCLI reads sys.argv itself (passing it again makes it warn); an
        # explicit argv (tests, other commands) is passed through. Parse errors are raised, not printed with the
        # usage, and answered below in one line.
        MedRLCLI(args=None if from_command_line else argv, exit_on_error=False)
        return 0
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM in the study commands: what ran is recorded
        print(f"{_command(argv)}: stopped ({str(stop) or 'interrupted'})", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = user_error_in(exc)
        if is_debug() or (cause is None and not _is_parse_error(exc)):
            raise
        if cause is not None:
            message = one_line(cause)
        elif moved := _moved_grpo_options(argv):  # a parse error on a GRPO config from before the option groups
            where = ", ".join(f"{old} -> {new}" for old, new in moved)
            message = f"GRPO's options are grouped now (docs/grpo.md): {where}"
        else:
            message = one_line_parse_error(str(exc))
        print(f"{_command(argv)}: error: {_without_prefix(message)}", file=sys.stderr)
        return 2


def _moved_grpo_options(argv: list[str]) -> list[tuple[str, str]]:
    from medrl.study.configs import moved_grpo_options

    return moved_grpo_options(argv)


def _is_parse_error(exc: BaseException) -> bool:
    """A command line or config that did not parse (jsonargparse's ArgumentError)."""
    return type(exc).__name__ == "ArgumentError" and type(exc).__module__.startswith(("jsonargparse", "argparse"))


def _command(argv: list[str]) -> str:
    """``medrl VERB`` (``medrl data verify`` for a verb with sub-verbs), as the user typed it."""
    target = STUDY_VERBS.get(argv[0], ("", ""))[1]
    return " ".join(["medrl", *argv[: 2 if isinstance(target, dict) else 1]])


def _without_prefix(message: str) -> str:
    """Messages raised inside a verb often start with ``medrl VERB:`` already; say it once."""
    return re.sub(r"^medrl [\w-]+( [\w-]+)?: ", "", message)


if __name__ == "__main__":
    sys.exit(main())
