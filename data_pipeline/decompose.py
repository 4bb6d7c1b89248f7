"""Dataset decomposition (Pouransari et al., 2024): documents -> pieces of 2^i tokens, one index per bucket.

A document of length L (its EOS included) is cut by the binary expansion of L, largest piece first:
L = 200 = 128 + 64 + 8 gives pieces [0,128), [128,192), [192,200). With buckets 2^min..2^max:

- bits above max: the leading ``L >> max`` * 2^max tokens become ``L >> max`` pieces of 2^max;
- bit i in [min, max): a piece of 2^i at offset ``(L >> (i+1)) << (i+1)`` (the sum of the higher bits);
- bits below min: the tail of ``L mod 2^min`` tokens is dropped.

So the pieces of a document, in offset order, concatenate to its first ``L - (L mod 2^min)`` tokens, and no piece
crosses a document boundary. Indexes are written to ``dd_<min>_<max>/bucket_<i>.npy`` (int64 global start offsets,
sorted) so several decompositions of one corpus coexist; they are rebuilt if the document index changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .shards import save_npy_atomic, write_atomic


def decompose_lengths(starts: np.ndarray, lengths: np.ndarray, min_log2: int, max_log2: int) -> dict[int, np.ndarray]:
    """Piece start offsets per bucket. starts, lengths: (N,) int64. Returns {i: (n_i,) int64 sorted} for i in
    min..max. Vectorised: no Python loop over documents."""
    if not 0 <= min_log2 <= max_log2:
        raise ValueError(f"need 0 <= min_log2 ({min_log2}) <= max_log2 ({max_log2})")
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    out: dict[int, np.ndarray] = {}
    # largest bucket: every whole 2^max block at the head of each document
    n_big = lengths >> max_log2
    total = int(n_big.sum())
    doc_of = np.repeat(np.arange(len(lengths)), n_big)
    first = np.concatenate([[0], np.cumsum(n_big)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    k = np.arange(total, dtype=np.int64) - np.repeat(first, n_big)
    out[max_log2] = starts[doc_of] + (k << max_log2)
    for i in range(min_log2, max_log2):
        has = ((lengths >> i) & 1).astype(bool)
        out[i] = starts[has] + ((lengths[has] >> (i + 1)) << (i + 1))
    return {i: np.sort(out[i]) for i in range(min_log2, max_log2 + 1)}


def decomposition_dir(prepared_dir: str | Path, min_log2: int, max_log2: int) -> Path:
    return Path(prepared_dir) / f"dd_{min_log2}_{max_log2}"


def load_or_build_buckets(prepared_dir: str | Path, documents: np.ndarray, documents_sha256: str,
                          min_log2: int, max_log2: int) -> dict[int, np.ndarray]:
    """The bucket indexes of (min, max) for this corpus: read from disk if present and built from this same
    document index, else built and written (atomically; concurrent ranks may race harmlessly)."""
    folder = decomposition_dir(prepared_dir, min_log2, max_log2)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("documents_sha256") == documents_sha256:
            try:
                return {i: np.load(folder / f"bucket_{i:02d}.npy", mmap_mode="r") for i in range(min_log2, max_log2 + 1)}
            except (OSError, ValueError):
                pass  # damaged: rebuild below
    buckets = decompose_lengths(documents[:, 0], documents[:, 1], min_log2, max_log2)
    folder.mkdir(exist_ok=True)
    meta = {"min_log2": min_log2, "max_log2": max_log2, "documents_sha256": documents_sha256, "buckets": {}}
    for i, idx in buckets.items():
        sha = save_npy_atomic(folder / f"bucket_{i:02d}.npy", idx)
        meta["buckets"][str(i)] = {"pieces": int(len(idx)), "tokens": int(len(idx)) << i, "sha256": sha}
    meta["dropped_tokens"] = int((documents[:, 1] & ((1 << min_log2) - 1)).sum())
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return buckets
