"""Pass@K, Acc@1 and the gap between them: the study's measure of support versus sampling efficiency.

``pass@k`` is the unbiased estimator of Chen et al. (2021): with ``n`` samples of which ``c`` are right,
the chance that a random ``k``-subset holds at least one right answer, ``1 - C(n-c, k) / C(n, k)``.
Acc@1 is the greedy completion's accuracy; ``G_k = pass@k - acc@1`` is what sampling finds that greedy
decoding misses. :class:`PassAtK` accumulates per-question counts across batches and processes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from medrl.metrics.answers import UNPARSEABLE, parse_answer
from medrl.metrics.chance import adjusted, chance_pass_at_k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, a product of numbers in [0, 1] that never forms
    the huge binomials, so it stays exact to rounding for any ``n``.

    >>> pass_at_k(4, 1, 2)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    >>> pass_at_k(16, 0, 8), pass_at_k(16, 9, 8), pass_at_k(16, 1, 16)
    (0.0, 1.0, 1.0)
    """
    _check(n, c, k)
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def _check(n: int, c: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"the correct count must be in [0, n={n}], got {c}")


def pass_at_k_tensor(n: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
    """Vectorised pass@k over questions: ``n``, ``c`` ``[Q]`` integer tensors -> ``[Q]`` float64.

    Uses ``log C(n-c,k) - log C(n,k)`` through ``lgamma`` and ``-expm1`` (accurate when the ratio is
    near 1); the edge cases ``c = 0`` (0) and ``n - c < k`` (1) are set exactly.
    """
    n64, c64 = n.to(torch.float64), c.to(torch.float64)
    if n.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if bool((n < k).any()):
        worst = int(n.min())
        raise ValueError(f"pass@{k} needs at least {k} samples per question; a question has n={worst}")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("every correct count must be in [0, n]")
    m = n64 - c64  # wrong samples
    log_ratio = (
        torch.lgamma(m + 1) + torch.lgamma(n64 - k + 1) - torch.lgamma((m - k).clamp(min=0) + 1) - torch.lgamma(n64 + 1)
    )
    out = -torch.expm1(log_ratio)
    out = torch.where(m < k, torch.ones_like(out), out)
    return torch.where(c == 0, torch.zeros_like(out), out)


@dataclass
class QuestionScore:
    """One question's parsed samples.

    Attributes:
        gold: the gold letter.
        answers: ``[n]`` parsed letters of the samples (``unparseable`` on a format failure).
        correct: how many samples are right.
        greedy: parsed letter of the greedy completion, None when there was none.
        majority: the most frequent parsed answer (ties: the first reached), ``unparseable`` if none parsed.
        unique: number of distinct parsed answers (format failures not counted).
        format_failures: samples with no parseable answer.
        num_options: how many options the question offered (0: unknown); sets its chance level.
    """

    gold: str
    answers: list[str]
    correct: int
    greedy: str | None
    majority: str
    unique: int
    format_failures: int
    num_options: int = 0

    @property
    def n(self) -> int:
        return len(self.answers)

    @property
    def greedy_correct(self) -> bool | None:
        return None if self.greedy is None else self.greedy == self.gold

    def to_dict(self) -> dict:
        """JSON-ready fields, plus ``n`` and ``greedy_correct``."""
        return {**asdict(self), "n": self.n, "greedy_correct": self.greedy_correct}


def score_question(
    samples: Sequence[str],
    gold: str,
    letters: str = "ABCD",
    greedy: str | None = None,
    options: Mapping[str, str] | None = None,
) -> QuestionScore:
    """Parse a question's sampled completions (and greedy one) with :func:`parse_answer` and count
    (``options``: the texts an answer may name its option by, see :func:`~medrl.metrics.answers.text_options`).

    >>> s = score_question(["<answer>A</answer>", "<answer>B</answer>", "no idea", "B"], "B", greedy="A")
    >>> s.correct, s.majority, s.unique, s.format_failures, s.greedy_correct
    (2, 'B', 2, 1, False)
    """
    gold = gold.upper()
    answers = [parse_answer(t, letters, options) for t in samples]
    parsed = [a for a in answers if a != UNPARSEABLE]
    counts = Counter(parsed)
    majority = max(counts, key=lambda a: (counts[a], -parsed.index(a))) if counts else UNPARSEABLE
    return QuestionScore(
        gold=gold,
        answers=answers,
        correct=sum(a == gold for a in answers),
        greedy=None if greedy is None else parse_answer(greedy, letters, options),
        majority=majority,
        unique=len(counts),
        format_failures=len(answers) - len(parsed),
        num_options=len(letters),
    )


class PassAtK(Metric):
    """Acc@1, Pass@k for several k, the gaps, majority vote, format failures and answer diversity.

    ``update`` takes :class:`QuestionScore` objects (see :func:`score_question`); per-question counts are
    kept and concatenated across processes on ``compute``, so every rank reports the global values as
    long as each question is scored on exactly one rank.

    ``compute`` returns ``acc@1`` (greedy; NaN when no greedy completions were scored), ``pass@k`` and
    ``gap@k`` (pass@k - acc@1) for each k not above the smallest n, ``majority`` (majority-vote accuracy),
    ``format_fail`` (share of samples without a parseable answer), ``unique`` (mean distinct answers per
    question) and ``questions``. When every question says how many options it offered, also ``chance@k`` (what
    answering a uniformly random offered letter scores, :func:`medrl.metrics.chance.chance_pass_at_k`, with
    ``chance@1`` the chance Acc@1) and ``adj_pass@k`` / ``adj_acc@1``, the excess over chance
    ``(x - chance) / (1 - chance)``.

    Args:
        ks: the k values to report.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        self.ks = sorted(set(int(k) for k in ks))
        # Per question: sample count, correct count, format failures, distinct answers, greedy right (1/0,
        # NaN when there was no greedy completion), majority vote right (1/0).
        for name in ("n", "correct", "failures", "unique", "greedy", "majority", "options"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: Sequence[QuestionScore]) -> None:
        """Add scored questions (an empty list is fine: a rank may hold no question of some group)."""
        if not scores:
            return
        if any(s.n == 0 for s in scores):
            raise ValueError("a question has no samples; pass@k needs n >= 1")
        # Every state in the metric's float dtype: a rank without data syncs an empty tensor of that dtype,
        # and gloo aborts on mixed dtypes. Counts stay exact in float32 up to 2**24.
        columns = {
            "n": [s.n for s in scores],
            "correct": [s.correct for s in scores],
            "failures": [s.format_failures for s in scores],
            "unique": [s.unique for s in scores],
            "greedy": [math.nan if s.greedy is None else float(s.greedy == s.gold) for s in scores],
            "majority": [float(s.majority == s.gold) for s in scores],
            "options": [s.num_options for s in scores],
        }
        for name, values in columns.items():
            getattr(self, name).append(torch.tensor(values, dtype=self.dtype, device=self.device))

    def compute(self) -> dict[str, float]:
        """The summary over every question seen (on every process)."""
        n, c, greedy = _cat(self.n).long(), _cat(self.correct).long(), _cat(self.greedy).double()
        if n.numel() == 0:
            return {"questions": 0.0}
        out: dict[str, float] = {"questions": float(n.numel())}
        acc1 = float(greedy.mean()) if not bool(greedy.isnan().any()) else math.nan
        out["acc@1"] = acc1
        for k in self.ks:
            if k <= int(n.min()):
                out[f"pass@{k}"] = float(pass_at_k_tensor(n, c, k).mean())
                out[f"gap@{k}"] = out[f"pass@{k}"] - acc1
        options = _cat(self.options).long()
        if bool((options >= 2).all()):
            # chance@1 is also the chance Acc@1; every reported value gets its excess over chance.
            for k in sorted({1, *(k for k in self.ks if f"pass@{k}" in out)}):
                out[f"chance@{k}"] = chance_pass_at_k(options.tolist(), k)
            for name in ["acc@1", *(f"pass@{k}" for k in self.ks if f"pass@{k}" in out)]:
                out[f"adj_{name}"] = adjusted(out[name], out[f"chance@{name.split('@')[1]}"])
        out["majority"] = float(_cat(self.majority).double().mean())
        out["format_fail"] = float(_cat(self.failures).double().sum() / n.sum())
        out["unique"] = float(_cat(self.unique).double().mean())
        return out


def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list state as one CPU tensor (after a sync it is already one; before any update it is empty)."""
    if isinstance(state, list) and not state:
        return torch.zeros(0)
    return dim_zero_cat(state).cpu()
