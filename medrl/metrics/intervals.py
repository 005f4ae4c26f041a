"""95 % intervals for Acc@1, Pass@k and support above chance, by the bootstrap over questions.

Every statistic here is a function of per-question arrays (greedy right or not, the unbiased pass@k of the
question, its chance level), so one resampling of question indices serves them all. A before/after change
on the same questions is bootstrapped *paired*: the same resampled questions on both sides, which removes
the between-question variance a difference of two separate intervals would carry. Percentile intervals,
2,000 resamples, a fixed seed: the same run gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medrl.metrics.chance import adjusted, room_k
from medrl.metrics.pass_at_k import pass_at_k

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval."""

    value: float
    lo: float
    hi: float

    @property
    def spans_zero(self) -> bool:
        """Whether the interval includes 0 (a difference that may be no difference)."""
        return self.lo <= 0 <= self.hi

    def text(self, digits: int = 3, signed: bool = False) -> str:
        """``0.734 [0.66, 0.80]`` (``+0.05 [-0.02, 0.12]`` when signed)."""
        if math.isnan(self.value):
            return "n/a"
        sign = "+" if signed else ""
        return f"{self.value:{sign}.{digits}f} [{self.lo:{sign}.2f}, {self.hi:{sign}.2f}]"


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> Interval:
    """``statistic(indices)`` on all ``n`` questions, and its percentile interval over resampled indices."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    draws = draws[~np.isnan(draws)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail]) if draws.size else (math.nan, math.nan)
    return Interval(float(statistic(np.arange(n))), float(lo), float(hi))


def _option_count(row: Mapping[str, Any]) -> int:
    """A row's option count: ``num_options``, else the size of its ``options`` (0 when unknown)."""
    if row.get("num_options"):
        return int(row["num_options"])
    options = row.get("options")
    return len(options) if isinstance(options, Mapping | list) else int(options or 0)


@dataclass(frozen=True)
class Questions:
    """Per-question arrays of one evaluation, from its ``questions.jsonl`` rows."""

    ids: list[str]
    greedy: np.ndarray  # 1.0 right, 0.0 wrong, NaN no greedy
    n: np.ndarray
    correct: np.ndarray
    options: np.ndarray  # 0 where unknown
    swapped: np.ndarray | None = None  # greedy right with another question's image (the ablation), NaN if not run

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> Questions:
        """The arrays of rows as :func:`medrl.evaluation.write_outputs` writes them."""
        greedy = [math.nan if r.get("greedy_correct") is None else float(r["greedy_correct"]) for r in rows]
        swapped = [math.nan if r.get("greedy_correct_swapped") is None else float(r["greedy_correct_swapped"])
                   for r in rows]  # fmt: skip
        return cls(
            ids=[str(r["id"]) for r in rows],
            greedy=np.array(greedy, dtype=float),
            n=np.array([int(r["n"]) for r in rows]),
            correct=np.array([int(r["correct"]) for r in rows]),
            options=np.array([_option_count(r) for r in rows]),
            swapped=np.array(swapped, dtype=float),
        )

    def _swapped(self) -> np.ndarray:
        return self.swapped if self.swapped is not None else np.full(len(self.ids), math.nan)

    @classmethod
    def concat(cls, parts: Sequence[tuple[str, Questions]]) -> Questions:
        """``(prefix, set)`` pairs as one set, each id made ``prefix/id`` (pooling modalities)."""
        return cls(
            ids=[f"{prefix}/{i}" for prefix, q in parts for i in q.ids],
            **{f: np.concatenate([getattr(q, f) for _, q in parts]) for f in ("greedy", "n", "correct", "options")},
            swapped=np.concatenate([q._swapped() for _, q in parts]),
        )

    def pass_at(self, k: int) -> np.ndarray:
        """The unbiased pass@k of each question."""
        return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(self.n, self.correct, strict=True)])

    def chance_at(self, k: int) -> np.ndarray:
        """Each question's chance of passing within k random letters (NaN where the option count is unknown)."""
        m = self.options.astype(float)
        return np.where(m >= 2, 1 - (1 - 1 / np.maximum(m, 1)) ** k, math.nan)

    def room_ks(self) -> np.ndarray:
        """Each question's k with room above chance (:func:`medrl.metrics.chance.room_k` over the powers of two
        up to its sample count): 2 for a 2-option question, 4 for 4 options."""
        ks = [[1 << i for i in range(int(n).bit_length()) if 1 << i <= n] or [1] for n in self.n]
        return np.array([room_k(int(m), k) if m >= 2 else min(k) for m, k in zip(self.options, ks, strict=True)])

    def values(self, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(per-question values, per-question chance or None)`` for ``acc@1``, ``pass@k``, ``adj_acc@1`` or
        ``adj_pass@k``; ``pass@room`` takes each question at its own :meth:`room_ks` k."""
        raw = metric.removeprefix("adj_")
        if raw == "pass@room":
            ks = self.room_ks()
            values = np.array(
                [pass_at_k(int(n), int(c), int(k)) for n, c, k in zip(self.n, self.correct, ks, strict=True)]
            )
            m = self.options.astype(float)
            chance = np.where(m >= 2, 1 - (1 - 1 / np.maximum(m, 1)) ** ks, math.nan)
            return values, (chance if metric.startswith("adj_") else None)
        k = 1 if raw == "acc@1" else int(raw.split("@")[1])
        values = self.greedy if raw == "acc@1" else self.pass_at(k)
        return values, (self.chance_at(k) if metric.startswith("adj_") else None)


def _mean_statistic(values: np.ndarray, chance: np.ndarray | None) -> Callable[[np.ndarray], float]:
    def statistic(idx: np.ndarray) -> float:
        v = float(np.mean(values[idx]))
        return v if chance is None else adjusted(v, float(np.mean(chance[idx])))

    return statistic


def _seeded_bootstrap(stats: Sequence[Callable[[np.ndarray], float]], n: int, seed: int) -> Interval:
    """One statistic per training seed, each a function of question indices: the mean over seeds, with a
    two-level bootstrap (seeds with replacement, then questions) when there are several, so the interval
    holds training noise as well as question sampling. One seed: the plain question bootstrap."""
    if len(stats) == 1:
        return bootstrap(stats[0], n, seed=seed)
    rng = np.random.default_rng([seed, len(stats)])

    def resampled(idx: np.ndarray) -> float:
        return float(np.mean([stats[s](idx) for s in rng.integers(0, len(stats), len(stats))]))

    found = bootstrap(resampled, n, seed=seed)  # its own point estimate resamples seeds too: replaced below
    return Interval(float(np.mean([f(np.arange(n)) for f in stats])), found.lo, found.hi)


def _aligned(sets: Sequence[Questions]) -> list[Questions] | None:
    """The sets reordered to the ids they all share (training seeds are scored on the same questions)."""
    common = sorted(set.intersection(*(set(q.ids) for q in sets)))
    if not common:
        return None
    out = []
    for q in sets:
        pos = {i: j for j, i in enumerate(q.ids)}
        idx = np.array([pos[i] for i in common])
        out.append(Questions(common, q.greedy[idx], q.n[idx], q.correct[idx], q.options[idx], q._swapped()[idx]))
    return out


def interval(questions: Questions | Sequence[Questions], metric: str, seed: int = 0) -> Interval:
    """The metric over the questions (``acc@1``, ``pass@k``, ``adj_acc@1``, ``adj_pass@k``) with its interval;
    a list of question sets (one per training seed) gives the mean over seeds and an interval over both."""
    sets = _aligned([questions] if isinstance(questions, Questions) else list(questions))
    if not sets:
        return Interval(math.nan, math.nan, math.nan)
    stats = []
    for q in sets:
        values, chance = q.values(metric)
        if np.isnan(values).any() or (chance is not None and np.isnan(chance).any()):
            return Interval(math.nan, math.nan, math.nan)
        stats.append(_mean_statistic(values, chance))
    return _seeded_bootstrap(stats, len(sets[0].ids), seed)


def paired_change(
    before: Questions | Sequence[Questions], after: Questions | Sequence[Questions], metric: str, seed: int = 0
) -> Interval:
    """``after - before`` of a metric on the questions both evaluated, with its paired interval. Lists pair
    seed by seed (``before[s]`` with ``after[s]``); a single ``before`` pairs with every ``after``."""
    afters = [after] if isinstance(after, Questions) else list(after)
    befores = [before] * len(afters) if isinstance(before, Questions) else list(before)
    if len(befores) != len(afters) or not afters:
        raise ValueError(f"{len(befores)} before-sets cannot pair with {len(afters)} after-sets")
    sets = _aligned([*befores, *afters])
    if not sets:
        return Interval(math.nan, math.nan, math.nan)
    stats = []
    for b, a in zip(sets[: len(befores)], sets[len(befores) :], strict=True):
        (b_values, b_chance), (a_values, a_chance) = b.values(metric), a.values(metric)
        if np.isnan(b_values).any() or np.isnan(a_values).any():
            return Interval(math.nan, math.nan, math.nan)
        b_stat, a_stat = _mean_statistic(b_values, b_chance), _mean_statistic(a_values, a_chance)
        stats.append(lambda idx, a_stat=a_stat, b_stat=b_stat: a_stat(idx) - b_stat(idx))
    return _seeded_bootstrap(stats, len(sets[0].ids), seed)


def image_reliance(questions: Questions | Sequence[Questions], seed: int = 0) -> Interval:
    """Acc@1 with each question's own image minus Acc@1 with another question's (the image-ablation control),
    with its paired interval: the same resampled questions on both sides. NaN when the ablation was not run
    on every question; a list of sets (training seeds) as in :func:`interval`.

    >>> q = Questions(["a", "b"], np.array([1.0, 1.0]), np.array([1, 1]), np.array([1, 1]), np.array([2, 2]),
    ...               np.array([0.0, 1.0]))
    >>> image_reliance(q).value
    0.5
    """
    sets = _aligned([questions] if isinstance(questions, Questions) else list(questions))
    if not sets:
        return Interval(math.nan, math.nan, math.nan)
    stats = []
    for q in sets:
        diff = q.greedy - q._swapped()
        if np.isnan(diff).any():
            return Interval(math.nan, math.nan, math.nan)
        stats.append(_mean_statistic(diff, None))
    return _seeded_bootstrap(stats, len(sets[0].ids), seed)


def reliance_sentence(metrics: dict[str, float], delta: float = 0.05) -> str:
    """What the ablation says of a model, in words: ``answers depend on the image: +0.31 [+0.25, +0.37]``.

    Above zero (the interval's low end): it reads the image. Spanning zero within +-``delta``: it answers
    without reading it. Spanning zero more widely: too few questions to tell.

    >>> reliance_sentence({"image_reliance": 0.31, "image_reliance_lo": 0.25, "image_reliance_hi": 0.37})
    'answers depend on the image: +0.310 [+0.25, +0.37]'
    >>> reliance_sentence({"image_reliance": 0.0, "image_reliance_lo": -0.01, "image_reliance_hi": 0.02})
    'answers without reading the image: +0.000 [-0.01, +0.02]'
    """
    if "image_reliance" not in metrics or math.isnan(metrics["image_reliance"]):
        return "image reliance not measured"
    found = Interval(metrics["image_reliance"], metrics["image_reliance_lo"], metrics["image_reliance_hi"])
    text = found.text(signed=True)
    if found.lo > 0:
        return f"answers depend on the image: {text}"
    if found.hi < 0:
        return f"answers better with another question's image than its own: {text}"
    if -delta <= found.lo and found.hi <= delta:
        return f"answers without reading the image: {text}"
    return f"can't tell whether the answers depend on the image (too few questions): {text}"
