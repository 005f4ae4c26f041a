"""The support-boundary sweep: RL's change in Acc@1 and in support against the support it started from.

A *rung* is one starting model and the GRPO run from it: the base model (no SFT), SFT at each of the plan's
``boundary_sft_steps``, and the full SFT run. Every rung of a modality is measured on the same validation
questions, so each change is a paired bootstrap, and so is the comparison of the top rung's Acc@1 gain with
the bottom rung's (the boundary finding). The data's tau is the lowest starting support from which every
rung at or above it gains Acc@1 reliably (interval above zero); it is compared with the recipe's tau.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medrl.metrics.intervals import Interval, Questions, bootstrap, interval, paired_change
from medrl.report.findings import DELTA, Finding, verdict
from medrl.report.load import RunResults


@dataclass(frozen=True)
class Rung:
    """One starting point of the sweep on one modality."""

    name: str
    sft_steps: int | None  # None: the full SFT run
    start: str  # model label before RL
    after: str  # model label after RL


@dataclass(frozen=True)
class RungResult:
    """What RL did from one rung (pooled rungs carry the same name over several modalities)."""

    rung: Rung
    support: Interval  # starting support (above chance when measured)
    acc_change: Interval
    support_change: Interval
    questions: int


def rungs(results: RunResults, flag: str) -> list[Rung]:
    """The rungs of ``flag`` that the run has both models of, from no SFT to the full SFT run."""
    steps = sorted(int(s) for s in results.plan.get("boundary_sft_steps") or [])
    ladder = [Rung("base", 0, "base", f"rl_base_{flag}")]
    ladder += [Rung(f"SFT {s} steps", s, f"boundary-sft{s}_{flag}", f"boundary-rl{s}_{flag}") for s in steps]
    ladder.append(Rung("full SFT", None, f"sft_{flag}", f"rl_sft_{flag}"))
    return [
        r for r in ladder if flag in results.questions.get(r.start, {}) and flag in results.questions.get(r.after, {})
    ]


def _pool(results: RunResults, flags: list[str], pick) -> Questions | None:
    """The questions of the model ``pick(flag)`` names on each flag, pooled; None if one was not evaluated."""
    parts = [(flag, results.question_set(pick(flag), flag)) for flag in flags]
    return None if any(q is None for _, q in parts) else Questions.concat(parts)


def sweep(results: RunResults, flags: list[str], support: str) -> list[RungResult]:
    """Each rung's starting support and RL's changes, pooled over ``flags`` (a rung counts only where every
    flag has it)."""
    by_flag = {flag: {r.name: r for r in rungs(results, flag)} for flag in flags}
    names = [r.name for r in rungs(results, flags[0])] if flags else []
    out = []
    for name in names:
        if not all(name in by_flag[f] for f in flags):
            continue
        before = _pool(results, flags, lambda f, name=name: by_flag[f][name].start)
        after = _pool(results, flags, lambda f, name=name: by_flag[f][name].after)
        if before is None or after is None:
            continue
        out.append(RungResult(by_flag[flags[0]][name], interval(before, support), paired_change(before, after, "acc@1"),
                              paired_change(before, after, support), len(before.ids)))  # fmt: skip
    return out


def estimated_tau(results: list[RungResult]) -> float | None:
    """The lowest starting support from which RL's Acc@1 gain is reliably positive on every rung at or above
    it; None when even the top rung's gain is not."""
    ordered = sorted(results, key=lambda r: r.support.value)
    tau = None
    for r in reversed(ordered):
        if r.acc_change.lo > 0:
            tau = r.support.value
        else:
            break
    return tau


def boundary_finding(results: RunResults, flags: list[str], delta: float = DELTA) -> Finding | None:
    """*RL helps most when the model already has non-trivial support*: RL's Acc@1 gain from the highest-support
    rung minus its gain from the lowest, one paired bootstrap over the shared questions."""
    ladders = [rungs(results, f) for f in flags]
    if not ladders or any(len(ladder) < 2 for ladder in ladders):
        return None
    ends = {f: (ladder[0], ladder[-1]) for f, ladder in zip(flags, ladders, strict=True)}
    pools = [_pool(results, flags, lambda f, end=end, side=side: getattr(ends[f][end], side))
             for end in (0, 1) for side in ("start", "after")]  # fmt: skip
    if any(p is None for p in pools):
        return None
    low_before, low_after, top_before, top_after = pools
    common = sorted(set.intersection(*(set(p.ids) for p in pools)))
    arrays = [p.greedy[[p.ids.index(i) for i in common]] for p in pools]
    if not common or any(np.isnan(a).any() for a in arrays):
        return None
    lb, la, tb, ta = arrays
    found = bootstrap(lambda idx: float(ta[idx].mean() - tb[idx].mean() - (la[idx].mean() - lb[idx].mean())),
                      len(common))  # fmt: skip
    where = f"{len(flags)} modalit{'y' if len(flags) == 1 else 'ies'}, {len(common)} questions"
    return Finding(
        "RL helps most when the model already has non-trivial support",
        verdict(found, "up", delta),
        f"RL's Acc@1 gain from the highest-support start minus its gain from the base is {found.text(signed=True)} "
        f"({where})",
        (found.hi - found.lo) / 2,
        delta,
    )


def plot(sweep_results: list[RungResult], title: str, tau: float | None, configured_tau: float | None) -> bytes:
    """RL's change in Acc@1 and in support (with 95 % intervals) against the starting support."""
    import io
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    sweep_results = sorted(sweep_results, key=lambda r: r.support.value)  # a line from low to high support
    xs = [r.support.value for r in sweep_results]
    for attr, label, colour, shift in (("acc_change", "change in Acc@1", "C0", -0.004),
                                       ("support_change", "change in support", "C1", 0.004)):  # fmt: skip
        ivs = [getattr(r, attr) for r in sweep_results]
        ys = [iv.value for iv in ivs]
        err = [[y - iv.lo for y, iv in zip(ys, ivs, strict=True)], [iv.hi - y for y, iv in zip(ys, ivs, strict=True)]]
        ax.errorbar([x + shift for x in xs], ys, yerr=err, fmt="o-", color=colour, capsize=3, label=label)
    for i, r in enumerate(sweep_results):  # alternate above and below: neighbouring rungs sit close together
        ax.annotate(r.rung.name, (r.support.value, r.acc_change.value), fontsize=6, rotation=30,
                    xytext=(2, 8 if i % 2 == 0 else -14), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="k", linewidth=0.8)
    if configured_tau is not None:
        ax.axvline(configured_tau, color="grey", linestyle="--", label=f"recipe tau {configured_tau:g}")
    if tau is not None:
        ax.axvline(tau, color="C2", linestyle=":", label=f"data's tau {tau:.2f}")
    ax.set_xlabel("starting support (Pass@k above chance)")
    ax.set_ylabel("change after RL")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def fmt_tau(tau: float | None) -> str:
    """The data's tau in words."""
    return (
        "not reached (no rung's RL gain in Acc@1 is reliably positive from there up)"
        if tau is None or math.isnan(tau)
        else f"{tau:.3f}"
    )
