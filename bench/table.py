"""Rows of the benchmark table from the sides' measurements: medians, min-max, ratios, targets and notes.

Every row pairs a medrl side with what it is compared against. A ratio's spread is the worst case the
min-max ranges allow (the smallest numerator over the largest denominator, and the reverse), so it is wide
on a loaded machine rather than falsely tight.
"""

from __future__ import annotations

import statistics
from typing import Any

LABELS = {  # by side name (the part of a side's key after the comparison)
    "medrl-hf": "medrl, hf engine",
    "medrl-hf-unshared": "medrl, hf engine, prompt not shared",
    "medrl-vllm": "medrl, vllm engine",
    "trl": "TRL GRPOTrainer (its vLLM off)",
    "hf": "medrl hf engine",
    "vllm": "medrl vllm engine",
    "per-sample": "one generate call per sample",
    "cached": "probe-table, features extracted once",
    "reextract": "one probe run per head, each re-extracting",
}
NOT_SECONDS = ("step", "completion_tokens_mean")  # recorded per step beside the stages, not part of their sum
TIME_RATIO = "medrl / TRL seconds per step (lower is better)"
LARGE = ("20m", "100m")  # sizes where fixed costs no longer dominate: the vLLM targets hold there
SPEED_UP = "speed-up: the other side's seconds / medrl's seconds"


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count of ``values`` (empty when there are none)."""
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def side_stats(sides: dict[str, Any], key: str, values: list[float] | None = None) -> dict[str, Any] | None:
    """A side's label, statistics (of its ``seconds`` or of ``values``) and peak memory; None if it did not run."""
    if key not in sides:
        return None
    side = sides[key]
    summary = stats(side["seconds"] if values is None else values)
    if "failed" in side:
        summary["failed"] = side["failed"].splitlines()[0]
    return {"side": key, "label": LABELS[key.split("/")[1]], **summary, "peak_rss_mib": side["peak_rss_mib"]}


def _ratio(num: dict | None, den: dict | None) -> tuple[float | None, list[float] | None]:
    if not num or "median" not in num or not den or not den.get("median") or not den.get("min"):
        return None, None
    return num["median"] / den["median"], [num["min"] / den["max"], num["max"] / den["min"]]


def verdict(ratio: float | None, target: str | None) -> tuple[bool | None, str]:
    """Whether ``ratio`` meets ``target`` (``"<= 1"``, ``">= 4"``), and by how much it misses when it does not."""
    if ratio is None or target is None:
        return None, ""
    op, value = target.split()
    goal = float(value)
    if op == "<=":
        if ratio <= goal:
            return True, ""
        return False, f"misses the target by {100 * (ratio / goal - 1):.0f}% ({ratio:.2f} vs <= {goal:g})"
    if ratio >= goal:
        return True, ""
    return False, f"misses the target: {ratio:.1f}x vs >= {goal:g}x ({goal / ratio:.1f}x short)"


def make_row(
    key: str,
    comparison: str,
    metric: str,
    medrl: dict | None,
    peer: dict | None,
    definition: str,
    target: str | None = None,
) -> dict[str, Any]:
    """One row; the ratio is medrl/peer for time ratios and peer/medrl for speed-ups and throughput."""
    speed_up = definition == SPEED_UP
    ratio, spread = _ratio(peer, medrl) if speed_up else _ratio(medrl, peer)
    met, note = verdict(ratio, target)
    missing = [name for name, side in (("the medrl side", medrl), ("the other side", peer)) if side is None]
    if missing:
        note = f"not run: {' and '.join(missing)} (vLLM sides run only with --vllm)"
    if failed := [side["failed"] for side in (medrl, peer) if side and "failed" in side]:
        note = "; ".join(failed) + " (its log is in results.json under sides)"
    return {
        "key": key,
        "comparison": comparison,
        "metric": metric,
        "medrl": medrl,
        "peer": peer,
        "ratio": ratio,
        "ratio_spread": spread,
        "ratio_definition": definition,
        "target": target,
        "met": met,
        "note": note,
    }


def stage_medians(sides: dict[str, Any], key: str) -> dict[str, float]:
    """Median seconds per stage name over every timed step of a GRPO side."""
    steps = [step for run in sides.get(key, {}).get("runs", []) for step in run["result"].get("stages", [])]
    names = list(dict.fromkeys(name for step in steps for name in step))
    return {name: statistics.median(step.get(name, 0.0) for step in steps) for name in names}


def grpo_time(sides: dict[str, Any], medrl_key: str, against: tuple[str, str] = ("grpo/trl", "TRL")) -> str:
    """Median seconds per stage of the medrl side and of the side it is compared with (TRL unless ``against``
    names another), and the part of each step no stage covers."""
    parts = []
    for key, who in ((medrl_key, "medrl"), against):
        stages = {k: v for k, v in stage_medians(sides, key).items() if k not in NOT_SECONDS}
        step = (side_stats(sides, key) or {}).get("median")
        if not stages or step is None:
            continue
        if key == "grpo/trl":
            # TRL's blocks nest (generation and rewards inside _prepare_inputs, log-probs inside compute_loss):
            # only the two outer ones are subtracted; the rest is mostly backward and the optimizer step.
            rest = step - stages.get("_prepare_inputs", 0.0) - stages.get("compute_loss", 0.0)
        else:
            rest = step - sum(stages.values())
        cells = ", ".join(f"{name} {value:.3f}" for name, value in stages.items())
        parts.append(f"{who} {step:.3f} s/step: {cells}; outside these {rest:.3f}")
    return "; ".join(parts)


def sampling_work(sides: dict[str, Any], medrl: str, peer: str) -> str:
    """New tokens, tokens per second and CPU seconds of both sides: equal work, and where it went."""
    parts = []
    for key in (peer, medrl):
        runs = sides.get(key, {}).get("runs", [])
        if not runs:
            continue
        passes = [run["result"].get("pass_at_k", run["result"]) for run in runs]
        seconds = statistics.median(v for p in passes for v in p["seconds"])
        tokens = statistics.median(v for p in passes for v in p["tokens"])
        cpu = statistics.median(v for p in passes for v in p["cpu_s"])
        text = (
            f"{LABELS[key.split('/')[1]]}: {tokens:.0f} new tokens, {tokens / seconds:,.0f} tokens/s, {cpu:.1f} CPU s"
        )
        if "start_s" in runs[0]["result"]:
            text += f" (engine start {runs[0]['result']['start_s']:.1f} s, not timed)"
        parts.append(text)
    return "; ".join(parts)


def throughput(sides: dict[str, Any], key: str, size: int) -> dict[str, Any] | None:
    """New tokens per second of an engine side at ``size`` questions per call, per repeat."""
    if key not in sides:
        return None
    values = []
    for run in sides[key]["runs"]:  # none when the side failed
        entry = run["result"]["throughput"][str(size)]
        values += [t / s for t, s in zip(entry["tokens"], entry["seconds"], strict=True)]
    side = side_stats(sides, key, values)
    assert side is not None
    side["label"] = side["label"].removeprefix("medrl ")
    return side


def build_rows(sides: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row for the comparisons in ``settings``; a side that did not run leaves its cells empty."""
    rows: list[dict[str, Any]] = []
    sized = any(s.get("size") in LARGE for s in settings.values())  # the 20m and 100m targets
    if "grpo" in settings:
        for engine, target in (("hf", "<= 0.5" if sized else "<= 0.7"), ("vllm", "<= 0.45" if sized else None)):
            medrl = f"grpo/medrl-{engine}"
            row = make_row(
                f"grpo_{engine}",
                f"GRPO step, {'HF' if engine == 'hf' else 'vLLM'} engine",
                "s/step",
                side_stats(sides, medrl),
                side_stats(sides, "grpo/trl"),
                TIME_RATIO,
                target,
            )
            row["where_time_goes"] = grpo_time(sides, medrl)
            rows.append(row)
        rows.append(_update_row(sides, ">= 2" if sized else None))
    if "sampling" in settings:
        s = settings["sampling"]
        for engine in ("hf", "vllm"):
            medrl, peer = f"sampling/{engine}", "sampling/per-sample"
            metric = f"s for {s['questions']} questions x K={s['k']}"
            name = f"Pass@K sampling, {'HF' if engine == 'hf' else 'vLLM'} engine"
            row = make_row(f"pass_at_k_{engine}", name, metric, side_stats(sides, medrl), side_stats(sides, peer),
                           SPEED_UP, ">= 10")  # fmt: skip
            row["where_time_goes"] = sampling_work(sides, medrl, peer)
            rows.append(row)
        for size in s["batch_sizes"]:
            hf, vllm = throughput(sides, "sampling/hf", size), throughput(sides, "sampling/vllm", size)
            definition = "vllm tokens/s / hf tokens/s (above 1: vllm faster)"
            k = s.get("throughput_k") or s["k"]
            name = f"Engine throughput, {size} question{'s' if size > 1 else ''} per call, K={k}"
            rows.append(make_row(f"throughput_{size}", name, "new tokens/s", vllm, hf, definition,
                                 ">= 1.1" if sized else None))  # fmt: skip
    if "probe" in settings:
        rows.append(_probe_row(sides, settings["probe"]))
    return rows


def stage_values(sides: dict[str, Any], key: str, name: str) -> list[float]:
    """Every timed step's seconds in stage ``name`` of a GRPO side."""
    steps = [step for run in sides.get(key, {}).get("runs", []) for step in run["result"].get("stages", [])]
    return [step[name] for step in steps if name in step]


def _update_row(sides: dict[str, Any], target: str | None) -> dict[str, Any]:
    """The update stage alone, each prompt forwarded once per group against once per completion."""
    shared, unshared = "grpo/medrl-hf", "grpo/medrl-hf-unshared"
    row = make_row("grpo_update_shared", "GRPO update stage, prompt shared vs not", "s/update",
                   side_stats(sides, shared, stage_values(sides, shared, "update")),
                   side_stats(sides, unshared, stage_values(sides, unshared, "update")),
                   SPEED_UP, target)  # fmt: skip
    row["where_time_goes"] = grpo_time(sides, shared, (unshared, "prompt not shared"))
    return row


def _probe_row(sides: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    fast, slow = side_stats(sides, "probe/cached"), side_stats(sides, "probe/reextract")
    cells = len(p["encoders"]) * len(p["flags"])
    name = f"Probe table, {len(p['encoders'])} encoders x {len(p['flags'])} flags, {p['heads']} heads per cell"
    row = make_row("probe_table", name, f"s end to end, {cells * p['heads']} heads", fast, slow, SPEED_UP, ">= 10")
    fast_runs = sides.get("probe/cached", {}).get("runs", [])
    slow_runs = sides.get("probe/reextract", {}).get("runs", [])
    if fast_runs and slow_runs:
        f, s = fast_runs[0]["result"], slow_runs[0]["result"]
        per_run = ", ".join(f"{cell} {sec:.1f} s" for cell, sec in s["run_seconds"].items())
        row["where_time_goes"] = (
            f"medrl: extraction {f['extract_s']:.1f} s once per cell, {f['rows']} heads {f['heads_s']:.1f} s "
            f"(fit and test scoring), tables and the chart the rest; the authors' way: {p['heads']} runs per cell, "
            f"each as long as the one timed ({per_run})"
        )
    return row
