"""Narrated, resumable stages: each says what it is for, what it writes and how long it took.

A stage is done when its outputs exist and its ``check`` accepts them (outputs are checked, not assumed),
so a rerun skips finished stages. A stage runs again even when its outputs exist if it is forced, or if a
stage it reads from (``after``) finished more recently than it did: results never mix old and new inputs,
and since finish times are kept in ``stages.json`` this holds across interrupted runs too. A failing stage
leaves every earlier output intact, is recorded in ``stages.json`` with its error, and the runner says how
to resume.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console

from medrl.core.errors import UserError, user_error_in
from medrl.core.io import atomic_write_json

# A stage recorded as running (started, not finished) or failed is redone, whatever its outputs say: they may
# be a set-aside model's, or half of a new one's.
UNFINISHED = ("running", "failed")


def outputs_exist(paths: Sequence[Path]) -> bool:
    """The default check: every output is a non-empty file or a non-empty folder."""
    for path in paths:
        if path.is_dir():
            if not any(path.iterdir()):
                return False
        elif not path.is_file() or path.stat().st_size == 0:
            return False
    return True


def json_has_keys(*keys: str) -> Callable[[Sequence[Path]], bool]:
    """A check that every output is a JSON object holding ``keys`` (a truncated or stale file fails it)."""

    def check(paths: Sequence[Path]) -> bool:
        try:
            return all(isinstance(d := json.loads(p.read_text()), dict) and all(k in d for k in keys) for p in paths)
        except (OSError, ValueError):
            return False

    return check


@dataclass
class Stage:
    """One step of the study.

    Args:
        name: short identifier, e.g. ``support``.
        purpose: one sentence: what the stage is for.
        outputs: files or folders it writes; the stage is done when they pass ``check``.
        run: does the work; must write ``outputs`` atomically.
        check: accepts finished outputs (default: all exist and are non-empty).
        after: names of the stages whose outputs this one reads; when one of them has run since this one
            last finished, this one runs again.
        reset: called before a stage with finished outputs runs again (e.g. to set a trained model aside so
            it is trained anew rather than reused).
    """

    name: str
    purpose: str
    outputs: list[Path]
    run: Callable[[], None]
    check: Callable[[Sequence[Path]], bool] = outputs_exist
    after: list[str] = field(default_factory=list)
    reset: Callable[[], None] | None = None

    def done(self) -> bool:
        """True when the outputs exist and pass the check."""
        return bool(self.outputs) and outputs_exist(self.outputs) and self.check(self.outputs)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def expected_times(plan_path: Path, run_dir: Path) -> dict[str, float]:
    """Measured seconds per stage: the plan's ``<plan>.times.json`` (committed with it), overridden by what
    this run directory's ``stages.json`` recorded for stages that finished before (this machine's own)."""
    times: dict[str, float] = {}
    committed = _json_object(plan_path.with_suffix(".times.json")).get("seconds", {})
    recorded = _json_object(run_dir / "stages.json")
    own = {k: v.get("seconds") for k, v in recorded.items() if isinstance(v, dict) and v.get("status") == "done"}
    for source in (committed, own):
        times |= {k: float(v) for k, v in source.items() if isinstance(v, int | float)}
    return times


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class StageRunner:
    """Runs stages in order, narrating each and recording timings and failures in ``<out>/stages.json``."""

    out: Path
    resume_hint: str = "make reproduce"
    # Seconds each stage took when it was measured (this run's earlier records, else the plan's times file):
    # the narration's estimate of the time left.
    expected: dict[str, float] = field(default_factory=dict)
    # Logs and CI are not terminals: rich would wrap at 80 columns there.
    console: Console = field(
        default_factory=lambda: Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    )

    def _read_records(self, path: Path) -> dict:
        """The stage records; a damaged ``stages.json`` is set aside and rebuilt from the outputs, which are
        checked anyway (a stage whose outputs pass is done; the others run)."""
        if not path.is_file():
            return {}
        try:
            records = json.loads(path.read_text())
            if isinstance(records, dict):
                return records
        except (OSError, ValueError):
            pass
        aside = path.with_name(f"stages.damaged-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.rename(aside)
        self.console.print(
            f"[yellow]{path} is damaged (not a JSON object); set aside as {aside.name}[/]: stage records are "
            "rebuilt from the outputs, which every stage checks"
        )
        return {}

    def _time_left(self, remaining: Sequence[Stage], records: dict) -> str:
        """``this stage ~30s; about 4 min left`` from the measured times of the stages still to run."""
        if not self.expected:
            return ""
        # This stage and every later one not recorded done (a done one is skipped unless upstream reran).
        todo = [remaining[0], *(s for s in remaining[1:] if records.get(s.name, {}).get("status") != "done")]
        known = [self.expected[s.name] for s in todo if s.name in self.expected]
        if not known:
            return ""
        this = self.expected.get(remaining[0].name)
        head = f"this stage ~{_duration(this)}" if this is not None else "this stage: no measured time"
        unknown = len(todo) - len(known)
        tail = f" (+{unknown} stage(s) never measured)" if unknown else ""
        return f"{head}; about {_duration(sum(known))} left{tail}"

    def _record(self, records: dict) -> None:
        atomic_write_json(self.out / "stages.json", records)

    def run(self, stages: Sequence[Stage], force: Sequence[str] = ()) -> dict:
        """Run (or skip) every stage; stop at the first failure. Returns the per-stage records."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "stages.json"
        records = self._read_records(path)
        total = time.perf_counter()
        for i, stage in enumerate(stages, 1):
            head = f"[bold]{i}/{len(stages)} {stage.name}[/]: {stage.purpose}"
            outputs = ", ".join(
                str(p.relative_to(self.out)) if p.is_relative_to(self.out) else str(p) for p in stage.outputs
            )
            record = records.get(stage.name, {})
            finished = record.get("finished", 0.0)
            upstream = [name for name in stage.after if records.get(name, {}).get("finished", 0.0) > finished]
            interrupted = record.get("status") in UNFINISHED
            done = stage.done()
            if done and stage.name not in force and not upstream and not interrupted:
                self.console.print(f"{head}\n    [green]done already[/] ({outputs}); skipping")
                if stage.name not in records:  # a rebuilt record: in stage order, so nothing looks newer
                    records[stage.name] = {"status": "done", "outputs": outputs, "finished": time.time()}
                    self._record(records)
                continue
            self.console.print(f"{head}\n    writes: {outputs}")
            if eta := self._time_left(stages[i - 1 :], records):
                self.console.print(f"    {eta}")
            if done:
                why = (
                    "forced"
                    if stage.name in force
                    else f"{', '.join(upstream)} ran since it last did"
                    if upstream
                    else f"it was {record['status']} when the last run stopped"
                )
                self.console.print(f"    [yellow]rerunning[/]: {why}")
            # Recorded before anything is reset or written: a kill from here on leaves the stage marked
            # unfinished, so the next run redoes it (and, through `after`, everything that reads it).
            records[stage.name] = {"status": "running", "started": time.time()}
            self._record(records)
            start = time.perf_counter()
            try:
                if done and stage.reset is not None:
                    stage.reset()
                stage.run()
                if not stage.done():
                    raise RuntimeError(f"stage {stage.name} finished but its outputs fail their check: {outputs}")
            except BaseException as exc:
                seconds = time.perf_counter() - start
                records[stage.name] = {"status": "failed", "seconds": round(seconds, 2), "error": repr(exc)}
                self._record(records)
                told = user_error_in(exc)  # a cause the user can act on: its message, no traceback
                self.console.print(f"    [red]failed after {seconds:.1f}s[/]: ", end="")
                self.console.print(str(told) if told else repr(exc), markup=False)
                if not isinstance(exc, KeyboardInterrupt) and told is None:
                    self.console.print(traceback.format_exc(limit=-3), markup=False)
                self.console.print(
                    f"    Earlier outputs in {self.out} are intact. Fix the cause and rerun `{self.resume_hint}`: "
                    f"finished stages are skipped and it resumes at {stage.name}."
                )
                raise
            seconds = time.perf_counter() - start
            records[stage.name] = {"status": "done", "seconds": round(seconds, 2), "outputs": outputs,
                                   "finished": time.time()}  # fmt: skip
            self._record(records)
            self.console.print(f"    [green]done in {seconds:.1f}s[/]")
        self.console.print(f"all {len(stages)} stages finished; this run took {time.perf_counter() - total:.1f}s")
        return records


@contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``RUN/.lock`` while a command writes into ``run_dir``; a second command on it is refused.

    The lock is an ``flock`` on an open file: the kernel drops it when its holder exits in any way (``kill
    -9`` included), so a stale lock never blocks a rerun.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by {holder}: wait for it to finish (or stop it), then rerun `{command}`; "
            "two runs in one folder would overwrite each other"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
    try:
        yield
    finally:
        os.close(fd)


class Stopped(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM); it stops like on Ctrl-C: the stage is recorded, the hint printed."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Stopped` for the block, so a stopped run says how to resume."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:
        if sys.platform.startswith("linux"):
            # PR_SET_PDEATHSIG (1): the kernel sends the child SIGTERM when its parent dies, even by kill -9.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return setup


def run_child(command: Sequence[str], cwd: Path, log: IO[bytes] | IO[str], grace: float = 30.0) -> int:
    """Run a stage's subprocess (``medrl fit``) that never outlives this process; returns its exit code.

    Killed with this process (``kill -9`` included, through the parent-death signal), and stopped first
    (SIGTERM, then SIGKILL after ``grace`` seconds) when this process is interrupted, so no training goes
    on writing into a run folder that nothing watches.
    """
    # Unbuffered: a child killed with SIGKILL (out of memory) loses whatever it had not flushed, and its last
    # lines are the ones that say what it was doing.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(os.getpid())
    )
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def child_failure(what: str, returncode: int, log_file: Path, lines: int = 15) -> UserError:
    """Why a stage's child process failed, with the last lines of its log: a signal is named (SIGKILL from
    outside is most often the kernel's out-of-memory killer), an exit code is given as is."""
    tail = log_file.read_text(errors="replace").splitlines()[-lines:] if log_file.is_file() else []
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else f"signal {-returncode}"
        why = f"was killed by {name}" + (
            " (most often the kernel's out-of-memory killer: check free memory or `dmesg`, and lower batch sizes "
            "or the number of samples)"
            if -returncode == signal.SIGKILL
            else ""
        )
    else:
        why = f"exited {returncode}"
    excerpt = "\n".join(tail) if tail else "(the log is empty)"
    return UserError(f"{what} {why}; the last lines of {log_file}:\n{excerpt}")
