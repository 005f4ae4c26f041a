"""Seeds derived from a tuple of integers, so a step's randomness is a pure function of where it is."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def derive_seed(entropy: Iterable[int], bits: int = 30) -> int:
    """A seed in ``[0, 2**bits)`` mixed from ``entropy`` (e.g. ``(seed, epoch, batch, rank)``) by NumPy's
    ``SeedSequence``: nearby tuples give unrelated seeds, and the same tuple always gives the same one.

    30 bits by default because vLLM adds the sample index to a request's seed and must stay in int32.

    >>> derive_seed([0, 1]) == derive_seed([0, 1]) != derive_seed([0, 2])
    True
    >>> 0 <= derive_seed([7], bits=8) < 256
    True
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    word = int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])
    return word & ((1 << bits) - 1)
