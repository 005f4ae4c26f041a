"""The `medrl` command: overview help, the data verbs on good and corrupt files, and unknown verbs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.cli import main


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "medrl"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    for verb in ("fit", "validate", "test", "predict", "data"):
        assert f"  {verb}" in out


def test_fit_help_lists_lightning_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "medrl.cli", "fit", "--help"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert "--trainer.max_epochs" in out.stdout and "--model" in out.stdout and "--data" in out.stdout


def test_unknown_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err


def test_data_verify_official(real_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "verify", "--root", str(real_data_dir)]) == 0
    out = capsys.readouterr().out
    # Every MedMNIST file the folder holds is reported official, whichever flags it has.
    files = sorted(p.name for p in real_data_dir.glob("*mnist*.npz"))
    assert files and out.count("official") == len(files) and all(name in out for name in files)


def test_data_verify_names_a_corrupt_file(real_data_dir: Path, tmp_path: Path, capsys) -> None:
    shutil.copy(real_data_dir / "breastmnist.npz", tmp_path)
    data = (real_data_dir / "pneumoniamnist.npz").read_bytes()
    (tmp_path / "pneumoniamnist.npz").write_bytes(data[:-5000])
    assert main(["data", "verify", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "pneumoniamnist.npz" in out and "truncated or corrupt" in out
    assert main(["data", "verify", "--root", str(tmp_path), "--flag", "breastmnist"]) == 0


def test_data_synth_then_verify_says_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--flag", "octmnist", "--size", "64", "--out", str(tmp_path), "--n_train", "8"]) == 0
    assert (tmp_path / "octmnist_64.synthetic.npz").is_file()
    assert main(["data", "verify", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "official" not in out


def test_data_fetch_offline_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "fetch", "--flag", "bloodmnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medrl data fetch: error: offline mode is set") and "bloodmnist.npz" in err
