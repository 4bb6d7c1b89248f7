"""Dataset decomposition (Pouransari et al., 2024): documents -> pieces of 2^i tokens, one index per bucket.

A document of length L (its EOS included) is cut by the binary expansion of L, largest piece first:
L = 200 = 128 + 64 + 8 gives pieces [0,128), [128,192), [192,200). With buckets 2^min..2^max:

- bits above max: the leading ``L >> max`` * 2^max tokens become ``L >> max`` pieces of 2^max;
- bit i in [min, max): a piece of 2^i at offset ``(L >> (i+1)) << (i+1)`` (the sum of the higher bits);
- bits below min: the tail of ``L mod 2^min`` tokens is dropped.

So the pieces of a document, in offset order, concatenate to its first ``L - (L mod 2^min)`` tokens, and no piece
crosses a document boundary. Indexes are written to ``dd_<min>_<max>/bucket_<i>.npy`` (int64 global start offsets,
sorted) so several decompositions of one corpus coexist; they are rebuilt if the document index changes, and
``meta.json`` beside them records each file's sha256, checked on every load (a damaged index is rebuilt).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .shards import file_sha256, save_npy_atomic, write_atomic


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


def _load_verified(folder: Path, meta_path: Path, documents_sha256: str, min_log2: int,
                   max_log2: int) -> dict[int, np.ndarray] | str:
    """The bucket indexes in ``folder`` if its meta.json was written for this document index and every bucket
    file matches the sha256 recorded there; else a sentence saying what is wrong (or "" if nothing was built)."""
    if not meta_path.is_file():
        return ""
    try:
        meta = json.loads(meta_path.read_bytes())
        recorded = {i: meta["buckets"][str(i)] for i in range(min_log2, max_log2 + 1)}
    except (ValueError, KeyError, TypeError) as e:
        return f"{meta_path} is unreadable ({type(e).__name__}: {e})"
    if meta.get("documents_sha256") != documents_sha256:
        return ""  # built from another document index (the corpus was re-prepared): rebuilt silently
    buckets = {}
    for i, rec in recorded.items():
        path = folder / f"bucket_{i:02d}.npy"
        if not path.is_file():
            return f"{path} is missing"
        if not isinstance(rec, dict) or file_sha256(path) != rec.get("sha256"):
            return f"{path} does not match the sha256 recorded in {meta_path}"
        try:
            buckets[i] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{path} cannot be read ({e})"
        if buckets[i].ndim != 1 or len(buckets[i]) != rec.get("pieces"):
            return f"{path} holds {buckets[i].shape} entries, {meta_path} says {rec.get('pieces')}"
    return buckets


def load_or_build_buckets(prepared_dir: str | Path, documents: np.ndarray, documents_sha256: str,
                          min_log2: int, max_log2: int) -> dict[int, np.ndarray]:
    """The bucket indexes of (min, max) for this corpus: read from disk if present, built from this same
    document index, and every bucket file matches the sha256 recorded beside it in meta.json; else built and
    written (atomically; concurrent ranks may race harmlessly). A damaged index is rebuilt with a
    ``RuntimeWarning`` naming the file, never used. Hashing the indexes costs little (8 bytes per piece): the
    stdlib corpus at 2^8..2^13 has 35 KB of index, loaded and checked in ~0.5 ms."""
    folder = decomposition_dir(prepared_dir, min_log2, max_log2)
    meta_path = folder / "meta.json"
    found = _load_verified(folder, meta_path, documents_sha256, min_log2, max_log2)
    if isinstance(found, dict):
        return found
    if found:
        warnings.warn(f"dataset-decomposition index damaged: {found}; rebuilding {folder} from the document index",
                      RuntimeWarning, stacklevel=2)
    buckets = decompose_lengths(documents[:, 0], documents[:, 1], min_log2, max_log2)
    folder.mkdir(exist_ok=True)
    meta = {"min_log2": min_log2, "max_log2": max_log2, "documents_sha256": documents_sha256, "buckets": {}}
    for i, idx in buckets.items():
        sha = save_npy_atomic(folder / f"bucket_{i:02d}.npy", idx)
        meta["buckets"][str(i)] = {"pieces": int(len(idx)), "tokens": int(len(idx)) << i, "sha256": sha}
    meta["dropped_tokens"] = int((documents[:, 1] & ((1 << min_log2) - 1)).sum())
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return buckets
