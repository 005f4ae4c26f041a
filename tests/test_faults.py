"""Kills, stops and concurrent runs lose nothing and leave nothing behind (the study's runner and commands).

- A stage's child (``medrl fit``) dies with its parent, even on ``kill -9``; SIGTERM stops it cleanly.
- A second command on a run folder in use is refused with one line; the lock dies with its holder.
- A stage killed while it reruns is redone by the next plain run, and so is everything that reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from medrl.cli import main
from medrl.study.runner import Stage, StageRunner, run_lock

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(path: Path, seconds: float = 60) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def _parent(tmp_path: Path, body: str) -> subprocess.Popen:
    """A Python process running ``body`` (with ``CHILD``: a command that writes its pid and sleeps)."""
    child = [
        sys.executable,
        "-c",
        f"import os, time; open({str(tmp_path / 'child.pid')!r}, 'w').write(str(os.getpid())); time.sleep(300)",
    ]
    script = f"import sys\nCHILD = {child!r}\n" + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_stage_child_dies_with_its_parent_even_on_kill_9(tmp_path: Path) -> None:
    parent = _parent(
        tmp_path,
        """
        from medrl.study.runner import run_child
        run_child(CHILD, ".", sys.stdout)
    """,
    )
    child = int(_wait_for(tmp_path / "child.pid"))
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)  # nothing of the parent's runs: only the kernel can stop the child
    parent.wait(timeout=10)
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent (it would go on writing into the run folder)"


def test_sigterm_stops_the_child_and_the_command_says_it_stopped(tmp_path: Path) -> None:
    parent = _parent(
        tmp_path,
        """
        from medrl.study.runner import run_child, stop_on_sigterm
        try:
            with stop_on_sigterm():
                run_child(CHILD, ".", sys.stdout)
        except KeyboardInterrupt as stop:
            print("stopped:", stop)
            sys.exit(130)
    """,
    )
    child = int(_wait_for(tmp_path / "child.pid"))
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == 130 and "stopped: stopped by signal SIGTERM" in out
    assert not _alive(child)


def test_a_second_command_on_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with run_lock(out, "medrl reproduce --out run"):
        assert main(["reproduce", "--scale", "cpu", "--out", str(out), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medrl reproduce: error: ") and "is in use by medrl reproduce" in err[0]
    assert f"pid {os.getpid()}" in err[0]


def test_the_lock_goes_with_its_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from medrl.study.runner import run_lock
        with run_lock(Path({str(out)!r}), "holder"):
            open({str(tmp_path / 'held')!r}, "w").write("1")
            time.sleep(300)
    """)], cwd=REPO)  # fmt: skip
    _wait_for(tmp_path / "held")
    with pytest.raises(Exception, match="is in use by holder"), run_lock(out, "second"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with run_lock(out, "second"):  # a killed holder leaves no stale lock behind
        assert "second" in (out / ".lock").read_text()


def _stages(out: Path, log: list[str], kill_a: bool = False) -> list[Stage]:
    def run_a() -> None:
        log.append("a")
        if kill_a:
            os.kill(os.getpid(), signal.SIGKILL)
        (out / "a.txt").write_text("a")

    def run_b() -> None:
        log.append("b")
        (out / "b.txt").write_text((out / "a.txt").read_text() + "b")

    return [Stage("a", "the first", [out / "a.txt"], run_a), Stage("b", "reads a", [out / "b.txt"], run_b, after=["a"])]


def test_a_stage_killed_while_forced_is_redone_with_what_reads_it(tmp_path: Path) -> None:
    log: list[str] = []
    StageRunner(tmp_path).run(_stages(tmp_path, log))
    assert log == ["a", "b"]
    # `--force a`, killed (-9) during a's run: its old output is still there, its record says "running".
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from pathlib import Path
        from test_faults import _stages
        from medrl.study.runner import StageRunner
        StageRunner(Path({str(tmp_path)!r})).run(_stages(Path({str(tmp_path)!r}), [], kill_a=True), force=["a"])
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "stages.json").read_text())["a"]["status"] == "running"
    log.clear()
    StageRunner(tmp_path).run(_stages(tmp_path, log))  # a plain rerun
    assert log == ["a", "b"], "the interrupted stage (and the one reading it) must run again, not be skipped"
    records = json.loads((tmp_path / "stages.json").read_text())
    assert records["a"]["status"] == records["b"]["status"] == "done"
