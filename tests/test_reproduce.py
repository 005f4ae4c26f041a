"""`medrl reproduce`: the paper-scale plan plans on a CPU machine; the CPU-scale pipeline runs end to end."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import yaml

from medrl.cli import main
from medrl.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_paper_scale_dry_run_plans_every_stage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["reproduce", "--scale", "paper", "--dry_run", "true", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "flags pathmnist, chestmnist" in out and "at 224px" in out and "engine=vllm" in out
    assert "configs/sft_qwen25vl_3b.yaml (medrl.lit.sft.SFTModule)" in out
    for stage in ("1. data:", "2. vision:", "eval:base:organsmnist", "sft:sft_chestmnist", "rl:rl_sft_dermamnist",
                  "recipe:retinamnist", "report:"):  # fmt: skip
        assert stage in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_unknown_plan_key_names_the_file(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan

    bad = tmp_path / "plan.yaml"
    bad.write_text("support:\n  n: 4\n  kz: [1]\n")
    with pytest.raises(ValueError, match=r"plan.yaml:support: unknown key\(s\) \['kz'\]"):
        load_plan(bad)


def _small_plan(tmp_path: Path) -> Path:
    plan = yaml.safe_load((REPO / "configs" / "study" / "cpu.yaml").read_text())
    plan.update(
        name="e2e",
        flags=["breastmnist", "dermamnist"],
        boundary_sft_steps=[2, 4],
        vision={"encoders": ["timm:resnet18,pretrained=false"], "max_epochs": 2, "train_samples": 64,
                "test_samples": 32},
        support={"n": 4, "ks": [1, 2, 4], "k": 4, "questions": 8, "max_new_tokens": 16, "batch_size": 8},
        sft={"config": "configs/sft.yaml", "overrides": {"trainer": {"max_epochs": 1},
             "data": {"init_args": {"train_samples": 32, "val_samples": 8, "batch_size": 8}}}},
        rl={"config": "configs/rl.yaml", "overrides": {"trainer": {"max_steps": 2, "val_check_interval": 2},
            "data": {"init_args": {"train_samples": 8, "val_samples": 4, "batch_size": 2}},
            "model": {"init_args": {"sampling": {"num_generations": 2, "max_completion_length": 8,
                                                "val_max_new_tokens": 8}}}}},
    )  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow
def test_cpu_pipeline_end_to_end_on_synthetic_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    empty = tmp_path / "data"
    empty.mkdir()  # no official files: every flag runs on a declared stand-in
    out = tmp_path / "study run"  # a space in the path: every command the study writes must still paste back
    args = ["reproduce", "--plan", str(_small_plan(tmp_path)), "--out", str(out), "--root", str(empty)]
    assert main(args) == 0
    command = (out / "train" / "sft_breastmnist" / "command.txt").read_text()
    assert shlex.split(command)[-1] == str(out / "train" / "sft_breastmnist" / "override.yaml")
    report = (out / "report.md").read_text()
    assert report.startswith("**Illustrative numbers.**") and "Not run." not in report
    # The run card and the data sources are in the report the run ends with, not only in a later rebuild.
    assert "breastmnist **SYNTHETIC stand-in**" in report and "- versions: medrl" in report
    data = json.loads((out / "data.json").read_text())
    assert {rec["source"] for rec in data.values()} == {"synthetic"}
    stages = json.loads((out / "stages.json").read_text())
    assert all(rec["status"] == "done" for rec in stages.values())
    for label in ("base", "sft_breastmnist", "rl_base_breastmnist", "rl_sft_dermamnist"):
        assert (out / "eval" / label / "breastmnist" / "summary.json").is_file()
    # The boundary rungs are the SFT run after 2 and 4 steps, not trained again.
    rung = out / "train" / "boundary-sft2_breastmnist"
    assert "after optimizer step 2" in (rung / "source.txt").read_text() and not (rung / "fit.log").exists()
    recipe = json.loads((out / "recipe" / "breastmnist" / "recipe.json").read_text())
    assert recipe["decisions"] and recipe["measurements"][0]["label"] == "base"
    # A rerun finds every stage done and trains nothing again.
    mtime = (out / "eval" / "sft_breastmnist" / "breastmnist" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "eval" / "sft_breastmnist" / "breastmnist" / "summary.json").stat().st_mtime_ns == mtime


def test_a_run_directory_made_with_another_plan_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"name": "something else"}))
    assert main(["reproduce", "--scale", "cpu", "--out", str(out), "--root", str(tmp_path)]) == 2
    assert "different plan" in capsys.readouterr().err


def test_force_takes_names_and_groups_and_rejects_unknown_ones(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan
    from medrl.study.reproduce import _forced, build_stages
    from medrl.study.stages import Study

    stages = build_stages(Study(load_plan(REPO / "configs" / "study" / "cpu.yaml"), tmp_path / "run"))
    assert _forced(stages, "report") == ["report"]
    picked = _forced(stages, "sft, eval:base:breastmnist")
    sft = [f"sft:sft_{flag}{seed}" for seed in ("", "-s1") for flag in ("bloodmnist", "breastmnist", "pneumoniamnist")]
    assert picked == ["eval:base:breastmnist", *sft]  # the group takes every seed's SFT stage
    assert _forced(stages, ["recipe:bloodmnist"]) == ["recipe:bloodmnist"]
    assert _forced(stages, None) == []
    groups = "boundary, data, eval, recipe, report, rl, sft"
    with pytest.raises(ConfigError, match=f"--force sfft names no stage; groups: {groups}"):
        _forced(stages, "sfft")


def test_without_a_data_folder_the_study_uses_a_cache_folder_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from medrl.study.plan import load_plan
    from medrl.study.stages import Study

    monkeypatch.delenv("MEDRL_DATA_DIR", raising=False)
    monkeypatch.setenv("MEDRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDRL_OFFLINE", "1")  # no download: every flag falls back to its stand-in
    study = Study(load_plan(_small_plan(tmp_path)), tmp_path / "run")
    study.resolve_data()
    out = capsys.readouterr().out
    folder = tmp_path / "cache" / "medmnist"
    assert f"MEDRL_DATA_DIR is not set and no --root was given: using {folder}" in out
    assert "breastmnist: no official file (offline mode is set). Place breastmnist.npz (MD5 " in out
    assert f"in {folder}" in out
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert {rec["source"] for rec in data.values()} == {"synthetic"} and folder.is_dir()


def test_redoing_a_training_stage_sets_the_old_run_aside(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan
    from medrl.study.stages import Study

    study = Study(load_plan(_small_plan(tmp_path)), tmp_path / "run")
    stage = study.train_stage("rl", "breastmnist", start="sft")
    assert stage.after == ["data", "sft:sft_breastmnist"]
    old = study.train_dir("rl_sft_breastmnist") / "command.txt"
    old.parent.mkdir(parents=True)
    old.write_text("the earlier run")
    stage.reset()
    assert not old.parent.exists()  # the stage will train anew...
    (aside,) = (tmp_path / "run" / "replaced").iterdir()  # ...and nothing of the old run is lost
    assert aside.name.startswith("rl_sft_breastmnist-") and (aside / "command.txt").read_text() == "the earlier run"


def test_a_boundary_rung_is_cut_from_the_sft_runs_export_when_it_has_one(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan
    from medrl.study.stages import STEP_EXPORTS, Study, exported_model

    study = Study(load_plan(_small_plan(tmp_path)), tmp_path / "run")
    stages = study.boundary_stages("breastmnist")
    assert [s.name for s in stages][:2] == ["boundary:boundary-sft2_breastmnist", "boundary:boundary-rl2_breastmnist"]
    assert stages[0].after == ["data", "sft:sft_breastmnist"]  # it waits for the run it is cut from
    assert not study.cut("boundary-sft2_breastmnist", "sft_breastmnist", 2)  # no export: the rung trains
    export = study.train_dir("sft_breastmnist") / STEP_EXPORTS / "step-2.hf" / "model"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert study.cut("boundary-sft2_breastmnist", "sft_breastmnist", 2)
    copied = exported_model(study.train_dir("boundary-sft2_breastmnist"))
    assert copied is not None and (copied / "config.json").read_text() == "{}"
    assert [p.name for p in copied.parent.parent.iterdir()] == ["last.hf"]  # no temporary copy left behind


def test_the_laptop_plan_plans_on_another_model_and_fragment(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    plan = ["reproduce", "--plan", str(REPO / "configs" / "study" / "laptop.yaml"), "--dry_run", "true"]
    assert main([*plan, "--model", "tiny:smolvlm"]) == 0
    out = capsys.readouterr().out
    assert "(laptop-tiny-smolvlm): model tiny:smolvlm" in out and "rl:rl_sft_pneumoniamnist" in out
    fragment = str(REPO / "configs" / "models" / "medgemma_4b.yaml")
    assert main(["reproduce", "--scale", "cpu", "--dry_run", "true", "--model", fragment]) == 0
    out = capsys.readouterr().out
    assert "model google/medgemma-4b-it" in out and "'do_pan_and_scan': False" in out and "'finetune': 'lora'" in out


@pytest.mark.slow  # the laptop plan's 19 stages on tiny:smolvlm: about 3 minutes on 2 cores
def test_the_laptop_plan_runs_end_to_end_on_the_smolvlm_architecture(medmnist, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "laptop"
    args = ["reproduce", "--plan", str(REPO / "configs" / "study" / "laptop.yaml"), "--model", "tiny:smolvlm",
            "--out", str(out), "--root", str(medmnist.root)]  # fmt: skip
    assert main(args) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert len(stages) == 19 and all(rec["status"] == "done" for rec in stages.values())
    vision = (out / "vision" / "results.csv").read_text()
    assert "vlm" in vision or "idefics3" in vision  # the SmolVLM tower was probed beside the timm encoder
    report = (out / "report.md").read_text()
    assert "tiny:smolvlm" in report and "Not run." not in report


def test_a_learning_rate_sweep_in_the_plan_waits_for_one_row_per_rate(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan
    from medrl.study.reproduce import _probe_cells_done

    path = tmp_path / "plan.yaml"
    path.write_text("flags: [breastmnist]\nvision:\n  encoders: ['timm:resnet18,pretrained=false']\n"
                    "  optimizer: [sgd, knn]\n  lr: [0.1, 0.01]\n")  # fmt: skip
    plan = load_plan(path)
    assert plan.vision.lr == [0.1, 0.01]
    table = tmp_path / "results.csv"
    spec = "timm:resnet18,pretrained=false"

    def write(heads: list[tuple[str, str]]) -> None:
        with open(table, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["spec", "flag", "probe", "lr"])
            out.writerows([spec, "breastmnist", probe, lr] for probe, lr in heads)

    done = _probe_cells_done(plan)
    write([("sgd", "0.1"), ("knn", "")])
    assert not done([table])  # kNN takes no rate: 2 sgd heads + 1 kNN row are expected, 2 are there
    write([("sgd", "0.1"), ("knn", ""), ("sgd", "0.01")])
    assert done([table])
    path.write_text(path.read_text().replace("0.01", "0.0"))
    with pytest.raises(ConfigError, match=r"plan.yaml: vision.lr must be positive, got \[0.0\]"):
        load_plan(path)
