"""The stage runner: skips finished stages by checking outputs, keeps earlier outputs when a stage fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrl.core.io import atomic_write_json
from medrl.study.runner import Stage, StageRunner, json_has_keys


def _stages(out: Path, calls: list[str], fail: str | None = None) -> list[Stage]:
    def make(name: str):
        def run() -> None:
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            atomic_write_json(out / f"{name}.json", {"value": len(calls)})

        after = {"vision": [], "support": ["vision"], "report": ["vision", "support"]}[name]
        return Stage(name, f"the {name} stage", [out / f"{name}.json"], run, json_has_keys("value"), after=after)

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
    assert calls[3:] == ["support", "report"]  # the report read the damaged file: it is made again too


def test_a_forced_stage_reruns_the_stages_that_read_it_and_only_those(tmp_path: Path) -> None:
    calls: list[str] = []
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    StageRunner(tmp_path).run(_stages(tmp_path, calls), force=["support"])
    assert calls[3:] == ["support", "report"]  # vision is upstream of support: untouched
    StageRunner(tmp_path).run(_stages(tmp_path, calls), force=["vision"])
    assert calls[5:] == ["vision", "support", "report"]


def test_a_cascade_cut_short_by_a_failure_resumes_where_it_stopped(tmp_path: Path) -> None:
    calls: list[str] = []
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    with pytest.raises(RuntimeError, match="support broke"):
        StageRunner(tmp_path).run(_stages(tmp_path, calls, fail="support"), force=["vision"])
    # No --force this time: support failed and report is older than the new vision, so both run again.
    StageRunner(tmp_path).run(_stages(tmp_path, calls))
    assert calls[3:] == ["vision", "support", "support", "report"]


def test_reset_runs_only_before_redoing_finished_outputs(tmp_path: Path) -> None:
    events: list[str] = []

    def run() -> None:
        events.append("run")
        atomic_write_json(tmp_path / "m.json", {"value": 1})

    stage = Stage("train", "trains", [tmp_path / "m.json"], run, json_has_keys("value"),
                  reset=lambda: events.append("reset"))  # fmt: skip
    StageRunner(tmp_path).run([stage])
    StageRunner(tmp_path).run([stage])
    StageRunner(tmp_path).run([stage], force=["train"])
    assert events == ["run", "reset", "run"]


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


def test_each_stage_says_the_time_left_from_measured_times(tmp_path: Path) -> None:
    from rich.console import Console

    from medrl.study.runner import expected_times

    plan = tmp_path / "plan.yaml"
    atomic_write_json(tmp_path / "plan.times.json", {"seconds": {"vision": 120.0, "support": 30.0}})
    expected = expected_times(plan, tmp_path / "run")
    assert expected == {"vision": 120.0, "support": 30.0}
    console = Console(record=True, width=200)
    calls: list[str] = []
    StageRunner(tmp_path / "run", expected=expected, console=console).run(_stages(tmp_path / "run", calls))
    text = console.export_text()
    assert "this stage ~2.0 min; about 2.5 min left (+1 stage(s) never measured)" in text  # 150 s in all
    assert "this stage ~30s; about 30s left (+1 stage(s) never measured)" in text
    assert "this stage: no measured time" not in text  # the report stage has no known time: nothing said
    # The run's own records now override the committed times for the stages that finished.
    own = expected_times(plan, tmp_path / "run")
    assert set(own) == {"vision", "support", "report"} and own["vision"] < 120.0
