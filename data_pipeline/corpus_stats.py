"""``stats``: what a prepared corpus holds and what one decomposition of it yields per epoch; for a mixture, each
source's tokens, weight and effective epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .decompose import load_or_build_buckets
from .mixture import is_mixture, mixture_quotas, read_mixture
from .shards import TokenStore


def stats(prepared_dir: str | Path, tokens_per_step: int = 1 << 16, min_log2: int = 8, max_log2: int = 13,
          train_tokens: int | None = None) -> dict:
    """Documents, tokens, document-length percentiles, and per bucket 2^i: pieces, tokens, steps per epoch
    (``pieces // (tokens_per_step / 2^i)``); dropped tokens (tails under 2^min) and steps per epoch in all. Counts
    are of the training documents; a held-out split is reported beside them. A mixture folder: ``mixture_stats``."""
    if is_mixture(prepared_dir):
        return mixture_stats(prepared_dir, tokens_per_step, min_log2, max_log2, train_tokens)
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
    tokens = int(lengths.sum())
    tok = m.get("tokenizer") or {}
    out = {
        "dir": str(store.dir),
        "source": m["source"].get("spec"),
        "tokenizer_sha256": tok.get("sha256"),
        "tokenizer": {k: tok.get(k) for k in ("file", "kind", "vocab_size", "eos_id", "bos_id", "pad_id")} if tok
        else None,
        "vocab_size": m["vocab_size"],
        "dtype": m["dtype"],
        "shards": len(m["shards"]),
        "documents": int(len(lengths)),
        "tokens": tokens,
        "doc_length_percentiles": dict(zip(["min", "p50", "p90", "p99", "max"], pct)),
        "tokens_per_step": tokens_per_step,
        "min_log2": min_log2,
        "max_log2": max_log2,
        "buckets": per_bucket,
        "dropped_tokens": dropped,
        "dropped_fraction": dropped / max(tokens, 1),
        "steps_per_epoch": sum(b["steps_per_epoch"] for b in per_bucket.values()),
        "concat_steps_per_epoch": (max(tokens - 1, 0) // (1 << max_log2)) // max(tokens_per_step >> max_log2, 1),
        "heldout": None,
    }
    if len(store.heldout):
        out["heldout"] = {"documents": int(len(store.heldout)), "tokens": int(np.asarray(store.heldout)[:, 1].sum())}
    if isinstance(m.get("merged"), dict):
        out["merged_shards"] = m["merged"].get("num_shards")
    return out


def mixture_stats(prepared_dir: str | Path, tokens_per_step: int = 1 << 16, min_log2: int = 8, max_log2: int = 13,
                  train_tokens: int | None = None) -> dict:
    """Per source: its ``stats``, weight, share of the steps (the loader's rounding, mixture.py), and effective
    epochs after ``train_tokens`` trained tokens (default: as many as all sources hold): share x train_tokens /
    its tokens (``loader_epochs``: the same over the tokens one DD epoch of it serves, tails dropped)."""
    mix = read_mixture(prepared_dir)
    sources = mix["sources"]
    quotas, cycle = mixture_quotas([s["weight"] for s in sources])
    per = [stats(Path(prepared_dir) / s["dir"], tokens_per_step, min_log2, max_log2) for s in sources]
    total = sum(p["tokens"] for p in per)
    trained = int(train_tokens) if train_tokens else total
    rows = []
    for s, p, q in zip(sources, per, quotas):
        share = q / cycle
        served = p["steps_per_epoch"] * tokens_per_step
        rows.append({"dir": s["dir"], "path": s.get("path"), "weight": s["weight"], "share": share,
                     "documents": p["documents"], "tokens": p["tokens"], "heldout": p["heldout"],
                     "effective_epochs": share * trained / max(p["tokens"], 1),
                     "loader_epochs": share * trained / served if served else None,
                     "stats": p})
    return {"dir": str(prepared_dir), "mixture": True, "tokenizer": mix.get("tokenizer"), "cycle": cycle,
            "quotas": quotas, "train_tokens": trained, "tokens": total, "tokens_per_step": tokens_per_step,
            "min_log2": min_log2, "max_log2": max_log2, "sources": rows}
