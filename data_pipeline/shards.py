"""Token shards on disk: writing them safely, and reading them back memory-mapped.

A prepared folder holds::

    manifest.json        written last; lists everything below with sizes and sha256
    tokenizer.model      the sentencepiece model the tokens were made with (absent for pre-tokenized input)
    tokens_00000.bin ... raw little-endian token ids, dtype uint16 (vocab < 65536) or uint32, one stream
    documents.npy        int64 (N, 2): [global start, length] of each document, EOS included
    dd_<min>_<max>/      per-bucket piece indexes of one decomposition (see decompose.py)

Tokens form one global stream across shards (shard k holds [shard_start[k], shard_start[k+1])); a document never
straddles two shards. Every file is written under a ``.tmp`` name and renamed when complete, and the manifest is
written after all of them, so a manifest never points at a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
DOCUMENTS = "documents.npy"
TOKENIZER = "tokenizer.model"
FORMAT = "lightspan-tokens/1"


class CorruptCorpusError(RuntimeError):
    """A prepared folder whose files disagree with its manifest (truncated, corrupt, or mismatched)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    # unique per process and host: ranks on several nodes may write the same index on a shared file system
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename (unique per process)."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_npy_atomic(path: Path, array: np.ndarray) -> str:
    """Save an array as ``.npy`` atomically; returns the file's sha256."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return file_sha256(path)


class ShardWriter:
    """Appends documents to ``tokens_XXXXX.bin`` files of at most ``shard_tokens`` tokens (a longer document gets
    a shard of its own). Hashes while writing; each shard is renamed into place when it is closed."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self.doc_lengths: list[np.ndarray] = []
        self._file = None
        self._tmp: Path | None = None
        self._hash = None
        self._count = 0

    def _open(self) -> None:
        name = f"tokens_{len(self.shards):05d}.bin"
        self._tmp = self.out_dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        self._tmp.replace(final)
        self.shards.append(
            {"file": final.name, "num_tokens": self._count, "bytes": self._count * self.dtype.itemsize,
             "sha256": self._hash.hexdigest()}
        )
        self._file = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once. tokens: (sum(lengths),) concatenated; lengths: (n_docs,)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        i = 0
        while i < len(lengths):
            if self._file is None:
                self._open()
            # take as many whole documents as fit in this shard (at least one)
            room = self.shard_tokens - self._count
            j = int(np.searchsorted(bounds, bounds[i] + room, side="right")) - 1
            j = max(j, i + 1) if self._count == 0 else j
            if j <= i:
                self._close()
                continue
            block = tokens[bounds[i]:bounds[j]].astype(self.dtype, copy=False)
            data = block.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(block)
            i = j
            if self._count >= self.shard_tokens:
                self._close()
        self.doc_lengths.append(lengths)

    def finish(self) -> tuple[list[dict], np.ndarray]:
        """Close the last shard. Returns (shard records, documents (N, 2) int64 [start, length])."""
        if self._file is not None:
            self._close()
        lengths = np.concatenate(self.doc_lengths) if self.doc_lengths else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        return self.shards, np.stack([starts, lengths], axis=1).astype(np.int64)


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {prepared_dir} is not a prepared corpus (or its preparation never finished); "
            f"run `lightspan prepare --source ... --out {prepared_dir}`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CorruptCorpusError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; re-run prepare")
    return manifest


def _fix_hint(prepared_dir: Path, manifest: dict) -> str:
    spec = manifest.get("source", {}).get("spec", "...")
    return f"re-run `lightspan prepare --source {spec} --out {prepared_dir} --overwrite` to rebuild it"


class TokenStore:
    """The token stream of a prepared folder, memory-mapped.

    ``verify``: "size" checks every file's length against the manifest (cheap; catches truncation), "sha256"
    also hashes every file (catches corruption; about 0.1 s per 100 MB), "none" skips both.
    ``tokenizer_sha256``: if given, must equal the manifest's tokenizer hash.
    """

    def __init__(self, prepared_dir: str | Path, verify: str = "size", tokenizer_sha256: str | None = None):
        if verify not in ("none", "size", "sha256"):
            raise ValueError(f"verify must be 'none', 'size' or 'sha256', not {verify!r}")
        self.dir = Path(prepared_dir)
        self.manifest = read_manifest(self.dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        hint = _fix_hint(self.dir, self.manifest)
        self._check_tokenizer(tokenizer_sha256, hint, verify)

        files = [(self.dir / s["file"], s["bytes"], s["sha256"]) for s in self.manifest["shards"]]
        doc = self.manifest["documents"]
        files.append((self.dir / doc["file"], doc["bytes"], doc["sha256"]))
        for path, size, sha in files:
            if verify == "none":
                break
            if not path.is_file():
                raise CorruptCorpusError(f"{path} is missing (listed in {self.dir / MANIFEST}); {hint}")
            actual = path.stat().st_size
            if actual != size:
                raise CorruptCorpusError(
                    f"{path} is truncated or damaged: {actual} bytes, the manifest says {size}; {hint}"
                )
            if verify == "sha256" and file_sha256(path) != sha:
                raise CorruptCorpusError(f"{path} is corrupt: its sha256 differs from the manifest's; {hint}")

        self.shards = [np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r") if s["num_tokens"] else
                       np.zeros(0, self.dtype) for s in self.manifest["shards"]]
        counts = [s["num_tokens"] for s in self.manifest["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_shards + 1,)
        self.documents = np.load(self.dir / doc["file"], mmap_mode="r")  # (N, 2) [start, length]
        self.num_tokens = int(self.shard_starts[-1])
        self.documents_sha256 = doc["sha256"]

    def _check_tokenizer(self, expected: str | None, hint: str, verify: str) -> None:
        tok = self.manifest.get("tokenizer")
        if expected is not None:
            recorded = tok["sha256"] if tok else None
            if recorded != expected:
                raise CorruptCorpusError(
                    f"tokenizer mismatch: {self.dir} was prepared with tokenizer sha256 {str(recorded)[:12]}..., "
                    f"but the tokenizer given has sha256 {expected[:12]}...; use the tokenizer in "
                    f"{self.dir / TOKENIZER}, or {hint} with your tokenizer"
                )
        if tok and verify != "none":
            path = self.dir / tok["file"]
            if not path.is_file() or file_sha256(path) != tok["sha256"]:
                raise CorruptCorpusError(
                    f"tokenizer mismatch: {path} is missing or differs from the one the tokens were made with "
                    f"(manifest sha256 {tok['sha256'][:12]}...); restore it, or {hint}"
                )

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the global stream as int64, crossing shard ends if needed."""
        out = np.empty(length, np.int64)
        pos, done = int(start), 0
        while done < length:
            k = int(np.searchsorted(self.shard_starts, pos, side="right")) - 1
            local = pos - int(self.shard_starts[k])
            take = min(length - done, int(self.shard_starts[k + 1]) - pos)
            if k >= len(self.shards) or take <= 0:
                raise IndexError(f"read of [{start}, {start + length}) past the end of the stream ({self.num_tokens})")
            out[done:done + take] = self.shards[k][local:local + take]
            pos += take
            done += take
        return out

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of ``length`` tokens from each start: (len(starts), length) int64.

        Rows inside one shard are gathered in one vectorised read per shard; rows that cross a shard end
        (only possible for packed, concat-style reads) fall back to ``read``.
        """
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), length), np.int64)
        shard = np.searchsorted(self.shard_starts, starts, side="right") - 1
        inside = starts + length <= self.shard_starts[np.minimum(shard + 1, len(self.shards))]
        offsets = np.arange(length, dtype=np.int64)
        for k in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == k))
            local = starts[rows] - self.shard_starts[k]
            out[rows] = self.shards[k][local[:, None] + offsets[None, :]]
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), length)
        return out
