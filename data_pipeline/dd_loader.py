"""The dataset-decomposition loader: each step is one bucket, ``tokens_per_step / 2^i`` sequences of 2^i tokens.

Per epoch: bucket i's pieces are shuffled (seed, epoch, i); bucket i yields ``q_i = n_i // B_i`` batches of
``B_i = tokens_per_step / 2^i`` pieces (the remainder waits for another epoch's shuffle); the curriculum orders
those batches (curriculum.py). The k-th draw of bucket i in an epoch takes shuffled pieces [k·B_i, (k+1)·B_i);
dp and cp ranks then take their slices (sharding.py). Labels: the piece shifted left by one, last label -100.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .curriculum import CURRICULA, epoch_schedule
from .decompose import load_or_build_buckets
from .shards import TokenStore
from .sharding import check_layout, check_rank, cp_batch, rank_rows
from .stateful import StatefulLoader


class DDLoader(StatefulLoader):
    """Batches: ``input_ids``, ``labels`` (b, 2^i / cp_size) int64 with b = tokens_per_step / 2^i / dp_size;
    ``seq_len`` (2^i, the full length), ``bucket`` (i), ``position_offset`` (cp_rank · 2^i / cp_size, the global
    position of column 0), ``starts`` (b,) global token offsets of the rows' sequences, ``epoch``, ``step``."""

    kind = "dd"

    def __init__(self, store: TokenStore, tokens_per_step: int, min_log2: int = 8, max_log2: int = 13,
                 curriculum: str = "grow_p2", cycles: int = 8, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1):
        if curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {curriculum!r}; choose one of {CURRICULA}")
        if not 0 <= min_log2 <= max_log2 <= 40:
            raise ValueError(f"need 0 <= min_log2 ({min_log2}) <= max_log2 ({max_log2})")
        check_layout(tokens_per_step, 1 << max_log2, dp_size, cp_size, "2^max_log2")
        check_layout(tokens_per_step, 1 << min_log2, dp_size, cp_size, "2^min_log2")
        check_rank(dp_rank, dp_size, "dp")
        check_rank(cp_rank, cp_size, "cp")
        self.store = store
        self.tokens_per_step = tokens_per_step
        self.min_log2, self.max_log2 = min_log2, max_log2
        self.curriculum, self.cycles, self.seed = curriculum, cycles, seed
        self.dp_rank, self.dp_size, self.cp_rank, self.cp_size = dp_rank, dp_size, cp_rank, cp_size
        self.config = {"tokens_per_step": tokens_per_step, "min_log2": min_log2, "max_log2": max_log2,
                       "curriculum": curriculum, "cycles": cycles, "seed": seed,
                       "documents_sha256": store.documents_sha256}
        self.log2s = list(range(min_log2, max_log2 + 1))
        self.buckets = load_or_build_buckets(store.dir, store.documents, store.documents_sha256, min_log2, max_log2)
        self.batch_sizes = [tokens_per_step >> i for i in self.log2s]  # global sequences per step
        self.quotas = [len(self.buckets[i]) // b for i, b in zip(self.log2s, self.batch_sizes)]
        if sum(self.quotas) == 0:
            sizes = ", ".join(f"2^{i}: {len(self.buckets[i])} pieces / {b} per step"
                              for i, b in zip(self.log2s, self.batch_sizes))
            raise ValueError(f"corpus in {store.dir} is too small for one step of {tokens_per_step} tokens in any "
                             f"bucket ({sizes}); use a smaller tokens_per_step or a bigger corpus")
        self._init_position()

    def _start_epoch(self, epoch: int) -> int:
        self.schedule = epoch_schedule(self.quotas, self.curriculum, self.cycles, self.seed, epoch)  # (steps,)
        # draw[s]: how many times bucket schedule[s] was drawn before step s in this epoch
        self.draw = np.zeros(len(self.schedule), np.int64)
        for j in range(len(self.log2s)):
            at = np.flatnonzero(self.schedule == j)
            self.draw[at] = np.arange(len(at))
        self._perms: dict[int, np.ndarray] = {}
        self._perm_epoch = epoch
        return len(self.schedule)

    def _perm(self, i: int) -> np.ndarray:
        if i not in self._perms:
            rng = np.random.default_rng([self.seed, self._perm_epoch, 1, i])
            self._perms[i] = rng.permutation(len(self.buckets[i]))
        return self._perms[i]

    def _make_batch(self, step: int) -> dict[str, Any]:
        j = int(self.schedule[step])
        i, b = self.log2s[j], self.batch_sizes[j]
        k = int(self.draw[step])
        rows = rank_rows(self._perm(i)[k * b:(k + 1) * b], self.dp_rank, self.dp_size)
        starts = np.asarray(self.buckets[i])[rows]
        batch = cp_batch(self.store, starts, 1 << i, self.cp_rank, self.cp_size, has_next=False)
        batch.update(seq_len=1 << i, bucket=i, position_offset=self.cp_rank * ((1 << i) // self.cp_size),
                     starts=torch.from_numpy(starts.astype(np.int64)))
        return batch

    def bucket_steps(self) -> dict[int, int]:
        """Steps per epoch that each bucket 2^i contributes: {i: q_i}."""
        return dict(zip(self.log2s, self.quotas))
