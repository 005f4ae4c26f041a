"""``bench/results.md``: the benchmark results document rendered as markdown tables and notes."""

from __future__ import annotations

import statistics
from typing import Any

from bench.by_size import render_flops


def _num(value: float, metric: str) -> str:
    return f"{value:,.0f}" if "tokens/s" in metric else f"{value:.3g}"


def _cell(side: dict[str, Any] | None, metric: str) -> str:
    if not side:
        return "not run"
    if "median" not in side:
        return f"{side['label']}: failed"
    spread = f"{_num(side['min'], metric)}-{_num(side['max'], metric)}"
    return f"{side['label']}: **{_num(side['median'], metric)}** ({spread}, n={side['n']})"


def _ratio(row: dict[str, Any]) -> str:
    if row["ratio"] is None:
        return "-"
    low, high = row["ratio_spread"]
    return f"**{row['ratio']:.2f}** ({low:.2f}-{high:.2f})"


def _verdict(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "-"
    if row["met"] is None:
        return f"{row['target']}: not measured"
    return f"{row['target']}: {'met' if row['met'] else 'missed'}"


def _memory(row: dict[str, Any]) -> str:
    medrl, peer = (f"{side['peak_rss_mib']:,.0f}" if side else "-" for side in (row["medrl"], row["peer"]))
    return f"{medrl} / {peer}"


def render(results: dict[str, Any]) -> str:
    """The whole markdown document for ``results`` (see ``bench/run.py``)."""
    load, hw = results["load_average"], results["hardware"]
    at_runs = load["one_minute_at_run_starts"]
    lines = [
        "# medrl benchmarks",
        "",
        f"Measured {results['started']} UTC with `{results['command']}` ({results['mode']} mode, "
        f"{results['duration_s'] / 60:.0f} min), code `{results['code'] or 'unknown'}`.",
        "",
        f"**Machine load.** Load average (1, 5, 15 min) {_triple(load['start'])} at the start and "
        f"{_triple(load['end'])} at the end, on {load['cpus']} CPUs; the 1-minute load when each side's run "
        f"started: median {at_runs.get('median', 0):.1f}, min {at_runs.get('min', 0):.1f}, max "
        f"{at_runs.get('max', 0):.1f}. A load above the CPU count means other work shared the cores: every "
        "timing is then slower and noisier than on a quiet machine, and ratios move less than raw times.",
        "",
        f"**Hardware.** {hw.get('cpu', hw.get('machine'))}, {hw.get('cpus')} CPUs, {hw.get('memory_gib', '?')} GiB, "
        f"GPUs: {', '.join(hw.get('gpus') or []) or 'none'}; Python {hw.get('python')}.",
        "",
        "**Versions.** " + ", ".join(f"{name} {version}" for name, version in results["versions"].items()) + ".",
        "",
        "Medians with (min-max, number of measurements); the ratio's spread is the worst case those ranges allow. "
        "Peak RSS is each side's largest resident memory, its process tree included.",
        "",
        "| comparison | metric | medrl | compared with | ratio (spread) | ratio is | target "
        "| peak RSS MiB, medrl / other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['comparison']} | {row['metric']} | {_cell(row['medrl'], row['metric'])} | "
            f"{_cell(row['peer'], row['metric'])} | {_ratio(row)} | {row['ratio_definition']} | {_verdict(row)} | "
            f"{_memory(row)} |"
        )
    notes = [row for row in results["rows"] if row["note"] or row.get("where_time_goes")]
    if notes:
        lines += ["", "## Misses and where the time goes", ""]
        for row in notes:
            text = "; ".join(part for part in (row["note"], row.get("where_time_goes", "")) if part)
            lines.append(f"- **{row['comparison']}**: {text}.")
    lines += render_flops(results.get("flops", []))
    lines += ["", "## How the sides were made comparable", ""]
    lines += [f"- **{kind}**: {text}." for kind, text in results["fairness"].items()]
    lines += ["", "## Every side run", "", "| side | round | timed median s | process wall s (CPU s) | peak RSS MiB "
              "(largest process / tree, sampled) | 1-min load at start |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, side in results["sides"].items():
        for i, run in enumerate(side["runs"]):
            median = statistics.median(run["result"]["seconds"])
            lines.append(
                f"| {key} | {i + 1} | {median:.3g} | {run['wall_s']:.0f} ({run['cpu_s']:.0f}) | "
                f"{run['peak_rss_mib']:,.0f} / {run['tree_peak_rss_mib']:,.0f} | {run['load_before'][0]:.1f} |"
            )
    lines += ["", "Settings: `" + _compact(results["settings"]) + "`.", ""]
    return "\n".join(lines)


def _triple(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _compact(settings: dict[str, Any]) -> str:
    return "; ".join(f"{kind} " + ", ".join(f"{k}={v}" for k, v in s.items()) for kind, s in settings.items())
