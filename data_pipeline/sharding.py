"""How one global batch is cut across data-parallel and context-parallel ranks, shared by both loaders.

A step's global batch is ``B = tokens_per_step / T`` sequences of length T. Data-parallel rank r takes rows
[r·B/dp, (r+1)·B/dp). Context-parallel rank c takes the contiguous chunk [c·C, (c+1)·C) of every row, C = T/cp
(contiguous, never zig-zag: LASP passes the state from chunk to chunk in order).

Labels are next tokens: ``labels[t] = token[t+1]``. A chunk reads C+1 tokens so its last label is the first
token of the next chunk. Where a sequence has no next token of its own (the end of a dataset-decomposition
piece), the label is -100 (``IGNORE_INDEX``, ignored by cross-entropy).
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def check_layout(tokens_per_step: int, seq_len: int, dp_size: int, cp_size: int, what: str) -> None:
    """Refuse, with the numbers, a step size or sequence length the ranks cannot share evenly."""
    if dp_size < 1 or cp_size < 1:
        raise ValueError(f"dp_size ({dp_size}) and cp_size ({cp_size}) must be >= 1")
    if tokens_per_step % (seq_len * dp_size):
        raise ValueError(
            f"tokens_per_step ({tokens_per_step}) must be divisible by {what} ({seq_len}) x dp_size ({dp_size}) "
            f"= {seq_len * dp_size}, so every data-parallel rank gets whole sequences; "
            f"e.g. use tokens_per_step={max(1, tokens_per_step // (seq_len * dp_size)) * seq_len * dp_size}"
        )
    if seq_len % cp_size:
        raise ValueError(f"{what} ({seq_len}) must be divisible by cp_size ({cp_size}) to split sequences evenly")


def check_rank(rank: int, size: int, name: str) -> None:
    if not 0 <= rank < size:
        raise ValueError(f"{name}_rank ({rank}) must be in [0, {name}_size={size})")


def rank_rows(global_rows: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """This dp rank's disjoint slice of the global batch's rows. global_rows: (B,) -> (B/dp,)."""
    per = len(global_rows) // dp_size
    return global_rows[dp_rank * per:(dp_rank + 1) * per]


def cp_batch(store, starts: np.ndarray, seq_len: int, cp_rank: int, cp_size: int, has_next: bool) -> dict:
    """Read this cp rank's chunk of each sequence and its labels.

    starts: (b,) global token offsets of the sequences. has_next: the token after each sequence belongs to it
    (concat packing) or not (decomposition pieces: the last label becomes IGNORE_INDEX).
    Returns ``input_ids``, ``labels``: (b, seq_len / cp_size) int64 tensors.
    """
    c = seq_len // cp_size
    first = starts + cp_rank * c
    last_chunk = cp_rank == cp_size - 1
    if last_chunk and not has_next:
        x = store.gather(first, c)
        y = np.empty_like(x)
        y[:, :-1] = x[:, 1:]
        y[:, -1] = IGNORE_INDEX
    else:
        xy = store.gather(first, c + 1)
        x, y = xy[:, :-1], xy[:, 1:]
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(x)),
            "labels": torch.from_numpy(np.ascontiguousarray(y))}
