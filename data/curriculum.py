"""Which bucket each optimizer step of an epoch draws from: the length curriculum of `packer: buckets`.

The epoch's steps of every bucket are split into `cycles` near-equal parts; cycle c orders its part of
every bucket:

  short_to_long  the shortest bucket's steps first, then the next longer, ..., the longest last
  weighted       each step draws a bucket with probability proportional to (its steps in the cycle) x
                 (its weight), among the buckets with steps left in the cycle -- the sampling of the
                 paper's open_lm patch (RandomMix over buckets, an exhausted bucket leaves the mix)
  grow           `weighted` with the paper's Grow-P2 odds: weight 2^(B-1-i) for bucket i of B, shortest
                 first (1 for the longest), so short rows dominate the start of every cycle and the long
                 ones its end

Every step of the epoch is scheduled exactly once whatever the curriculum, so every piece is used once
per epoch; the draws are deterministic from the generator.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Curriculum = Literal["grow", "short_to_long", "weighted"]


def grow_odds(num_buckets: int) -> list[float]:
    """Grow-P2 odds, shortest bucket first: 2^(B-1), ..., 2, 1."""
    return [float(2 ** (num_buckets - 1 - i)) for i in range(num_buckets)]


def cycle_parts(counts: Sequence[int], cycles: int) -> np.ndarray:
    """[cycles, buckets]: bucket i's `counts[i]` steps split into `cycles` parts differing by at most one."""
    counts = np.asarray(counts, dtype=np.int64)
    bounds = counts[None, :] * np.arange(cycles + 1)[:, None] // cycles
    return np.diff(bounds, axis=0)


def _sample(part: np.ndarray, odds: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Buckets drawn one step at a time with fixed probabilities part_i x odds_i, each until its part is used."""
    left = [int(x) for x in part]
    mass = [float(p) * float(o) for p, o in zip(part, odds)]
    draws = rng.random(int(part.sum())).tolist()
    out = np.empty(len(draws), dtype=np.int64)
    for t, u in enumerate(draws):  # a Python loop over steps: a few microseconds each, a handful of buckets
        live = [m if n else 0.0 for m, n in zip(mass, left)]
        x, acc, pick = u * sum(live), 0.0, len(live) - 1
        for i, m in enumerate(live):
            acc += m
            if m and x < acc:
                pick = i
                break
        while not left[pick]:  # rounding at the top end: take the last bucket with steps left
            pick -= 1
        out[t] = pick
        left[pick] -= 1
    return out


def schedule(counts: Sequence[int], curriculum: Curriculum, cycles: int, rng: np.random.Generator,
             weights: Sequence[float] | None = None) -> np.ndarray:
    """The bucket (0 = shortest) of every step of one epoch, given each bucket's number of steps."""
    parts = cycle_parts(counts, cycles)
    if curriculum == "short_to_long":
        return np.concatenate([np.repeat(np.arange(len(counts)), part) for part in parts])
    odds = grow_odds(len(counts)) if curriculum == "grow" else list(weights or [])
    if len(odds) != len(counts) or min(odds, default=1.0) <= 0:
        raise ValueError(f"curriculum {curriculum!r} needs one positive weight per bucket ({len(counts)}), got {odds}")
    return np.concatenate([_sample(part, odds, rng) for part in parts])
