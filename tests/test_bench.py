"""The benchmark harness (bench/run.py) end to end in its quick mode: every comparison runs and writes its rows.

The ratios are not checked here (speed claims are measured by the harness itself, never by a timed test);
what is checked is that each side ran in its own process, produced timings and a memory figure, and that
both result files hold every row with the machine's load, hardware and versions.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]
# the quick mode's one size: tiny
HF_ROWS = {"grpo_hf@tiny", "grpo_update_shared@tiny", "pass_at_k_hf@tiny", "probe_table"}
VLLM_ROWS = {"grpo_vllm@tiny", "pass_at_k_vllm@tiny", "throughput_1@tiny", "throughput_2@tiny"}


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
    where = rows["grpo_hf@tiny"]["where_time_goes"]
    assert "generate" in where and "update" in where and "transformers.generate" in where
    # The machine's limit, and each GRPO side's achieved FLOP/s against it.
    assert results["sizes"] == ["tiny"] and results["peak"]["flops"] > 1e8
    flops = {row["side"]: row for row in results["flops"]}
    assert {"medrl-hf", "medrl-hf-unshared", "trl"} <= set(flops)
    # Shared, a group computes its prompt once: fewer positions than unshared, and exactly the useful ones.
    shared, unshared = flops["medrl-hf"], flops["medrl-hf-unshared"]
    assert shared["positions_computed"] == shared["useful_positions"] < unshared["positions_computed"]
    assert flops["trl"]["positions_computed"] == unshared["positions_computed"]
    assert all(flops[s]["update_flops"] > 0 and flops[s]["generate_flops"] > 0 for s in ("medrl-hf", "trl"))
    markdown = (out / "results.md").read_text()
    for row in results["rows"]:
        assert f"| {row['comparison']} |" in markdown
    assert "Load average" in markdown and results["hardware"]["cpu"] in markdown and "GFLOP/s" in markdown
    return rows


def test_quick_mode_runs_every_comparison(real_data_dir: Path, tmp_path: Path) -> None:
    results = _run_quick(tmp_path, real_data_dir)
    rows = _check_common(results, tmp_path)
    assert results["vllm_sides"] is False
    for key in VLLM_ROWS:  # present, and saying why they hold no figure
        assert rows[key]["ratio"] is None and rows[key]["note"].startswith("not run"), key
    # the throughput rows still carry the hf engine's figures
    assert _measured(rows["throughput_1@tiny"]["peer"]) and rows["throughput_1@tiny"]["peer"]["label"] == "hf engine"
    sides = results["sides"]
    assert set(sides) == {"grpo@tiny/medrl-hf", "grpo@tiny/medrl-hf-unshared", "grpo@tiny/trl",
                          "sampling@tiny/per-sample", "sampling@tiny/hf",
                          "probe/reextract", "probe/cached"}  # fmt: skip
    # the sweep's heads are real rows of a probe table: one per learning rate
    cached = sides["probe/cached"]["runs"][0]["result"]
    assert cached["rows"] == 3 and cached["extract_s"] > 0 and cached["heads_s"] > 0
    reextract = sides["probe/reextract"]["runs"][0]["result"]
    assert reextract["seconds"] == [pytest.approx(3 * sum(reextract["run_seconds"].values()))]
    # equal work on both sampling sides: the same number of new tokens per pass
    assert sides["sampling@tiny/per-sample"]["runs"][0]["result"]["tokens"][0] > 0


@pytest.mark.slow
def test_quick_mode_with_vllm_sides(real_data_dir: Path, tmp_path: Path) -> None:
    results = _run_quick(tmp_path, real_data_dir, "--vllm")
    rows = _check_common(results, tmp_path)
    for key in VLLM_ROWS:
        assert _measured(rows[key]["medrl"]) and _measured(rows[key]["peer"]) and rows[key]["ratio"] > 0, key
    assert "sync" in rows["grpo_vllm@tiny"]["where_time_goes"]


def _side(seconds: list[float], peak: float = 100.0, **result: object) -> dict:
    run = {"wall_s": 9.0, "cpu_s": 8.0, "peak_rss_mib": peak, "tree_peak_rss_mib": peak, "load_before": [1.0, 1.0, 1.0]}
    return {"runs": [{**run, "result": {"seconds": seconds, **result}}], "seconds": seconds, "peak_rss_mib": peak}


def test_rows_ratios_targets_and_failures_from_hand_made_measurements() -> None:
    if str(ROOT) not in sys.path:  # bench/ is a folder of scripts beside the package, not installed
        sys.path.insert(0, str(ROOT))
    from bench.markdown import render
    from bench.table import build_rows

    sides = {
        # medrl 1, 2, 3 s/step against TRL 2, 4, 6: ratio of medians 2 / 4 = 0.5; worst cases 1/6 and 3/2
        "grpo/medrl-hf": _side(
            [1.0, 2.0, 3.0], stages=[{"generate": 0.5, "update": 0.25, "completion_tokens_mean": 60.0}]
        ),
        "grpo/trl": _side([2.0, 4.0, 6.0], stages=[{"_prepare_inputs": 1.0, "compute_loss": 1.0}]),
        # the same steps with every completion's own prompt copy: an update of 0.75 s against the shared 0.25 s
        "grpo/medrl-hf-unshared": _side([2.5], peak=150.0, stages=[{"generate": 0.5, "update": 0.75}]),
        # the vLLM side crashed: its rows say so, and the HF row is untouched
        "grpo/medrl-vllm": {"runs": [], "seconds": [], "peak_rss_mib": 0.0, "failed": "grpo-medrl-vllm-r0 failed"},
        # extracted once 3 s against 2 heads x 12 s of runs: 8x, short of the 10x target by 10 / 8 = 1.25x
        "probe/cached": _side([3.0], rows=2, extract_s=2.0, heads_s=0.5),
        "probe/reextract": _side([24.0], run_seconds={"r / breast": 12.0}, heads=2),
    }
    settings = {"grpo": {}, "probe": {"encoders": ["r"], "flags": ["breast"], "heads": 2}}
    rows = {row["key"]: row for row in build_rows(sides, settings)}
    hf = rows["grpo_hf"]
    assert hf["ratio"] == 0.5 and hf["ratio_spread"] == [1 / 6, 1.5] and hf["met"] is True
    # medrl's step (median 2 s) minus its stages 0.75 s leaves 1.25 s; TRL's 4 s minus its two outer blocks, 2 s
    assert "outside these 1.250" in hf["where_time_goes"] and "outside these 2.000" in hf["where_time_goes"]
    update = rows["grpo_update_shared"]
    assert update["ratio"] == 3.0 and update["met"] is None and update["medrl"]["median"] == 0.25
    assert update["medrl"]["peak_rss_mib"] == 100.0 and update["peer"]["peak_rss_mib"] == 150.0
    assert "prompt not shared 2.500 s/step" in update["where_time_goes"]
    vllm = rows["grpo_vllm"]
    assert vllm["ratio"] is None and vllm["met"] is None and vllm["note"].startswith("grpo-medrl-vllm-r0 failed")
    probe = rows["probe_table"]
    assert probe["ratio"] == 8.0 and probe["met"] is False and "1.2x short" in probe["note"]
    assert "extraction 2.0 s" in probe["where_time_goes"] and "r / breast 12.0 s" in probe["where_time_goes"]
    results = {"rows": list(rows.values()), "sides": sides, "settings": settings, "fairness": {}, "started": "t",
               "command": "c", "mode": "full", "duration_s": 60, "code": "", "versions": {"torch": "x"},
               "hardware": {"cpus": 2}, "load_average": {"cpus": 2, "start": [1, 1, 1], "end": [1, 1, 1],
                                                         "one_minute_at_run_starts": {}}}  # fmt: skip
    markdown = render(results)
    assert "| GRPO step, vLLM engine | s/step | medrl, vllm engine: failed |" in markdown
    assert "**0.50** (0.17-1.50)" in markdown and "<= 0.7: met" in markdown and ">= 10: missed" in markdown


def test_the_benchmark_sizes_are_recorded_as_random_weights() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.sizes import model_dir
    from medrl.models.encoders import encoder_from_spec

    described = encoder_from_spec(f"vlm:{model_dir('tiny')}").describe()
    assert described["pretrained"] is False  # a probe row of a bench size must not claim pretrained weights


def test_the_vision_use_diagnostic_runs(capsys) -> None:
    # bench/sees.py: the measurements docs/reproducing.md quotes on why the letter lookup is out of reach.
    sys.path.insert(0, str(REPO))
    from bench.sees import lookup, question

    messages, gold, letters, image = question(random.Random(0), "shuffled")
    assert gold in letters and image.size == (28, 28) and "Options:" in messages[-1]["content"][-1]["text"]
    lookup("fixed", steps=2, layers=2, lr=3e-3, batch=2)
    assert "step 2: accuracy" in capsys.readouterr().out
