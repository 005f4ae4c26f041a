"""Per-benchmark scores of an evaluation run and the table the paper reports.

Input: one result per item (the rows of ``items.jsonl`` written by ``medrl bench-eval``) with its
benchmark, whether the greedy answer was right (Acc@1) and, when samples were drawn, ``n`` and the number
correct ``c`` (Pass@k through the unbiased estimator). Each benchmark's score is the mean over its items;
the ``mean`` column is the unweighted mean over benchmarks, as in the paper. Columns follow the paper's
order: PMC, MMMU, MedX-M, PathVQA, SLAKE, VQA-RAD.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medrl.core.tables import markdown_table
from medrl.data.benchmarks import BENCHMARKS, benchmark_order
from medrl.metrics.answers import UNPARSEABLE
from medrl.metrics.pass_at_k import pass_at_k

# Published Acc@1 (%) on the same suite, for comparison rows: data, kept with the configs.
PUBLISHED_FILE = Path(__file__).resolve().parents[2] / "configs" / "published.json"


def published_rows() -> dict[str, dict[str, float]]:
    """Run name -> benchmark -> published Acc@1 (%), from ``configs/published.json``."""
    return json.loads(PUBLISHED_FILE.read_text())["rows"]


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metrics a run reports: ``acc@1``, then ``pass@k`` for each k."""
    return ["acc@1", *(f"pass@{k}" for k in sorted(set(ks)))]


def score(results: Iterable[Mapping[str, Any]], ks: Sequence[int] = (), mean_of_all: bool = False) -> dict[str, Any]:
    """Scores per benchmark and their mean over the paper's six (``mean_of_all``: over every benchmark).

    A benchmark outside the six (a ``dataset_name`` the suite does not know) is scored on its own but kept
    out of the mean, which would otherwise stop being comparable with the published six-benchmark means;
    ``outside_mean`` lists such benchmarks so the caller can say so.

    Args:
        results: per-item rows as :func:`medrl.evaluation.sample_and_score` makes them, plus ``benchmark``:
            ``greedy_correct`` (Acc@1), ``greedy`` (the parsed letter; ``unparseable`` is a format failure)
            and, for Pass@k, ``n`` samples of which ``correct`` were right.
        ks: the k of each Pass@k to report (each must be at most every item's ``n``).

    Returns:
        ``{"benchmarks": [...], "per_benchmark": {name: {"n_items", "acc@1", "pass@k"..., "format_failures"}},
        "mean": {metric: value}, "outside_mean": [...]}``; values are fractions in [0, 1].
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in results:
        groups.setdefault(str(row["benchmark"]), []).append(row)
    names = benchmark_order(groups)
    metrics = metric_names(ks)
    per: dict[str, dict[str, float]] = {}
    for name in names:
        rows = groups[name]
        entry: dict[str, float] = {
            "n_items": len(rows),
            "acc@1": sum(bool(r["greedy_correct"]) for r in rows) / len(rows),
            "format_failures": sum(r.get("greedy") == UNPARSEABLE for r in rows) / len(rows),
        }
        if ks:
            for k in sorted(set(ks)):
                entry[f"pass@{k}"] = sum(pass_at_k(int(r["n"]), int(r["correct"]), k) for r in rows) / len(rows)
        per[name] = entry
    averaged = names if mean_of_all else [b for b in names if b in BENCHMARKS]
    keys = [*metrics, "format_failures"]
    mean = {m: sum(per[b][m] for b in averaged) / len(averaged) if averaged else math.nan for m in keys}
    outside = [b for b in names if b not in averaged]
    return {"benchmarks": names, "per_benchmark": per, "mean": mean, "outside_mean": outside}


def table_rows(scores: Mapping[str, Mapping[str, Any]], published: bool = False) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the report: one row per (run, metric), one column per benchmark, then the mean.

    Args:
        scores: run name -> the output of :func:`score`.
        published: add the published Acc@1 rows (``configs/published.json``: the paper's model and its base).
    """
    names = benchmark_order(b for s in scores.values() for b in s["benchmarks"])
    counts = {
        b: next(s["per_benchmark"][b]["n_items"] for s in scores.values() if b in s["per_benchmark"]) for b in names
    }
    header = ["model", "metric", *(f"{b} (n={counts[b]})" for b in names), "mean"]
    rows = []
    for run, s in scores.items():
        metrics = [m for m in s["mean"] if m != "format_failures"]
        for metric in metrics:
            cells = [f"{100 * s['per_benchmark'][b][metric]:.2f}" if b in s["per_benchmark"] else "-" for b in names]
            value = s["mean"][metric]
            rows.append([run, metric, *cells, "-" if math.isnan(value) else f"{100 * value:.2f}"])
    if published:
        for run, values in published_rows().items():
            cells = [f"{values[b]:.2f}" if b in values else "-" for b in names]
            # The published mean is over the six benchmarks; over a subset it would not be comparable.
            mean = f"{sum(values.values()) / len(values):.2f}" if set(values) <= set(names) else "-"
            rows.append([run, "acc@1", *cells, mean])
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    return "\n".join(markdown_table(header, rows)) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    """The same table as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
