"""Bad inputs a new user hits get one clear line: what, where, the fix (and lose nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.data.medmnist_files import synthesize

REPO = Path(__file__).resolve().parents[1]


def _without_read_override(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Python run so that file permissions bind it: root keeps its uid but loses the capabilities that let it
    read any file (``setpriv``), as an ordinary user would be."""
    env = dict(os.environ, MEDRL_OFFLINE="1", HF_HUB_OFFLINE="1", **env_vars)
    drop = [] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return subprocess.run([*drop, sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture
def shared_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root reads every file; without setpriv (util-linux) it cannot be made to obey permissions")
    return tmp_path


def test_an_unreadable_medmnist_file_is_reported_as_such_and_the_others_still_checked(shared_folder: Path) -> None:
    data = shared_folder / "data"
    data.mkdir(mode=0o755)
    for flag in ("breastmnist", "pneumoniamnist"):
        synthesize(flag, out=data, n_train=16, n_val=8, n_test=8).chmod(0o644)
    (data / "pneumoniamnist.synthetic.npz").chmod(0o000)
    out = _without_read_override(["-m", "medrl.cli", "data", "verify", "--root", str(data)], shared_folder)
    assert out.returncode == 1, out.stderr[-2000:]
    text = " ".join(out.stdout.split())  # the table wraps long lines
    assert "Traceback" not in out.stdout + out.stderr
    assert "breastmnist.synthetic.npz" in text  # the readable file is still reported
    assert "cannot read pneumoniamnist.synthetic.npz: permission denied" in text
    assert "corrupt" not in text  # never advice that invites deleting good data


def test_training_on_an_unreadable_file_says_permission_denied_not_corrupt(shared_folder: Path) -> None:
    data = shared_folder / "data"
    data.mkdir(mode=0o755)
    synthesize("breastmnist", out=data, n_train=16, n_val=8, n_test=8).chmod(0o000)
    code = (
        "from medrl.data.medmnist import MedMNISTDataModule\n"
        f"MedMNISTDataModule('breastmnist', root={str(data)!r}, synthetic=True).dataset('train')\n"
    )
    out = _without_read_override(["-c", code], shared_folder)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "MedMNISTFileError" in last and "permission denied" in last and "corrupt" not in last, last


def _one_line(capsys: pytest.CaptureFixture, starts: str) -> str:
    # Only medrl's own lines: a logging handler left by an earlier test may complain about a closed stream.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("medrl ")]
    assert len(err) == 1 and err[0].startswith(starts), err
    return err[0]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medrl.cli import main

    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  callbacks: [a, b\nmodel: x\n")
    assert main(["fit", "--config", str(bad)]) == 2
    line = _one_line(capsys, "medrl fit: error: ")
    assert str(bad) in line and "line 4" in line and "<unicode string>" not in line
    assert main(["reproduce", "--plan", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert str(bad) in _one_line(capsys, "medrl reproduce: error: ")


def test_a_negative_learning_rate_is_refused_by_name_before_training(tiny_dir, medmnist, capsys) -> None:
    from medrl.cli import main

    sft = ["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}", *medmnist.cli()]
    assert main([*sft, "--optimizer.init_args.lr=-0.1"]) == 2
    assert "--optimizer.init_args.lr must be >= 0, got -0.1" in _one_line(capsys, "medrl fit: error: ")
    rl = ["fit", "--config", str(REPO / "configs/rl.yaml"), f"--model.init_args.model={tiny_dir}", *medmnist.cli()]
    assert main([*rl, "--model.init_args.optim.lr=-1"]) == 2
    assert "optim.lr >= 0" in _one_line(capsys, "medrl fit: error: ")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["empty", "truncated"])
def test_an_incomplete_ckpt_path_is_named_before_training(tiny_dir, medmnist, tmp_path, capsys, content) -> None:
    from medrl.cli import main

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(content)
    args = ["fit", "--config", str(REPO / "configs/rl.yaml"), f"--model.init_args.model={tiny_dir}", *medmnist.cli(),
            f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", str(ckpt)]  # fmt: skip
    assert main(args) == 2
    line = _one_line(capsys, "medrl fit: error: ")
    assert f"--ckpt_path {ckpt} is not a complete checkpoint ({len(content)} bytes" in line


def test_a_read_only_checkpoint_folder_fails_before_the_first_step(tiny_dir, medmnist, shared_folder: Path) -> None:
    locked = shared_folder / "ckpts"
    locked.mkdir()
    locked.chmod(0o555)
    args = ["-m", "medrl.cli", "fit", "--config", str(REPO / "configs/rl.yaml"), f"--model.init_args.model={tiny_dir}",
            *medmnist.cli(), f"--trainer.default_root_dir={shared_folder / 'run'}",
            f"--trainer.callbacks.init_args.dirpath={locked}"]  # fmt: skip
    out = _without_read_override(args, REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("medrl fit: error: cannot write checkpoints (HFCheckpoint.dirpath)") and str(locked) in last
    # Refused before training: without the check the run would train 20 steps (the progress bar's "Epoch 0")
    # and only then fail at its first save.
    assert "Epoch 0" not in out.stdout + out.stderr


def test_a_read_only_medrl_cache_is_named(shared_folder: Path) -> None:
    cache = shared_folder / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    code = "from medrl.models.families.qwen_vl import tiny_dir; tiny_dir(3)"
    out = _without_read_override(["-c", code], shared_folder, MEDRL_CACHE=str(cache))
    last = out.stderr.strip().splitlines()[-1]
    assert "UserError" in last and f"MEDRL_CACHE={cache} is not writable" in last, last


def test_model_folders_get_the_umask_mode_like_every_other_output(tmp_path: Path) -> None:
    from medrl.models.families.qwen_vl import tiny_dir

    old = os.umask(0o022)
    try:
        folder = tiny_dir(5, root=tmp_path)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()} == {0o644}


def test_a_latin1_byte_in_a_pmc_csv_costs_neither_the_row_nor_the_file(tmp_path: Path, caplog) -> None:
    from test_pmc_vqa import make_pmc

    from medrl.data.pmc_vqa import read_pmc_rows

    root = make_pmc(tmp_path)
    raw = (root / "train.csv").read_bytes()
    first = raw.index(b"What does figure 3 show?")
    (root / "train.csv").write_bytes(raw[:first] + "Qu\xe9".encode("latin-1") + raw[first + 4 :])  # é as one byte
    with caplog.at_level("WARNING"):
        rows = read_pmc_rows(root / "train.csv")
    assert len(rows) == 45 and rows[3][2]["Question"].strip() == "Qué does figure 3 show?"
    assert "not UTF-8 (line 5)" in caplog.text and "train.csv" in caplog.text


def test_a_byte_order_mark_does_not_cost_the_first_suite_row(tmp_path: Path) -> None:
    from test_benchmarks import make_suite

    from medrl.data.benchmarks import BenchmarkSuiteDataModule

    plain = BenchmarkSuiteDataModule(str(make_suite(tmp_path / "a", with_bad=False))).dataset()
    root = make_suite(tmp_path / "b", with_bad=False)
    (root / "suite.jsonl").write_bytes(b"\xef\xbb\xbf" + (root / "suite.jsonl").read_bytes())
    data = BenchmarkSuiteDataModule(str(root))
    assert len(data.dataset()) == len(plain) and not any(r.dropped for r in data.reports)


def test_a_benchmark_outside_the_six_is_kept_out_of_the_mean() -> None:
    from medrl.report.benchmark_table import score

    rows = [{"benchmark": b, "greedy_correct": ok, "greedy": "A"} for b, ok in
            [("PMC", True), ("SLAKE", False), ("MyClinic", True), ("MyClinic", True)]]  # fmt: skip
    scored = score(rows)
    assert scored["outside_mean"] == ["MyClinic"] and scored["per_benchmark"]["MyClinic"]["acc@1"] == 1.0
    assert scored["mean"]["acc@1"] == 0.5  # (PMC 1 + SLAKE 0) / 2, not (1 + 0 + 1) / 3
    assert score(rows, mean_of_all=True)["mean"]["acc@1"] == pytest.approx(2 / 3)


def test_a_damaged_stages_json_is_rebuilt_from_the_outputs(tmp_path: Path) -> None:
    from medrl.study.runner import Stage, StageRunner

    ran: list[str] = []
    stage = Stage(
        "a", "writes a", [tmp_path / "a.txt"], lambda: (ran.append("a"), (tmp_path / "a.txt").write_text("a"))
    )
    StageRunner(tmp_path).run([stage])
    (tmp_path / "stages.json").write_text('{"a": {"status": "do')  # cut short
    StageRunner(tmp_path).run([stage])
    assert ran == ["a"]  # its output checks out: not redone
    assert list(tmp_path.glob("stages.damaged-*.json")) and "a" in (tmp_path / "stages.json").read_text()
