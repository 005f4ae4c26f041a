"""The benchmark harness (bench/run.py) end to end in its quick mode: every comparison runs and writes its rows.

The ratios are not checked here (speed claims are measured by the harness itself, never by a timed test);
what is checked is that each side ran in its own process, produced timings and a memory figure, and that
both result files hold every row with the machine's load, hardware and versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF_ROWS = {"grpo_hf", "pass_at_k_hf", "probe_cold", "probe_warm"}
VLLM_ROWS = {"grpo_vllm", "pass_at_k_vllm", "throughput_1", "throughput_2"}


def _run_quick(out: Path, data_dir: Path, *extra: str) -> dict:
    env = dict(os.environ, MEDRL_DATA_DIR=str(data_dir))
    # --jobs 3: sides overlap (their timings disturb each other, which the quick mode does not judge)
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--jobs", "3", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"bench/run.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text())


def _measured(side: dict | None) -> bool:
    if not side:
        return False
    return side["n"] >= 1 and 0 < side["min"] <= side["median"] <= side["max"] and side["peak_rss_mib"] > 0


def _check_common(results: dict, out: Path) -> dict[str, dict]:
    rows = {row["key"]: row for row in results["rows"]}
    assert set(rows) == HF_ROWS | VLLM_ROWS
    assert results["mode"] == "quick"
    assert len(results["load_average"]["start"]) == 3 and results["load_average"]["one_minute_at_run_starts"]["n"]
    assert results["hardware"]["cpus"] >= 1 and "torch" in results["versions"] and "trl" in results["versions"]
    assert set(results["fairness"]) == {"grpo", "sampling", "probe"}
    for key in HF_ROWS:
        row = rows[key]
        assert _measured(row["medrl"]) and _measured(row["peer"]), key
        assert row["ratio"] > 0 and row["ratio_spread"][0] <= row["ratio"] <= row["ratio_spread"][1], key
    # Where the GRPO time goes: medrl's named stages and TRL's own profiling blocks, per step.
    where = rows["grpo_hf"]["where_time_goes"]
    assert "generate" in where and "update" in where and "transformers.generate" in where
    markdown = (out / "results.md").read_text()
    for row in results["rows"]:
        assert f"| {row['comparison']} |" in markdown
    assert "Load average" in markdown and results["hardware"]["cpu"] in markdown
    return rows


def test_quick_mode_runs_every_comparison(real_data_dir: Path, tmp_path: Path) -> None:
    results = _run_quick(tmp_path, real_data_dir)
    rows = _check_common(results, tmp_path)
    assert results["vllm_sides"] is False
    for key in VLLM_ROWS:  # present, and saying why they hold no figure
        assert rows[key]["ratio"] is None and rows[key]["note"].startswith("not run"), key
    # the throughput rows still carry the hf engine's figures
    assert _measured(rows["throughput_1"]["peer"]) and rows["throughput_1"]["peer"]["label"] == "hf engine"
    sides = results["sides"]
    assert set(sides) == {"grpo/medrl-hf", "grpo/trl", "sampling/per-sample", "sampling/hf", "probe/reencoding",
                          "probe/cached"}  # fmt: skip
    # equal work on both sampling sides: the same number of new tokens per pass
    assert sides["sampling/per-sample"]["runs"][0]["result"]["tokens"][0] > 0


@pytest.mark.slow
def test_quick_mode_with_vllm_sides(real_data_dir: Path, tmp_path: Path) -> None:
    results = _run_quick(tmp_path, real_data_dir, "--vllm")
    rows = _check_common(results, tmp_path)
    for key in VLLM_ROWS:
        assert _measured(rows[key]["medrl"]) and _measured(rows[key]["peer"]) and rows[key]["ratio"] > 0, key
    assert "sync" in rows["grpo_vllm"]["where_time_goes"]
