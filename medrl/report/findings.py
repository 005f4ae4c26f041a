"""The paper's findings, each tested on a run's numbers: supported, contradicted, or can't tell.

Each finding is one paired before/after change on the same questions, with its 95 % bootstrap interval
(:mod:`medrl.metrics.intervals`), pooled over the run's modalities:

1. *RL raises Acc@1 when support is high*: Acc@1 from the SFT model to SFT then RL.
2. *RL on weak support gains little and can lower Pass@k*: support above chance (Pass@k) from the base
   model to RL from the base.
3. *SFT raises Pass@k and makes later RL effective*: support above chance from the base model to SFT, and
   finding 1 holding after it.

A change whose interval lies above zero (below, for finding 2) supports the finding; one on the other side
contradicts it; an interval that sits wholly inside +-delta (the plan's ``delta``, 0.05 by default) finds no
effect larger than delta; any other interval that spans zero can't tell. Each finding states its interval's
half-width, the precision the run had (and, where it reads support, the half-width of the same change's
Acc@1, the quantity the plan's power is set for). Flags that ran on a synthetic stand-in are left out of the pooled
findings: a verdict on synthetic data is no verdict. The sentences are computed, never written by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from medrl.metrics.intervals import Interval, Questions, paired_change
from medrl.report.figures import model_label
from medrl.report.load import RunResults

Verdict = Literal["supports", "contradicts", "no effect", "can't tell"]
DELTA = 0.05  # the default equivalence margin: a change within +-DELTA is "no effect"
# (after, before, name) of each paired change the report tables.
CHANGES = (("sft", "base", "SFT"), ("rl_base", "base", "RL from base"), ("rl_sft", "sft", "SFT then RL"))


@dataclass(frozen=True)
class Finding:
    """One finding of the paper and what this run says of it."""

    claim: str
    verdict: Verdict
    evidence: str
    half_width: float = float("nan")
    delta: float = DELTA
    why: str = ""  # why the verdict is "can't tell" when the interval alone would say otherwise
    acc_half_width: float = float("nan")  # the pooled Acc@1 change's, where the finding reads another metric

    def sentence(self) -> str:
        """``**claim**: this run supports it: evidence (half-width h).``"""
        spans = f"the interval spans zero and reaches beyond +-{self.delta:g}"
        said = {
            "supports": "this run supports it",
            "contradicts": "this run contradicts it",
            "no effect": f"this run finds no effect larger than +-{self.delta:g} (the whole interval lies within it)",
            "can't tell": f"this run can't tell ({self.why or spans})",
        }
        width = "" if np.isnan(self.half_width) else f"; interval half-width {self.half_width:.3f}"
        if not np.isnan(self.acc_half_width):
            width += f" (the Acc@1 change's: {self.acc_half_width:.3f})"
        return f"**{self.claim}**: {said[self.verdict]}; {self.evidence}{width}."  # fmt: skip


def support_metric(results: RunResults, k: int | str) -> str:
    """``adj_pass@k`` (support above chance) when the run measured chance levels, else ``pass@k``; with
    ``k="room"`` each question is read at its flag's k with room above chance (``adj_pass@room``)."""
    measured = [s for by_flag in results.evals.values() for s in by_flag.values()]
    if k == "room":
        return "adj_pass@room" if measured and all("chance@1" in s["metrics"]["all"] for s in measured) else "pass@room"
    if measured and all(f"chance@{k}" in s["metrics"]["all"] for s in measured):
        return f"adj_pass@{k}"
    return f"pass@{k}"


def metric_name(metric: str) -> str:
    """How a metric reads in a sentence."""
    k = metric.split("@")[1] if "@" in metric else ""
    if k == "room":
        at = "Pass@k at each flag's k with room above chance: 2 for 2 options, 4 for 4"
        return f"support above chance ({at})" if metric.startswith("adj_") else at
    return (
        f"support above chance (Pass@{k})"
        if metric.startswith("adj_")
        else metric.replace("acc@1", "Acc@1").replace("pass@", "Pass@")
    )


def pooled(results: RunResults, stage: str, flags: list[str] | None = None) -> list[Questions]:
    """A stage's models over ``flags`` (default: all) as one question set per training seed (ids made unique
    per flag); a seed counts only where every flag has it."""
    per_flag = []
    for flag in flags or results.flags:
        sets = results.question_sets(model_label(stage, flag), flag)
        if not sets:
            return []
        per_flag.append((flag, sets))
    seeds = min(len(sets) for _, sets in per_flag)
    return [Questions.concat([(flag, sets[s]) for flag, sets in per_flag]) for s in range(seeds)]


def change(
    results: RunResults, after: str, before: str, metric: str, flags: list[str] | None = None
) -> tuple[Interval, int] | None:
    """The paired change of ``metric`` from stage ``before`` to ``after`` (pooled over ``flags``; over the
    training seeds, each after-model against its own seed's before-model, or the one base), with the number
    of questions it is over; None when either side was not evaluated."""
    a, b = pooled(results, after, flags), pooled(results, before, flags)
    if not a or not b:
        return None
    if len(b) > 1:
        a, b = a[: len(b)], b[: len(a)]
    shared = set(a[0].ids) & set(b[0].ids)
    return paired_change(b if len(b) > 1 else b[0], a, metric), len(shared)


def verdict(found: Interval, expected: Literal["up", "down"], delta: float = DELTA) -> Verdict:
    """Which side of zero the interval lies on, read against the expected direction; an interval inside
    +-``delta`` is "no effect".

    >>> verdict(Interval(0.01, -0.02, 0.04), "up"), verdict(Interval(0.01, -0.08, 0.1), "up")
    ('no effect', "can't tell")
    """
    if np.isnan(found.value):
        return "can't tell"
    if -delta <= found.lo and found.hi <= delta and found.spans_zero:
        return "no effect"
    if found.spans_zero:
        return "can't tell"
    up = found.lo > 0
    return "supports" if up == (expected == "up") else "contradicts"


def _half(found: Interval) -> float:
    return (found.hi - found.lo) / 2


def findings(results: RunResults, k: int | str, flags: list[str] | None = None, delta: float = DELTA) -> list[Finding]:
    """The three findings (those the run has the models for), pooled over ``flags`` (default: every flag that
    ran on real data), each with its verdict against the equivalence margin ``delta``."""
    flags = flags or [f for f in results.flags if f not in results.stand_in_flags]
    if not flags:
        return []
    support = support_metric(results, k)
    where = f"over {len(flags or results.flags)} modalit{'y' if len(flags or results.flags) == 1 else 'ies'}"
    seeds = len(pooled(results, "sft", flags))
    where += f", {seeds} training seeds" if seeds > 1 else ""

    def evidence(found: Interval, n: int, metric: str, what: str) -> str:
        return f"{what} changed {metric_name(metric)} by {found.text(signed=True)} ({where}, {n} questions)"

    out = []
    rl_after_sft = change(results, "rl_sft", "sft", "acc@1", flags)
    if rl_after_sft is not None:
        found, n = rl_after_sft
        out.append(Finding("RL raises Acc@1 when support is high", verdict(found, "up", delta),
                           evidence(found, n, "acc@1", "RL from the SFT model"), _half(found), delta))  # fmt: skip
    rl_from_base = change(results, "rl_base", "base", support, flags)
    if rl_from_base is not None:
        found, n = rl_from_base
        acc = change(results, "rl_base", "base", "acc@1", flags)
        extra = f", and Acc@1 by {acc[0].text(signed=True)}" if acc is not None else ""
        said = evidence(found, n, support, "RL from the base model") + extra
        acc_half = _half(acc[0]) if acc is not None else float("nan")
        out.append(Finding("RL on weak support gains little and can lower Pass@k", verdict(found, "down", delta),
                           said, _half(found), delta, acc_half_width=acc_half))  # fmt: skip
    sft = change(results, "sft", "base", support, flags)
    if sft is not None:
        found, n = sft
        said, why = verdict(found, "up", delta), ""
        if said == "supports" and out and out[0].verdict != "supports":
            said, why = "can't tell", "support rose, but the RL after it did not reliably help"
        tail = f"; RL after it: {out[0].verdict}" if out and rl_after_sft is not None else ""
        sft_acc = change(results, "sft", "base", "acc@1", flags)
        acc_half = _half(sft_acc[0]) if sft_acc is not None else float("nan")
        if sft_acc is not None:
            tail = f", and Acc@1 by {sft_acc[0].text(signed=True)}" + tail
        out.append(Finding("SFT raises Pass@k and makes later RL effective", said,
                           evidence(found, n, support, "SFT") + tail, _half(found), delta, why, acc_half))  # fmt: skip
    return out
