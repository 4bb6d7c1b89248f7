"""The variable-sequence-length curriculum: which bucket each step of an epoch draws.

Bucket j (j = 0 for the shortest, n buckets) has q_j batches in an epoch. Its quota is spread over c cycles:
cycle k gets ``q_j // c`` batches, plus one for the first ``q_j mod c`` cycles. Within a cycle, each step draws
bucket j with probability ``w_j / sum(w over buckets with quota left)``, without replacement of the cycle's quota,
so a bucket whose quota is used up drops out. Odds w_j:

- ``uniform``:     1 for every bucket
- ``grow_p2``:     2^(n-1-j), i.e. 32:16:8:4:2:1 for six buckets (short first)
- ``grow_linear``: n - j, i.e. 6:5:4:3:2:1

The schedule is a pure function of (quotas, curriculum, cycles, seed, epoch): every data-parallel rank computes
the same one, which is how all ranks draw the same bucket at each step without communicating.
"""

from __future__ import annotations

import numpy as np

CURRICULA = ("uniform", "grow_p2", "grow_linear")


def curriculum_odds(curriculum: str, n: int) -> np.ndarray:
    """Odds for n buckets, shortest first: (n,) float64."""
    if curriculum == "uniform":
        return np.ones(n)
    if curriculum == "grow_p2":
        return 2.0 ** np.arange(n - 1, -1, -1)
    if curriculum == "grow_linear":
        return np.arange(n, 0, -1, dtype=np.float64)
    raise ValueError(f"unknown curriculum {curriculum!r}; choose one of {CURRICULA}")


def epoch_schedule(quotas: list[int], curriculum: str, cycles: int, seed: int, epoch: int) -> np.ndarray:
    """Bucket positions (0 = shortest) for every step of one epoch: (sum(quotas),) int64.

    quotas: batches per bucket in the epoch, shortest bucket first.
    """
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    quotas = np.asarray(quotas, dtype=np.int64)
    odds = curriculum_odds(curriculum, len(quotas))
    rng = np.random.default_rng([seed, epoch, 0x5C4ED])
    steps: list[int] = []
    for k in range(cycles):
        left = quotas // cycles + (k < quotas % cycles)
        for _ in range(int(left.sum())):
            w = odds * (left > 0)
            j = int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))
            if j >= len(w) or left[j] == 0:  # float edge at the top of the cumsum
                j = int(np.flatnonzero(left)[-1])
            left[j] -= 1
            steps.append(j)
    return np.asarray(steps, dtype=np.int64)
