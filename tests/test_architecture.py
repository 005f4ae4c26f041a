"""The layer contract of pyproject.toml holds, and breaks when code crosses a layer or closes a circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


CONTRACTS = ("layers", "pure-rl", "no-cycles")  # the ids in pyproject.toml's [tool.importlinter]


def _lint(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first, so the checked copy of medrl is found before the installed (editable) one.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    cmd = [str(LINT), "--no-cache", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _broken(root: Path) -> set[str]:
    return {c for c in CONTRACTS if _lint(root, "--contract", c).returncode != 0}


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "medrl", tmp_path / "medrl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # rl is pure maths: importing a LightningModule crosses two layers up and pulls in lightning.
        ("rl/advantages.py", "from medrl.lit import sft", {"layers", "pure-rl", "no-cycles"}),
        # data and models are independent siblings: neither may import the other.
        ("models/lora.py", "from medrl.data import vqa", {"layers"}),
        # the rollout engine's types may not import an engine that imports them back.
        ("rollout/types.py", "from medrl.rollout import hf", {"no-cycles"}),
    ],
)
def test_a_violation_fails_the_lint(tmp_path: Path, module: str, line: str, broken: set[str]) -> None:
    root = _copy(tmp_path)
    assert _broken(root) == set()
    target = root / "medrl" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa: E402, F401\n")
    assert _broken(root) == broken
    out = _lint(root)
    assert out.returncode != 0 and "BROKEN" in out.stdout
