"""Run one side of a comparison in a fresh Python process and measure its peak resident memory.

Two memory figures come back. ``peak_rss_mib`` is the kernel's high-water mark of the largest process in the
side's tree (``ru_maxrss`` from ``wait4``: exact, but a parent and the children it waited for give their
maximum, not their sum). ``tree_peak_rss_mib`` is the largest sum of the tree's resident sets seen while
polling ``/proc`` every ``poll_s`` seconds (catches helper processes running at once; can miss a spike
shorter than the poll). The table quotes the larger of the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrl.core.io import atomic_write_json

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


class SideFailed(RuntimeError):
    """A side's process exited with an error; the message carries the end of its log."""


@dataclass
class SideRun:
    """What one isolated run of a side produced and cost."""

    result: dict[str, Any]  # what the side's function returned (JSON)
    wall_s: float  # the whole process, imports included
    cpu_s: float  # user + system CPU seconds of the process and the children it waited for
    peak_rss_mib: float  # high-water mark of the largest process in the tree
    tree_peak_rss_mib: float  # largest polled sum over the process tree
    load_before: list[float]  # 1, 5 and 15 minute load averages when the run started


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident pages) for every process readable under /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended between listing and reading
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[21]))
    return table


def tree_rss_mib(root: int) -> float:
    """Resident MiB of ``root`` and all its descendants now (0 where /proc is unavailable)."""
    if not os.path.isdir("/proc"):
        return 0.0
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total * PAGE_MIB


def run_isolated(
    script: Path, name: str, spec: dict[str, Any], workdir: Path, env: dict[str, str], poll_s: float = 0.25
) -> SideRun:
    """Run ``script --child SPEC --result OUT`` in a new process; raise :class:`SideFailed` on a non-zero exit.

    Args:
        script: the harness script; its ``--child`` mode runs ``spec`` and writes the result JSON.
        name: a file-name-safe label for this run (spec, result and log files are named after it).
        spec: what the child runs (JSON).
        workdir: where the spec, result and log files go.
        env: the child's environment.
        poll_s: seconds between samples of the process tree's resident memory.
    """
    spec_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    atomic_write_json(spec_path, spec)
    result_path.unlink(missing_ok=True)
    load_before = list(os.getloadavg())
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        cmd = [sys.executable, str(script), "--child", str(spec_path), "--result", str(result_path)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=script.parent.parent)
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss_mib(proc.pid))
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen so it never waits again
    if proc.returncode or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SideFailed(f"{name} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    return SideRun(
        result=json.loads(result_path.read_text()),
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        # ru_maxrss is in KiB on Linux (bytes on macOS, where this harness is not expected to run)
        peak_rss_mib=usage.ru_maxrss / 1024,
        tree_peak_rss_mib=tree_peak,
        load_before=load_before,
    )
