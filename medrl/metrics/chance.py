"""Chance levels of multiple-choice support, and support measured above chance.

A model that answers a uniformly random offered letter on every sample passes a question with ``m`` options
within ``k`` samples with probability ``1 - (1 - 1/m)^k``: 0.50, 0.75, 0.94 and 0.996 at k = 1, 2, 4, 8 on a
2-option question, 0.90 at k = 8 even with 4 options. Raw Pass@k on few-option questions therefore says
little; the excess over chance, ``(pass@k - chance@k) / (1 - chance@k)``, is 0 for guessing and 1 for
always passing (negative: below guessing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def chance_pass_at_k(options: Sequence[int], k: int) -> float:
    """Mean over questions of ``1 - (1 - 1/m)^k``, each question with its own option count ``m``.

    >>> round(chance_pass_at_k([2], 8), 4), round(chance_pass_at_k([2, 4], 1), 3)
    (0.9961, 0.375)
    """
    if not options:
        return math.nan
    if any(m < 2 for m in options):
        raise ValueError(f"every question needs 2+ options for a chance level, got {sorted(set(options))}")
    return sum(1 - (1 - 1 / m) ** k for m in options) / len(options)


def adjusted(value: float, chance: float) -> float:
    """``(value - chance) / (1 - chance)``: 0 at chance, 1 at certainty; NaN where chance is already 1.

    >>> adjusted(0.75, 0.5), adjusted(0.5, 0.5), round(adjusted(0.97, 0.9961), 2)
    (0.5, 0.0, -6.69)
    """
    if math.isnan(value) or math.isnan(chance) or chance >= 1:
        return math.nan
    return (value - chance) / (1 - chance)


# The highest chance level a support measurement may sit on: above it, guessing alone passes most questions
# and "support above chance" divides by almost nothing (binary questions at k = 4: chance 0.9375).
MAX_CHANCE = 0.75


def room_k(options: int, ks: Sequence[int], max_chance: float = MAX_CHANCE) -> int:
    """The largest ``k`` of ``ks`` at which a question with ``options`` options has chance ``<= max_chance``
    (the smallest ``k`` when none does): the k that leaves support room above guessing.

    >>> room_k(2, [1, 2, 4, 8, 16]), room_k(4, [1, 2, 4, 8, 16]), room_k(8, [1, 2, 4, 8, 16])
    (2, 4, 8)
    """
    if options < 2:
        raise ValueError(f"a question needs 2+ options for a chance level, got {options}")
    fits = [k for k in sorted(ks) if 1 - (1 - 1 / options) ** k <= max_chance + 1e-12]
    return fits[-1] if fits else min(ks)
