"""The one rule for taking part of a data set: a seeded random subset, the reference's."""

from __future__ import annotations

import random

# The reference shuffles its labelled set with this seed before taking the first N samples.
SUBSET_SEED = 42


def seeded_subset(count: int, max_samples: int | None, seed: int = SUBSET_SEED) -> list[int]:
    """Indices of a random subset of max_samples of count items (all of them, in order, when
    max_samples is None or not smaller), the same for the same seed; ascending. The subset is
    the reference's: it runs ``random.seed(seed); random.shuffle(records)`` and takes the
    first max_samples, and a shuffle's order depends only on the list's length."""
    if max_samples is None or max_samples >= count:
        return list(range(count))
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:max_samples])
