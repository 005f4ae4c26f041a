"""`medrl recipe`: the recipe run for real (tiny model, stand-in files, a minimal budget) and its argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medrl.cli import main

REPO = Path(__file__).resolve().parents[1]


def _plan(tmp_path: Path) -> Path:
    plan = {
        "name": "unit",
        "model": "tiny",
        "flags": ["breastmnist"],
        "support": {"n": 4, "ks": [1, 2, 4], "k": 4, "questions": 6, "max_new_tokens": 8, "batch_size": 6},
        "sft": {"config": "configs/sft.yaml", "overrides": {"trainer": {"max_epochs": 1},
                "data": {"init_args": {"train_samples": 16, "val_samples": 4, "batch_size": 8}}}},
        "rl": {"config": "configs/rl.yaml", "overrides": {"trainer": {"max_steps": 2, "val_check_interval": 2},
               "data": {"init_args": {"train_samples": 4, "val_samples": 2, "batch_size": 2}},
               "model": {"init_args": {"sampling": {"num_generations": 2, "max_completion_length": 8,
                                                    "val_max_new_tokens": 8}}}}},
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _args(tmp_path: Path, *extra: str) -> list[str]:
    empty = tmp_path / "data"
    empty.mkdir(exist_ok=True)  # no official file: the target runs on a declared stand-in
    return ["recipe", "--target", "breastmnist", "--plan", str(_plan(tmp_path)), "--root", str(empty),
            "--out", str(tmp_path / "run"), *extra]  # fmt: skip


def test_support_at_tau_goes_to_grpo_and_a_rerun_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    # tau 0 on raw Pass@k: any measured support reaches it, so the recipe measures, runs GRPO, and measures again.
    assert main(_args(tmp_path, "--tau", "0", "--support_measure", "raw")) == 0
    out = tmp_path / "run"
    record = json.loads((out / "recipe.json").read_text())
    assert [m["label"] for m in record["measurements"]] == ["base", "after_rl"]
    assert [d["action"] for d in record["decisions"]] == ["rl"]
    assert record["final_model"].endswith("train/rl_base/checkpoints/last.hf/model")
    for label in ("base", "rl_base"):
        summary = json.loads((out / "eval" / label / "breastmnist" / "summary.json").read_text())
        assert summary["metrics"]["all"]["questions"] == 6 and summary["ks"] == [1, 2, 4]
    assert (out / "train" / "rl_base" / "override.yaml").is_file()
    assert "**rl**" in (out / "recipe.md").read_text()
    # A rerun reuses the measurements and the trained model: nothing is rewritten but the record.
    summary = out / "eval" / "rl_base" / "breastmnist" / "summary.json"
    mtime = summary.stat().st_mtime_ns
    assert main(_args(tmp_path, "--tau", "0", "--support_measure", "raw")) == 0
    assert summary.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_low_support_is_bridged_with_sft_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    # tau 1: the untrained model's support is below it, so SFT runs first and the model is measured again.
    assert main(_args(tmp_path, "--tau", "1.0")) == 0
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert record["decisions"][0]["action"] == "sft"
    assert [m["label"] for m in record["measurements"]][:2] == ["base", "after_sft_1"]
    assert record["measurements"][1]["model"] == "sft_1"
    assert (tmp_path / "run" / "train" / "sft_1" / "command.txt").is_file()


def test_bad_arguments_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "--target", "pneumonia", "--out", str(tmp_path / "a")]) == 2
    assert "--target 'pneumonia' is not a MedMNIST 2D flag" in capsys.readouterr().err
    assert main(["recipe", "--target", "breastmnist", "--n", "4", "--k", "8", "--out", str(tmp_path / "b")]) == 2
    assert "n=4 samples cannot estimate Pass@8" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_directory_made_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"name": "recipe-breastmnist", "tau": 0.9}))
    assert main(["recipe", "--target", "breastmnist", "--out", str(out), "--root", str(tmp_path)]) == 2
    assert "made with a different plan or other settings" in capsys.readouterr().err


def test_a_pmc_vqa_target_trains_and_measures_on_pmc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_pmc_vqa import make_pmc

    monkeypatch.chdir(REPO)
    pmc = make_pmc(tmp_path / "pmc")  # official layout: train.csv (40 good rows, 5 bad), test_clean.csv (2 rows)
    args = ["recipe", "--target", "pmc:train.csv", "--pmc_root", str(pmc), "--plan", str(_plan(tmp_path)),
            "--out", str(tmp_path / "run"), "--tau", "0", "--support_measure", "raw", "--questions", "2"]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "run"
    record = json.loads((out / "recipe.json").read_text())
    assert record["target"] == "pmc:train.csv" and [d["action"] for d in record["decisions"]] == ["rl"]
    summary = json.loads((out / "eval" / "rl_base" / "pmc-train" / "summary.json").read_text())
    assert summary["metrics"]["all"]["questions"] == 2
    override = yaml.safe_load((out / "train" / "rl_base" / "override.yaml").read_text())
    assert override["data"]["class_path"] == "medrl.data.pmc_vqa.PMCVQADataModule"
    assert override["data"]["init_args"]["train_file"] == "train.csv"
