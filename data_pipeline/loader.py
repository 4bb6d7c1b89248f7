"""``build_loader``: the one call the trainer makes to get its training input."""

from __future__ import annotations

from pathlib import Path

from .concat_loader import ConcatLoader
from .dd_loader import DDLoader
from .shards import TokenStore
from .tokenizer import Tokenizer, load_tokenizer

LOADER_KINDS = ("dd", "concat")


def build_loader(
    prepared_dir: str | Path,
    kind: str = "dd",
    tokens_per_step: int = 1 << 16,
    seq_len: int | None = None,
    min_log2: int = 8,
    max_log2: int = 13,
    curriculum: str = "grow_p2",
    cycles: int = 8,
    seed: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    cp_rank: int = 0,
    cp_size: int = 1,
    verify: str = "size",
    tokenizer: str | Path | Tokenizer | None = None,
) -> DDLoader | ConcatLoader:
    """A stateful, dp/cp-sharded, infinite batch iterator over a prepared corpus.

    kind "dd": dataset decomposition, buckets 2^min_log2..2^max_log2, ordered by ``curriculum``
        ("uniform" | "grow_p2" | "grow_linear") over ``cycles`` cycles per epoch.
    kind "concat": packed fixed-length windows of ``seq_len`` (default 2^max_log2).
    tokens_per_step: GLOBAL tokens per step (all dp ranks together); must be divisible by
        seq_len (dd: 2^max_log2) x dp_size.
    verify: "size" (default, cheap), "sha256" (hash every file) or "none"; see ``TokenStore``.
    tokenizer: if given, must be the tokenizer the corpus was prepared with (else a clear error).
    Each batch: ``input_ids``/``labels`` (b, T/cp_size) int64, ``seq_len`` T, ``bucket``, ``position_offset``,
    ``starts``, ``epoch``, ``step``.
    """
    sha = None
    if tokenizer is not None:
        sha = (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).sha256
    store = TokenStore(prepared_dir, verify=verify, tokenizer_sha256=sha)
    if kind == "dd":
        return DDLoader(store, tokens_per_step, min_log2, max_log2, curriculum, cycles, seed,
                        dp_rank, dp_size, cp_rank, cp_size)
    if kind == "concat":
        return ConcatLoader(store, tokens_per_step, seq_len or (1 << max_log2), seed,
                            dp_rank, dp_size, cp_rank, cp_size)
    raise ValueError(f"unknown loader kind {kind!r}; choose one of {LOADER_KINDS}")
