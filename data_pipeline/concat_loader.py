"""The concat-and-chunk baseline: documents packed end to end, cut into fixed ``seq_len`` windows.

Window w covers stream tokens [w·L, w·L + L] (L+1 tokens: the input and, shifted by one, its labels), so
windows cross document boundaries (the EOS tokens separate them) and every label is a real next token. There are
``(num_tokens - 1) // L`` windows; each epoch shuffles them (seed, epoch) and takes ``tokens_per_step / L`` per
step, the remainder waiting for another epoch's shuffle. The stream is the training documents only: where a
preparation holds documents out (``prepare --holdout-docs``), the windows run over the other documents joined end
to end (``TokenStore.train_stream``), so no window reads a held-out token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .shards import TokenStore
from .sharding import check_layout, check_rank, cp_batch, rank_rows
from .stateful import StatefulLoader


class ConcatLoader(StatefulLoader):
    """Batches: ``input_ids``, ``labels`` (b, seq_len / cp_size) int64 with b = tokens_per_step / seq_len / dp_size;
    ``seq_len``, ``bucket`` (log2 of seq_len when a power of two, else -1), ``position_offset``, ``starts`` (b,),
    ``epoch``, ``step``."""

    kind = "concat"

    def __init__(self, store: TokenStore, tokens_per_step: int, seq_len: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1):
        check_layout(tokens_per_step, seq_len, dp_size, cp_size, "seq_len")
        check_rank(dp_rank, dp_size, "dp")
        check_rank(cp_rank, cp_size, "cp")
        self.store = store
        self.tokens_per_step, self.seq_len, self.seed = tokens_per_step, seq_len, seed
        self.dp_rank, self.dp_size, self.cp_rank, self.cp_size = dp_rank, dp_size, cp_rank, cp_size
        self.config = {"tokens_per_step": tokens_per_step, "seq_len": seq_len, "seed": seed,
                       "documents_sha256": store.documents_sha256}
        self.stream = store.train_stream()  # the store itself unless documents are held out
        self.windows = max(self.stream.num_tokens - 1, 0) // seq_len
        self.batch_size = tokens_per_step // seq_len  # global windows per step
        if self.windows < self.batch_size:
            raise ValueError(f"corpus in {store.dir} has {self.windows} windows of {seq_len} tokens, fewer than one "
                             f"step's {self.batch_size}; use a smaller tokens_per_step or a bigger corpus")
        log2 = seq_len.bit_length() - 1
        self.bucket = log2 if (1 << log2) == seq_len else -1
        self._init_position()

    def _start_epoch(self, epoch: int) -> int:
        self.order = np.random.default_rng([self.seed, epoch, 2]).permutation(self.windows)
        return self.windows // self.batch_size

    def _make_batch(self, step: int) -> dict[str, Any]:
        b = self.batch_size
        rows = rank_rows(self.order[step * b:(step + 1) * b], self.dp_rank, self.dp_size)
        starts = rows.astype(np.int64) * self.seq_len
        batch = cp_batch(self.stream, starts, self.seq_len, self.cp_rank, self.cp_size, has_next=True)
        batch.update(seq_len=self.seq_len, bucket=self.bucket,
                     position_offset=self.cp_rank * (self.seq_len // self.cp_size),
                     starts=torch.from_numpy(self.stream.to_physical(starts)))
        return batch
