"""The stage runner: skips finished stages by checking outputs, keeps earlier outputs when a stage fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrl.io import atomic_write_json
from medrl.study.runner import Stage, StageRunner, json_has_keys


def _stages(out: Path, calls: list[str], fail: str | None = None) -> list[Stage]:
    def make(name: str):
        def run() -> None:
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            atomic_write_json(out / f"{name}.json", {"value": len(calls)})

        return Stage(name, f"the {name} stage", [out / f"{name}.json"], run, json_has_keys("value"))

    return [make(n) for n in ("vision", "support", "report")]


def test_rerun_skips_finished_stages(tmp_path: Path) -> None:
    calls: list[str] = []
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    assert calls == ["vision", "support", "report"]
    records = json.loads((tmp_path / "stages.json").read_text())
    assert [records[n]["status"] for n in ("vision", "support", "report")] == ["done"] * 3


def test_failure_keeps_earlier_outputs_and_resumes(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="support broke"):
        StageRunner(tmp_path).run(_stages(tmp_path, calls, fail="support"))
    assert (tmp_path / "vision.json").is_file() and not (tmp_path / "report.json").exists()
    assert json.loads((tmp_path / "stages.json").read_text())["support"]["status"] == "failed"
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    assert calls == ["vision", "support", "support", "report"]


def test_a_damaged_output_is_redone(tmp_path: Path) -> None:
    calls: list[str] = []
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    (tmp_path / "support.json").write_text('{"valu')  # truncated by hand
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    assert calls[3:] == ["support"]


def test_a_stage_that_writes_nothing_fails(tmp_path: Path) -> None:
    stage = Stage("lazy", "claims success", [tmp_path / "never.json"], lambda: None)
    with pytest.raises(RuntimeError, match="fail their check"):
        StageRunner(tmp_path).run([stage])


def test_atomic_writes_get_the_mode_the_umask_gives_and_leave_no_temp_file(tmp_path: Path) -> None:
    import os

    old = os.umask(0o027)
    try:
        path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600
    assert json.loads(path.read_text()) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
