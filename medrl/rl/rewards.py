"""Rewards: plain functions over decoded completions, and the CARE consistency bonus.

A reward function takes ``completions`` (one string per sampled row) plus the dataset's columns as keyword
lists (``answer``, ``options``, ``prompt``, ...; one entry per row) and returns one float per row. The
built-ins are ``accuracy`` and ``format``; any other function is named by import path (``pkg.mod:fn`` or
``pkg.mod.fn``) and weighted in the GRPO config.

CARE (GRPO-CARE, Chen et al. 2025, as used by the study's authors): a reference model kept as an EMA of the
policy scores the answer tokens given the sampled reasoning; correct samples at or above their group's mean
accuracy whose reference confidence reaches the selected set's mean minus a margin earn a bonus of
``coefficient x accuracy``, added before group normalisation.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from medrl.metrics.answers import UNPARSEABLE, parse_answer, text_options

RewardFn = Callable[..., list[float]]

_CLOSED_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# One think block then one answer block and nothing else; the answer must say something. Tag counts are
# checked separately: a lazy `.*?` would otherwise swallow a second `</answer><answer>` pair.
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>\s*\S.*?</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _letters(options: dict[str, str] | None) -> str:
    return "".join(options) if options else "ABCD"


def accuracy_reward(
    completions: Sequence[str],
    answer: Sequence[str],
    options: Sequence[dict[str, str]] | None = None,
    answer_with: Sequence[str | None] | None = None,
    **_: object,
) -> list[float]:
    """1.0 when the last closed ``<answer>`` block names the gold option, else 0.0 (by letter; by the option's
    text too for rows asked with ``answer_with: text``).

    The letter is read by :func:`medrl.metrics.answers.parse_answer`; a completion without a closed answer
    block scores 0 (the evaluation's looser fallbacks would pay for letters scattered in the reasoning).

    >>> accuracy_reward(["<think>opaque</think><answer>B</answer>"], answer=["B"])
    [1.0]
    >>> accuracy_reward(["<answer>A</answer> no wait <answer>B</answer>"], answer=["A"])  # the last block counts
    [0.0]
    >>> accuracy_reward(["the answer is B"], answer=["B"])  # no answer block
    [0.0]
    >>> accuracy_reward(["<answer>E</answer>"], answer=["E"], options=[{"A": "x", "B": "y"}])  # not an option
    [0.0]
    >>> accuracy_reward(["<answer>y</answer>"] * 2, answer=["B"] * 2, options=[{"A": "x", "B": "y"}] * 2,
    ...                 answer_with=["text", "letter"])
    [1.0, 0.0]
    """
    options_rows = list(options) if options is not None else [None] * len(completions)
    styles = list(answer_with) if answer_with is not None else [None] * len(completions)
    if not (len(completions) == len(answer) == len(options_rows)):
        raise ValueError(
            f"accuracy_reward: {len(completions)} completions, {len(answer)} answers, {len(options_rows)} options"
        )
    out = []
    for text, gold, opts, style in zip(completions, answer, options_rows, styles, strict=True):
        letters = _letters(opts)
        if not _CLOSED_BLOCK.search(text):
            out.append(0.0)
            continue
        letter = parse_answer(text, letters, text_options({"options": opts, "answer_with": style}))
        out.append(float(letter != UNPARSEABLE and letter in letters and letter == str(gold).strip().upper()))
    return out


def format_reward(completions: Sequence[str], **_: object) -> list[float]:
    """1.0 for exactly ``<think>...</think>`` then ``<answer>...</answer>`` (non-empty) and nothing else.

    >>> format_reward(["<think>dense nuclei</think>\\n<answer>D</answer>"])
    [1.0]
    >>> format_reward(["<think>x</think><answer>A</answer><answer>B</answer>"])  # two answer blocks
    [0.0]
    >>> format_reward(["<think>x</think><answer>A</answer> because"])  # text after the answer
    [0.0]
    >>> format_reward(["<think>x</think><answer> </answer>"])  # empty answer
    [0.0]
    """
    out = []
    for text in completions:
        once = all(text.count(tag) == 1 for tag in _TAGS)
        out.append(float(once and _FORMAT.fullmatch(text) is not None))
    return out


def overlong_penalty(
    completions: Sequence[str],
    completion_length: Sequence[int],
    max_completion_length: Sequence[int],
    overlong_buffer: Sequence[int],
    **_: object,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to ``max - buffer`` tokens, then a linear ramp to
    -1 at ``max``. The step passes each row's token count and the run's limits as columns.

    >>> overlong_penalty(["", "", ""], [50, 90, 100], [100] * 3, [20] * 3)  # 90: (80 - 90) / 20
    [0.0, -0.5, -1.0]
    """
    out = []
    for length, limit, buffer in zip(completion_length, max_completion_length, overlong_buffer, strict=True):
        start = limit - buffer
        out.append(0.0 if length <= start or buffer <= 0 else max(-1.0, (start - length) / buffer))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "overlong": overlong_penalty,
}


def load_reward(name: str) -> RewardFn:
    """A built-in reward by name, or any function by import path (``pkg.mod:fn`` or ``pkg.mod.fn``).

    >>> load_reward("format") is format_reward
    True
    >>> load_reward("medrl.rl.rewards:accuracy_reward") is accuracy_reward
    True
    """
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"reward {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor an import path "
            "like 'my_pkg.rewards:length_penalty'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def score_completions(
    completions: Sequence[str], columns: dict[str, Sequence[object]], rewards: dict[str, RewardFn]
) -> dict[str, Tensor]:
    """Every reward function on every row: ``{name: [N] float}`` (unweighted).

    ``columns`` holds the dataset's fields, one entry per row. A function that returns the wrong number of
    values or a non-finite value fails here, naming itself, rather than poisoning the advantages.
    """
    out = {}
    for name, fn in rewards.items():
        values = list(fn(completions=list(completions), **columns))
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if v is None or not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"reward {name!r} returned a non-finite value for row {bad[0]}: {values[bad[0]]!r}")
        out[name] = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return out


def answer_token_span(pieces: Sequence[str]) -> tuple[int, int] | None:
    """Token range ``[start, end)`` covering the text inside the last closed ``<answer>`` block.

    ``pieces`` are the completion's tokens decoded one by one; the span is found in their concatenation,
    so it maps back to tokens exactly even where a tag is split across tokens. None when there is no
    non-empty closed block.

    >>> answer_token_span(["<think>", "x", "</think>", "<ans", "wer>", " B", "</answer>", "<eos>"])
    (5, 6)
    >>> answer_token_span(["<answer>", "</answer>"]) is None
    True
    """
    text = "".join(pieces)
    blocks = list(_CLOSED_BLOCK.finditer(text))
    if not blocks:
        return None
    block = blocks[-1]
    content = block.group(1)
    if not content.strip():
        return None
    lo = block.start(1) + (len(content) - len(content.lstrip()))
    hi = block.end(1) - (len(content) - len(content.rstrip()))
    start = end = None
    pos = 0
    for i, piece in enumerate(pieces):
        nxt = pos + len(piece)
        if start is None and nxt > lo:
            start = i
        if pos < hi:
            end = i + 1
        pos = nxt
    return (start, end) if start is not None and end is not None else None


def answer_mask(spans: Sequence[tuple[int, int] | None], length: int) -> Tensor:
    """``[N, L]`` bool mask from per-row token spans (rows without a span are all False)."""
    mask = torch.zeros(len(spans), length, dtype=torch.bool)
    for row, span in enumerate(spans):
        if span is not None:
            mask[row, span[0] : min(span[1], length)] = True
    return mask


def answer_confidence(ref_logprobs: Tensor, mask: Tensor, cap: float | None = 0.95) -> Tensor:
    """Reference confidence in each answer: ``exp(mean answer-token log-prob)``, capped. Shapes ``[N, L] -> [N]``.

    The cap stops near-certain answers from setting an unreachable bar for the rest of the group. Rows
    without answer tokens get 0.

    >>> lp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.99, 0.99, 0.1]]))
    >>> m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    >>> answer_confidence(lp, m).tolist()  # row 0: exp(mean(log .5, log .5)) = .5; row 1: .99 capped to .95
    [0.5, 0.949999988079071]
    """
    mask_f = mask.to(ref_logprobs.dtype)
    count = mask_f.sum(-1)
    mean_lp = (ref_logprobs * mask_f).sum(-1) / count.clamp(min=1)
    conf = torch.where(count > 0, mean_lp.exp(), torch.zeros_like(mean_lp))
    return conf.clamp(max=cap) if cap is not None else conf


def care_bonus(accuracy: Tensor, confidence: Tensor, coefficient: float = 0.5, margin: float = 0.01) -> Tensor:
    """The CARE consistency bonus per sample: ``[B, G]`` accuracy and confidence -> ``[B, G]`` bonus.

    In each group, the selected set is the correct samples at or above the group's mean accuracy; those whose
    confidence is at least the selected set's mean confidence minus ``margin`` earn ``coefficient x accuracy``.

    >>> acc = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    >>> conf = torch.tensor([[0.90, 0.50, 0.70, 0.95]])  # selected: the first three, mean confidence 0.70
    >>> care_bonus(acc, conf).tolist()  # 0.90 and 0.70 reach 0.70 - 0.01; 0.50 does not; the wrong one never
    [[0.5, 0.0, 0.5, 0.0]]
    """
    if accuracy.shape != confidence.shape or accuracy.dim() != 2:
        raise ValueError(f"care_bonus wants [B, G] tensors, got {tuple(accuracy.shape)} and {tuple(confidence.shape)}")
    selected = (accuracy > 0) & (accuracy >= accuracy.mean(-1, keepdim=True))
    sel_f = selected.to(confidence.dtype)
    mean_conf = (confidence * sel_f).sum(-1, keepdim=True) / sel_f.sum(-1, keepdim=True).clamp(min=1)
    earns = selected & (confidence >= mean_conf - margin)
    return torch.where(earns, coefficient * accuracy, torch.zeros_like(accuracy))
