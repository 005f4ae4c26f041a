"""Cases that escaped as tracebacks, stayed silent or misled: each now gives one line (exit 2) or says what it does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from medrl.cli import main
from medrl.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _medrl_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("medrl ")]


def _fit(config: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / config), f"--trainer.default_root_dir={root}", *extra]


FAST_SFT = ["--trainer.max_steps=2", "--data.init_args.train_samples=48", "--data.init_args.val_samples=16"]


def test_a_bad_pass_at_k_value_is_one_line(medmnist, tiny_dir, tmp_path, capsys) -> None:
    fragment = tmp_path / "pass_at_k.yaml"
    text = (REPO / "callbacks/pass_at_k.yaml").read_text()
    fragment.write_text(text.replace("max_new_tokens: 128", "max_new_tokens: 0"))
    args = _fit("configs/sft.yaml", tmp_path / "run", f"--model.init_args.model={tiny_dir}", *medmnist.cli())
    assert main([*args, "--config", str(fragment)]) == 2
    assert _medrl_lines(capsys) == ["medrl fit: error: max_new_tokens must be >= 1, got 0"]


def test_a_plan_value_of_the_wrong_type_names_the_key(tmp_path, capsys) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text((REPO / "configs/study/cpu.yaml").read_text().replace("  n: 8\n", "  n: four\n"))
    assert main(["reproduce", "--plan", str(plan), "--out", str(tmp_path / "run"), "--dry_run", "true"]) == 2
    (line,) = _medrl_lines(capsys)
    assert line == f"medrl reproduce: error: {plan}:support: n must be int, got 'four'; fix the plan file"


def test_report_refuses_an_empty_folder_and_a_foreign_stages_file(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    (line,) = _medrl_lines(capsys)
    assert line.startswith(f"medrl report: error: {empty} holds no study") and not list(empty.iterdir())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "stages.json").write_text('{"build": 3}')
    assert main(["report", str(foreign)]) == 2
    (line,) = _medrl_lines(capsys)
    assert f"{foreign / 'stages.json'} is not a medrl stages file" in line


def test_report_on_a_study_stopped_mid_sft_says_what_is_missing_first(tmp_path, capsys) -> None:
    from medrl.study.plan import load_plan

    run = tmp_path / "run"
    run.mkdir()
    plan = load_plan(REPO / "configs/study/cpu.yaml")
    (run / "plan.json").write_text(json.dumps(plan.to_dict()))
    done = ["data", "vision", *(f"eval:base:{flag}" for flag in plan.flags), f"sft:sft_{plan.flags[0]}"]
    stages = {name: {"status": "done", "seconds": 1.0} for name in done}
    stages[f"sft:sft_{plan.flags[1]}"] = {"status": "running"}
    (run / "stages.json").write_text(json.dumps(stages))
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"medrl report: {run} is not a finished study: ")
    assert f"sft:sft_{plan.flags[1]}" in err[0] and f"sft:sft_{plan.flags[0]}," not in err[0]
    report = (run / "report.md").read_text()
    assert "**Unfinished study.**" in report and f"sft:sft_{plan.flags[1]}" in report


def test_a_grpo_resume_from_an_sft_checkpoint_says_so(medmnist, tiny_dir, tmp_path, capsys) -> None:
    sft = _fit("configs/sft.yaml", tmp_path / "sft", f"--model.init_args.model={tiny_dir}", *medmnist.cli(), *FAST_SFT)
    assert main(sft) == 0
    ckpt = next((tmp_path / "sft").rglob("last.ckpt"))
    capsys.readouterr()
    rl = _fit("configs/rl.yaml", tmp_path / "rl", f"--model.init_args.model={tiny_dir}", *medmnist.cli())
    assert main([*rl, "--ckpt_path", str(ckpt)]) == 2
    (line,) = _medrl_lines(capsys)
    assert f"--ckpt_path {ckpt} is an SFT checkpoint (medrl.lit.sft.SFTModule)" in line
    assert "this command trains medrl.lit.grpo.GRPOModule" in line


def test_resuming_grpo_with_other_options_is_refused_naming_them(medmnist, tiny_dir, tmp_path, capsys) -> None:
    rl = _fit("configs/rl.yaml", tmp_path / "rl", f"--model.init_args.model={tiny_dir}", *medmnist.cli(),
              "--trainer.max_steps=1")  # fmt: skip
    assert main(rl) == 0
    ckpt = next((tmp_path / "rl").rglob("last.ckpt"))
    capsys.readouterr()
    changed = ["--model.init_args.sampling.num_generations=8", "--model.init_args.loss.aggregation=dr_grpo"]
    assert main([*rl, "--trainer.max_steps=2", *changed, "--ckpt_path", str(ckpt)]) == 2
    (line,) = _medrl_lines(capsys)
    assert "sampling.num_generations 4 -> 8" in line and "loss.aggregation grpo -> dr_grpo" in line
    assert torch.load(ckpt, weights_only=True, mmap=True)["global_step"] == 1  # nothing was trained over it


def test_a_model_folder_without_tokenizer_files_is_named(tiny_dir, tmp_path) -> None:
    from medrl.models.hub import ModelNotFoundError, resolve_model

    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_dir, weights_only)
    for file in weights_only.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(ModelNotFoundError, match=r"weights-only has the model's weights but no tokenizer files"):
        resolve_model(weights_only)


def test_an_export_folder_is_a_model_argument_and_an_adapter_loads_onto_its_base(
    medmnist, tiny_dir, tmp_path, monkeypatch, capsys
) -> None:
    from medrl.models.hub import load_vlm, resolve_model

    monkeypatch.setenv("MEDRL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "lora"
    args = _fit("configs/sft.yaml", root, f"--model.init_args.model={tiny_dir}", *medmnist.cli(), *FAST_SFT,
                "--model.init_args.finetune=lora")  # fmt: skip
    assert main(args) == 0
    export = next(root.rglob("last.hf"))
    assert [p.name for p in export.iterdir()] == ["adapter"]
    capsys.readouterr()
    merged = resolve_model(export)
    err = capsys.readouterr().err
    assert f"{export} is an export: using its adapter/" in err and "merging the adapter" in err
    assert merged.is_relative_to(tmp_path / "cache" / "merged") and resolve_model(export / "adapter") == merged
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    expected = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_dir), export / "adapter"
    ).merge_and_unload()
    model, _ = load_vlm(str(export))
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name


def test_unknown_progress_and_debug_values_are_refused(capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEDRL_PROGRESS", "maybe")
    assert main(["models"]) == 2
    (line,) = _medrl_lines(capsys)
    assert "MEDRL_PROGRESS=maybe" in line and "1 (on) or 0 (off)" in line
    monkeypatch.delenv("MEDRL_PROGRESS")
    monkeypatch.setenv("MEDRL_DEBUG", "verbose")
    assert main(["models"]) == 2
    assert "MEDRL_DEBUG=verbose" in _medrl_lines(capsys)[0]


def test_num_options_above_the_class_count_is_said(medmnist, capsys, caplog) -> None:
    from medrl.data.medmnist import MedMNISTDataModule

    dm = MedMNISTDataModule("breastmnist", mode="vqa", num_options=9, val_samples=4, **medmnist.kwargs())
    dm.setup("validate")
    said = capsys.readouterr().err + caplog.text
    assert "num_options 9 is more than breastmnist's 2 classes: its questions offer 2 options" in said


def test_a_medmnist_path_that_is_a_folder_or_a_symlink_loop_says_so(tmp_path) -> None:
    from medrl.data.medmnist_files import load_file, verify_file

    (tmp_path / "breastmnist.npz").mkdir()
    with pytest.raises(UserError, match=r"breastmnist.npz is a folder, not a MedMNIST file"):
        load_file(tmp_path / "breastmnist.npz", "breastmnist", 28)
    assert "is a folder" in verify_file(tmp_path / "breastmnist.npz").problems[0]
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "breastmnist.npz").symlink_to(loop / "breastmnist.npz")
    with pytest.raises(UserError, match=r"breastmnist.npz is a symbolic link that leads nowhere"):
        load_file(loop / "breastmnist.npz", "breastmnist", 28)


def test_a_latin1_line_and_a_decompression_bomb_are_dropped_rows(tmp_path) -> None:
    from PIL import Image

    from medrl.data.benchmarks import read_jsonl_items
    from medrl.data.image_store import ImageStore

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "images" / "bomb.png")  # 400 megapixels, a few kB on disk
    row = {"dataset_name": "VQA-RAD", "options": {"A": "yes", "B": "no"}, "answer_label": "A", "answer": "yes"}
    ok, bomb = ["images/ok.png"], ["images/bomb.png"]
    lines = [json.dumps({**row, "question": "Q?", "images": ok, "dataset_index": 0}).encode(),
             json.dumps({**row, "question": "caf\u00e9?", "images": ok, "dataset_index": 1},
                        ensure_ascii=False).encode("latin-1"),
             json.dumps({**row, "question": "Q?", "images": bomb, "dataset_index": 2}).encode()]  # fmt: skip
    (tmp_path / "suite.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items, report = read_jsonl_items(tmp_path / "suite.jsonl", ImageStore(tmp_path))
    assert [it.dataset_index for it in items] == [0]
    assert report.counts() == {"not_utf8": 1, "image_too_large": 1}


def test_a_stage_child_killed_with_sigkill_is_said_with_its_last_lines(tmp_path, capsys) -> None:
    from medrl.study.runner import Stage, StageRunner, child_failure, run_child

    pid_file, log_file = tmp_path / "child.pid", tmp_path / "fit.log"
    # The child prints without flushing, as `medrl fit` does into a log file, then is killed from outside.
    child = [sys.executable, "-c", f"import os, time; print('Epoch 0: loading the batch'); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"]  # fmt: skip

    def run() -> None:
        with open(log_file, "w") as log:
            code = run_child(child, tmp_path, log)
        if code:
            raise child_failure("`medrl fit` for sft_x", code, log_file)

    def kill_when_started() -> None:
        deadline = time.time() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    with pytest.raises(UserError, match="was killed by SIGKILL"):
        StageRunner(tmp_path / "run").run([Stage("sft:sft_x", "train", [tmp_path / "never"], run)])
    killer.join()
    out = capsys.readouterr().out
    assert "out-of-memory killer" in out and "Epoch 0: loading the batch" in out and "Traceback" not in out


def test_the_run_folder_turning_read_only_mid_run_is_one_line(tiny_dir, medmnist, tmp_path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root writes anywhere; without setpriv (util-linux) it cannot be made to obey permissions")
    fragment = tmp_path / "read_only.yaml"
    fragment.write_text(
        "trainer:\n  callbacks+:\n    - class_path: fault_callbacks.ReadOnlyAfterStep\n      init_args: {step: 1}\n"
    )
    root = tmp_path / "run"
    args = ["-m", "medrl.cli", *_fit("configs/sft.yaml", root, f"--model.init_args.model={tiny_dir}"),
            *medmnist.cli(), *FAST_SFT, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1",
            "--config", str(fragment)]  # fmt: skip
    drop = [] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), MEDRL_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([*drop, sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("medrl fit: error: "), out.stderr[-3000:]
    assert "Permission denied" in last and str(root) in last and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["data", "--help"],
        ["data", "verify", "--help"],
        ["eval", "--help"],
        ["report", "--help"],
        ["export", "--help"],
    ],
)
def test_help_loads_neither_torch_nor_lightning(argv: list[str]) -> None:
    # Importing them costs about 7 s of CPU on a 2-core machine: `medrl --help` must not pay for it.
    code = (
        "import sys\nfrom medrl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
