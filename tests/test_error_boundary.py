"""The CLI's error boundary: every verb answers a user error with one line on stderr and exit code 2.

Each case is a mistake a new user makes (a folder that is not there, a flag misspelt, too small a file for
the subset asked for, an option out of range); the answer names what is wrong and, where there is one, the
fix. ``MEDRL_DEBUG=1`` brings the traceback back, and a bug (any other exception) always keeps it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from medrl import cli
from medrl.cli import STUDY_VERBS, main
from medrl.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _targets() -> list[str]:
    out = []
    for _, target in STUDY_VERBS.values():
        out += list(target.values()) if isinstance(target, dict) else [target]
    return out


@pytest.mark.parametrize("target", _targets())
def test_every_study_verb_target_imports(target: str) -> None:
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def _pmc_subset_args(tmp_path: Path) -> list[str]:
    from test_pmc_vqa import make_pmc  # the small PMC-VQA fixture: 40 usable training rows

    return ["data", "pmc-subset", "--n", "400", "--root", str(make_pmc(tmp_path)), "--out", str(tmp_path / "s.jsonl")]


CASES = {
    "data verify": (lambda t: ["data", "verify", "--root", str(t / "nowhere")], "is not a directory"),
    "data synth": (lambda t: ["data", "synth", "--flag", "pneumonia", "--out", str(t)], "unknown MedMNIST 2D flag"),
    "data fetch": (lambda t: ["data", "fetch", "--flag", "breastmnist", "--root", str(t)], "offline mode is set"),
    "data pmc-subset": (_pmc_subset_args, "100 needed for n=400; lower n"),
    "probe-table": (lambda t: ["probe-table", "--encoders", "[resnet18]", "--out", str(t)], "expected KIND:NAME"),
    "bench-eval": (lambda t: ["bench-eval", "--model", "tiny", "--suite", str(t / "x.jsonl")], "does not exist"),
    "recipe": (lambda t: ["recipe", "--target", "pneumonia", "--out", str(t)], "is not a MedMNIST 2D flag"),
    "reproduce": (lambda t: ["reproduce", "--plan", str(t / "plan.yaml")], "no plan"),
    "eval": (lambda t: ["eval", "--root", str(t)], "MedMNIST file not found"),
    "report": (lambda t: ["report", str(t / "run")], "no such run directory"),
    "export": (lambda t: ["export", str(t / "run")], "no such run folder, checkpoint or model folder"),
    "fit": (
        lambda t: ["fit", "--config", str(REPO / "configs/rl.yaml"), "--model.init_args.sampling.num_generations=1"],
        "num_generations must be >= 2",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_prints_one_line_and_exits_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_args, expected = CASES[case]
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"medrl {case}: error: ") and expected in err[0], err[0]
    assert "Traceback" not in err[0] and not err[0].count(f"medrl {case}:") > 1


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDRL_DEBUG", "1")
    with pytest.raises(ConfigError, match="is not a MedMNIST 2D flag"):
        main(["recipe", "--target", "pneumonia", "--out", str(tmp_path)])


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run_dir: str) -> int:
        raise ZeroDivisionError("a bug, not the user's doing")

    monkeypatch.setattr(cli, "_load", lambda target: broken)
    with pytest.raises(ZeroDivisionError):
        main(["report", "somewhere"])


def test_an_old_flat_grpo_config_is_told_where_each_option_went(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    config = yaml.safe_load((REPO / "configs/rl.yaml").read_text())
    init = config["model"]["init_args"]
    for group in ("sampling", "loss", "care", "engine", "optim"):
        init.pop(group)
    # The flat names GRPOModule took before its options were grouped.
    init |= {"engine": "hf", "care": True, "beta": 0.0, "loss_aggregation": "grpo", "num_generations": 4}
    old = tmp_path / "old_rl.yaml"
    old.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(old)]) == 2
    (hint,) = capsys.readouterr().err.strip().splitlines()
    assert hint.startswith("medrl fit: error: GRPO's options are grouped now")
    for moved in ("engine -> engine.name", "care -> care.enabled", "beta -> loss.beta",
                  "loss_aggregation -> loss.aggregation", "num_generations -> sampling.num_generations"):  # fmt: skip
        assert moved in hint, hint


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (["--model.init_args.sampling.num_generationz", "4"],
         "unknown option --model.init_args.sampling.num_generationz (did you mean "
         "model.init_args.sampling.num_generations?)"),
        (["--model.init_args.sampling.temperature", "hot"],
         "--model.init_args.sampling.temperature: expected a float, got 'hot'"),
        (["--model.init_args.finetune", "lorax"],
         "--model.init_args.finetune: expected one of 'full', 'lora', got 'lorax'"),
        (["--trainer.max_epochz", "3"], "unknown option --trainer.max_epochz (did you mean trainer.max_epochs?)"),
    ],
)  # fmt: skip
def test_an_option_error_deep_in_a_group_is_one_line(option, line, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "--config", str(REPO / "configs/rl.yaml"), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medrl fit: error: {line}"]
