"""Bootstrap intervals: coverage on simulated binomials, paired differences, adjusted support."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medrl.metrics.intervals import Questions, bootstrap, interval, paired_change


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    true_rate, questions, runs = 0.3, 100, 200
    hits = 0
    for run in range(runs):
        right = (rng.random(questions) < true_rate).astype(float)
        found = bootstrap(lambda idx, right=right: float(right[idx].mean()), questions, seed=run)
        hits += found.lo <= true_rate <= found.hi
    assert 0.90 <= hits / runs <= 0.99, hits / runs  # binomial sd of the coverage over 200 runs: 0.015


def _rows(greedy: list[int], correct: list[int], n: int = 4, options: int = 2) -> list[dict]:
    return [{"id": f"q{i}", "greedy_correct": bool(g), "n": n, "correct": c, "options": options}
            for i, (g, c) in enumerate(zip(greedy, correct, strict=True))]  # fmt: skip


def test_paired_change_is_tighter_than_two_separate_intervals() -> None:
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 200)
    after = before.copy()
    flip = rng.choice(200, 30, replace=False)  # 30 questions set: 25 to right, 5 to wrong
    after[flip[:25]], after[flip[25:]] = 1, 0
    b, a = Questions.from_rows(_rows(before.tolist(), [2] * 200)), Questions.from_rows(_rows(after.tolist(), [2] * 200))
    change = paired_change(b, a, "acc@1")
    assert change.value == pytest.approx(after.mean() - before.mean())
    separate = interval(a, "acc@1").hi - interval(a, "acc@1").lo
    assert change.hi - change.lo < separate  # pairing removes the between-question spread
    same = paired_change(b, b, "acc@1")
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0) and same.spans_zero


def test_adjusted_support_interval_and_missing_option_counts() -> None:
    # 4 binary questions, every one passed by some of its 4 samples: pass@4 = 1, chance@4 = 15/16, adjusted 1.
    q = Questions.from_rows(_rows([1, 0, 1, 0], [2, 1, 3, 4]))
    assert interval(q, "pass@4").value == 1.0 and interval(q, "adj_pass@4").value == pytest.approx(1.0)
    # A coin's support: 1 right sample in 4 on each -> pass@1 = 1/4, chance 1/2, adjusted -1/2.
    coin = Questions.from_rows(_rows([0, 0], [1, 1]))
    assert interval(coin, "adj_pass@1").value == pytest.approx(-0.5)
    unknown = Questions.from_rows(_rows([1, 0], [1, 1], options=0))
    assert math.isnan(interval(unknown, "adj_pass@1").value)
    assert interval(unknown, "pass@1").text() == "0.250 [0.25, 0.25]"


def test_several_training_seeds_widen_the_interval_by_their_spread() -> None:
    rng = np.random.default_rng(3)
    seeds = [(rng.random(100) < rate).astype(int).tolist() for rate in (0.3, 0.6)]  # two runs that disagree
    sets = [Questions.from_rows(_rows(g, [2] * 100)) for g in seeds]
    both = interval(sets, "acc@1")
    assert both.value == pytest.approx(np.mean([np.mean(g) for g in seeds]))
    one = interval(sets[0], "acc@1")
    assert both.hi - both.lo > one.hi - one.lo  # the seed-to-seed spread is in the interval
    # Paired seed by seed: each run's after against its own before.
    after = [Questions.from_rows(_rows([1] * 100, [2] * 100)) for _ in seeds]
    change = paired_change(sets, after, "acc@1")
    assert change.value == pytest.approx(1 - both.value) and change.lo > 0
    with pytest.raises(ValueError, match="cannot pair"):
        paired_change(sets, after[:1], "acc@1")
