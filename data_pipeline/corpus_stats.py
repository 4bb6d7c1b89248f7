"""``stats``: what a prepared corpus holds and what one decomposition of it yields per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .decompose import load_or_build_buckets
from .shards import TokenStore


def stats(prepared_dir: str | Path, tokens_per_step: int = 1 << 16, min_log2: int = 8, max_log2: int = 13) -> dict:
    """Documents, tokens, document-length percentiles, and per bucket 2^i: pieces, tokens, steps per epoch
    (``pieces // (tokens_per_step / 2^i)``); dropped tokens (tails under 2^min) and steps per epoch in all."""
    store = TokenStore(prepared_dir, verify="size")
    m = store.manifest
    lengths = np.asarray(store.documents[:, 1])
    buckets = load_or_build_buckets(store.dir, store.documents, store.documents_sha256, min_log2, max_log2)
    per_bucket = {}
    for i, idx in buckets.items():
        per_step = tokens_per_step >> i
        per_bucket[i] = {"seq_len": 1 << i, "pieces": int(len(idx)), "tokens": int(len(idx)) << i,
                         "steps_per_epoch": int(len(idx) // per_step) if per_step else 0}
    dropped = int((lengths & ((1 << min_log2) - 1)).sum())
    pct = np.percentile(lengths, [0, 50, 90, 99, 100]).astype(int).tolist() if len(lengths) else [0] * 5
    return {
        "dir": str(store.dir),
        "source": m["source"].get("spec"),
        "tokenizer_sha256": (m.get("tokenizer") or {}).get("sha256"),
        "vocab_size": m["vocab_size"],
        "dtype": m["dtype"],
        "shards": len(m["shards"]),
        "documents": int(len(lengths)),
        "tokens": int(store.num_tokens),
        "doc_length_percentiles": dict(zip(["min", "p50", "p90", "p99", "max"], pct)),
        "tokens_per_step": tokens_per_step,
        "min_log2": min_log2,
        "max_log2": max_log2,
        "buckets": per_bucket,
        "dropped_tokens": dropped,
        "dropped_fraction": dropped / max(store.num_tokens, 1),
        "steps_per_epoch": sum(b["steps_per_epoch"] for b in per_bucket.values()),
        "concat_steps_per_epoch": (max(store.num_tokens - 1, 0) // (1 << max_log2)) // max(tokens_per_step >> max_log2, 1),
    }
