"""Weighted mixtures: which source each global sample comes from, and the source's own order.

`MixtureSchedule` turns the weights into integer counts per period P (exact
for weights such as 0.5/0.3/0.2, else within 1/MAX_PERIOD of them) and lays
one period out by smooth weighted round-robin: at each slot every source
gains its count, and the source furthest ahead is picked and pays back P. So
every prefix of the schedule holds each source's share to within one sample,
and so does every window of consecutive samples up to one more (no coin
flips whose drift grows with the run). Sample g is read at slot
(g + offset) mod P, the offset drawn from the seed, which makes the source of
sample g, and its index in that source's own stream, a pure function of
(seed, g) that costs O(1).

`MixtureDataset` has the interface of `TokenDataset` (trainer/data.py): each
source keeps its own windows, permuted per epoch under its own seed, and
starts its next epoch on its own when it runs out. The loader's state stays
the number of samples consumed.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

MAX_PERIOD = 100_000


def integer_counts(weights: Sequence[float]) -> list[int]:
    """Slots per period of each weight: proportional, summing to the period, zero only for zero."""
    total = float(sum(weights))
    shares = [Fraction(w / total).limit_denominator(1000) for w in weights]
    period = math.lcm(*(s.denominator for s in shares))
    if sum(shares) == 1 and period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    raw = [w / total * MAX_PERIOD for w in weights]
    counts = [max(1, math.floor(r)) if w > 0 else 0 for r, w in zip(raw, weights)]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: MAX_PERIOD - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSchedule:
    """Global sample index -> (source, index in that source's stream)."""

    def __init__(self, weights: Sequence[float], seed: int):
        self.counts = integer_counts(weights)
        self.period = sum(self.counts)
        self.slots = np.empty(self.period, dtype=np.int32)  # source of each slot
        self.rank = np.empty(self.period, dtype=np.int64)  # earlier slots of the same source
        credit, seen = [0] * len(self.counts), [0] * len(self.counts)
        for slot in range(self.period):
            credit = [c + n for c, n in zip(credit, self.counts)]
            source = max(range(len(credit)), key=lambda s: (credit[s], -s))  # ties: the first
            credit[source] -= self.period
            self.slots[slot], self.rank[slot] = source, seen[source]
            seen[source] += 1
        self.offset = int(np.random.default_rng([seed, 0x6D6978]).integers(self.period))
        self.base = self._before(self.offset)

    def _before(self, m: int) -> np.ndarray:
        """Samples of each source in slots [0, m) of the endless schedule."""
        whole, part = divmod(m, self.period)
        return whole * np.asarray(self.counts, dtype=np.int64) + np.bincount(
            self.slots[:part], minlength=len(self.counts))

    def locate(self, g: int) -> tuple[int, int]:
        whole, slot = divmod(g + self.offset, self.period)
        source = int(self.slots[slot])
        return source, whole * self.counts[source] + int(self.rank[slot]) - int(self.base[source])

    def consumed(self, n: int) -> list[int]:
        """Samples of each source among global samples [0, n)."""
        return (self._before(n + self.offset) - self.base).tolist()


class MixtureDataset:
    """Several token datasets read in the schedule's proportions; windows as in TokenDataset."""

    def __init__(self, names: list[str], weights: list[float], sources: list, seed: int):
        self.names, self.sources = names, sources
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.trained = [i for i, w in enumerate(weights) if w > 0]  # weight 0: evaluated only
        self.schedule = MixtureSchedule([weights[i] for i in self.trained], seed)

    def train_source(self, g: int) -> tuple[int, int]:
        position, index = self.schedule.locate(g)
        return self.trained[position], index

    def train_sample(self, g: int) -> np.ndarray:
        if g < 0:
            raise IndexError(f"global sample index {g} is negative")
        source, index = self.train_source(g)
        return self.sources[source].train_sample(index)

    def eval_sources(self) -> list[tuple[Optional[str], float, object]]:
        return list(zip(self.names, self.shares, self.sources))

    def samples_by_source(self, n: int) -> dict[str, int]:
        counts = dict.fromkeys(self.names, 0)
        for position, count in enumerate(self.schedule.consumed(n)):
            counts[self.names[self.trained[position]]] = count
        return counts
