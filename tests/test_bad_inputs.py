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


def _without_read_override(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Python run so that file permissions bind it: root keeps its uid but loses the capabilities that let it
    read any file (``setpriv``), as an ordinary user would be."""
    env = dict(os.environ, MEDRL_OFFLINE="1", HF_HUB_OFFLINE="1")
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
