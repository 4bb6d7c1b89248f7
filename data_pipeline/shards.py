"""Token shards on disk: writing them safely, and reading them back memory-mapped.

A prepared folder holds::

    manifest.json        written last; lists everything below with sizes and sha256
    tokenizer.model      the sentencepiece model the tokens were made with, or tokenizer.json (+ tokenizer_config.json)
                         for a Hugging Face tokenizer (absent for pre-tokenized input)
    tokens_00000.bin ... raw little-endian token ids, dtype uint16 (vocab < 65536) or uint32, one stream
    documents.npy        int64 (N, 2): [global start, length] of each training document, EOS included
    heldout.npy          int64 (M, 2): the held-out documents (``prepare --holdout-docs``), which no loader reads
    dd_<min>_<max>/      per-bucket piece indexes of one decomposition (see decompose.py)

A sharded preparation (``prepare --shard I --num-shards N``, then ``--merge``) holds ``shard_00000/`` ...
``shard_<N-1>/``, each a prepared folder of its own, and a merged manifest listing their token files by relative
path (``shard_00003/tokens_00000.bin``) with one document index over the joined stream; no token is copied.

Tokens form one global stream across shards (shard k holds [shard_start[k], shard_start[k+1])); a document never
straddles two shards. Every file is written under a ``.tmp`` name and renamed when complete, and the manifest is
written after all of them, so a manifest never points at a partial file. Manifest paths stay inside their folder:
a plain file name, or ``shard_NNNNN/<plain name>``; never ``..``, an absolute path or any other sub-folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
DOCUMENTS = "documents.npy"
HELDOUT = "heldout.npy"
TOKENIZER = "tokenizer.model"  # a sentencepiece tokenizer's name in a prepared folder (tokenizer.json: Hugging Face)
FORMAT = "lightspan-tokens/1"
SHARD_DIR = re.compile(r"shard_\d{5}")  # the sub-folders of a sharded preparation


class CorruptCorpusError(RuntimeError, ValueError):
    """A prepared folder whose files disagree with its manifest (truncated, corrupt, or mismatched), or whose
    manifest is unreadable. A ``ValueError`` too, so a CLI that reports bad input in one line reports this."""


# what a manifest must hold, and what each shard / document / tokenizer record must hold
_MANIFEST_KEYS = ("format", "dtype", "vocab_size", "num_documents", "num_tokens", "shards", "documents")
_FILE_KEYS = {"shards": ("file", "num_tokens", "bytes", "sha256"), "documents": ("file", "bytes", "sha256"),
              "tokenizer": ("file", "sha256", "vocab_size"), "heldout": ("file", "bytes", "sha256")}


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
    """The manifest of a prepared folder, checked for shape: every key present, every file name a plain name
    inside the folder. Raises ``FileNotFoundError`` (no manifest) or ``CorruptCorpusError`` naming the manifest,
    the key or file name at fault, and the fix."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {prepared_dir} is not a prepared corpus (or its preparation never finished); "
            f"run `lightspan prepare --source ... --out {prepared_dir}`"
        )
    rerun = f"re-run `lightspan prepare --source ... --out {prepared_dir} --overwrite` to rebuild the folder"
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CorruptCorpusError(f"{path} is not valid JSON ({e}); {rerun}") from None
    if not isinstance(manifest, dict):
        raise CorruptCorpusError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {rerun}")
    if manifest.get("format") != FORMAT:
        raise CorruptCorpusError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; {rerun}")
    for key in _MANIFEST_KEYS:
        if key not in manifest:
            raise CorruptCorpusError(f"{path} has no {key!r} key; {rerun}")
    records = [("shards", r) for r in manifest["shards"]] if isinstance(manifest["shards"], list) else None
    if records is None:
        raise CorruptCorpusError(f"{path}: 'shards' is not a list; {rerun}")
    records.append(("documents", manifest["documents"]))
    if manifest.get("tokenizer") is not None:
        records.append(("tokenizer", manifest["tokenizer"]))
    if manifest.get("heldout") is not None:
        records.append(("heldout", manifest["heldout"]))
    for section, record in records:
        if not isinstance(record, dict):
            raise CorruptCorpusError(f"{path}: an entry of {section!r} is not an object; {rerun}")
        for key in _FILE_KEYS[section]:
            if key not in record:
                raise CorruptCorpusError(f"{path}: {section!r} entry {record.get('file', '?')!r} has no {key!r} key; "
                                         f"{rerun}")
        check_file_name(record["file"], path)
        for key in ("num_tokens", "bytes"):
            if key in record and not (isinstance(record[key], int) and record[key] >= 0):
                raise CorruptCorpusError(f"{path}: {section!r} entry {record['file']!r} has {key} "
                                         f"{record[key]!r}, not a count; {rerun}")
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
    except TypeError:
        raise CorruptCorpusError(f"{path}: 'dtype' {manifest['dtype']!r} is not a numpy dtype; {rerun}") from None
    for record in manifest["shards"]:
        if record["bytes"] != record["num_tokens"] * itemsize:
            raise CorruptCorpusError(f"{path}: shard {record['file']!r} has {record['num_tokens']} tokens of "
                                     f"{manifest['dtype']} but {record['bytes']} bytes; {rerun}")
    return manifest


def _plain(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and os.sep not in name and "\0" not in name and not os.path.isabs(name))


def check_file_name(name, manifest_path: Path) -> str:
    """``name`` if it can only name a file inside the prepared folder: a plain file name (no separator, not ``..``,
    not absolute), or ``shard_NNNNN/<plain name>`` (a merged sharded preparation); else ``CorruptCorpusError``
    naming it."""
    ok = _plain(name)
    if not ok and isinstance(name, str) and name.count("/") == 1:
        folder, _, base = name.partition("/")
        ok = SHARD_DIR.fullmatch(folder) is not None and _plain(base)
    if not ok:
        raise CorruptCorpusError(
            f"{manifest_path} lists the file name {name!r}, which is not a plain name inside {manifest_path.parent} "
            f"(a path separator other than a shard_NNNNN/ sub-folder, '..' or an absolute path); nothing outside "
            f"the prepared folder is read. The manifest was edited or damaged: re-run `lightspan prepare --source ... "
            f"--out {manifest_path.parent} --overwrite`"
        )
    return name


def _fix_hint(prepared_dir: Path, manifest: dict) -> str:
    spec = (manifest.get("source") or {}).get("spec", "...")
    merged, piece = manifest.get("merged"), manifest.get("slice")
    if isinstance(piece, dict):  # one shard of a sharded preparation
        parent = prepared_dir.parent
        return (f"re-run `lightspan prepare --source {spec} --out {parent} --shard {piece.get('shard', 'I')} "
                f"--num-shards {piece.get('num_shards', 'N')} --overwrite`, then `lightspan prepare --merge {parent}`")
    if isinstance(merged, dict):
        return (f"re-run the shard that holds it (`lightspan prepare --source {spec} --out {prepared_dir} --shard I "
                f"--num-shards {merged.get('num_shards', 'N')} --overwrite`), then `lightspan prepare --merge "
                f"{prepared_dir}`")
    return f"re-run `lightspan prepare --source {spec} --out {prepared_dir} --overwrite` to rebuild it"


VERIFY_MODES = ("none", "size", "lazy", "sha256")


class TokenStore:
    """The token stream of a prepared folder, memory-mapped.

    ``verify``: how the files are checked against the manifest.
        "size": every file's length (cheap; catches truncation);
        "lazy": sizes, plus sha256 of the tokenizer and the document index at open and of each shard on the first
            read that touches it (catches corruption without hashing the whole corpus before the first step);
        "sha256": sizes and sha256 of every file at open;
        "none": nothing.
        Measured on the embedded stdlib corpus at vocabulary 2048 (11.7M tokens, uint16, one 23.4 MB shard),
        warm page cache, one core: "size" and "lazy" open in ~0.3 ms, "sha256" in ~17 ms (sha256 runs at
        ~1.4 GB/s; "lazy" pays those ~16 ms on its first batch instead). A full 2^28-token uint16 shard (512 MB)
        takes ~0.35 s to hash, plus the disk read when it is not cached.
    ``tokenizer_sha256``: if given, must equal the manifest's tokenizer hash.
    ``vocab_size``: if given (the model's vocabulary), each shard's largest token id is checked once at open
        (``np.max`` over the memmap) and an id >= ``vocab_size``, or beyond the tokenizer's vocabulary, raises
        ``CorruptCorpusError`` naming the shard; ~1.5 ms for the 11.7M-token stdlib corpus (warm page cache;
        a cold one adds one read of the shards).
    """

    def __init__(self, prepared_dir: str | Path, verify: str = "size", tokenizer_sha256: str | None = None,
                 vocab_size: int | None = None):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.dir = Path(prepared_dir)
        self.manifest = read_manifest(self.dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.verify = verify
        self._hint = hint = _fix_hint(self.dir, self.manifest)
        self._check_tokenizer(tokenizer_sha256, hint, verify)

        files = [(self.dir / s["file"], s["bytes"], s["sha256"]) for s in self.manifest["shards"]]
        n_shards = len(files)
        doc = self.manifest["documents"]
        held = self.manifest.get("heldout")
        files.append((self.dir / doc["file"], doc["bytes"], doc["sha256"]))
        if held is not None:
            files.append((self.dir / held["file"], held["bytes"], held["sha256"]))
        for n, (path, size, sha) in enumerate(files):
            if verify == "none":
                break
            if not path.is_file():
                raise CorruptCorpusError(f"{path} is missing (listed in {self.dir / MANIFEST}); {hint}")
            actual = path.stat().st_size
            if actual != size:
                raise CorruptCorpusError(
                    f"{path} is truncated or damaged: {actual} bytes, the manifest says {size}; {hint}"
                )
            is_index = n >= n_shards  # the document index and the held-out index: small, hashed at open
            if verify == "sha256" or (verify == "lazy" and is_index):
                self._check_sha256(path, sha)

        self.shards = [np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r") if s["num_tokens"] else
                       np.zeros(0, self.dtype) for s in self.manifest["shards"]]
        # shards still to hash on their first read ("lazy")
        self._unhashed = {k for k, s in enumerate(self.manifest["shards"]) if s["num_tokens"]} \
            if verify == "lazy" else set()
        counts = [s["num_tokens"] for s in self.manifest["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_shards + 1,)
        self.documents = self._index(doc["file"])  # (N, 2) [start, length]: the training documents
        self.heldout = self._index(held["file"]) if held is not None else np.zeros((0, 2), np.int64)
        self.num_tokens = int(self.shard_starts[-1])  # the whole stream, held-out documents included
        self.documents_sha256 = doc["sha256"]
        self._train_stream = None
        if vocab_size is not None:
            self.check_token_ids(vocab_size)

    def _index(self, name: str) -> np.ndarray:
        path = self.dir / name
        try:
            index = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CorruptCorpusError(f"{path} cannot be read as a document index ({e}); {self._hint}") from None
        if index.ndim != 2 or index.shape[1:] != (2,):
            raise CorruptCorpusError(f"{path} has shape {index.shape}, expected (N, 2); {self._hint}")
        return index

    @property
    def train_tokens(self) -> int:
        """Tokens of the training documents (the stream less the held-out documents)."""
        return self.train_stream().num_tokens

    def train_stream(self) -> "TokenStore | TrainStream":
        """The training documents as one stream, for packed (concat) reads: this store itself when nothing is held
        out (the documents tile the stream), else a ``TrainStream`` that skips the held-out documents."""
        if not len(self.heldout):
            return self
        if self._train_stream is None:
            self._train_stream = TrainStream(self, np.asarray(self.documents))
        return self._train_stream

    def to_physical(self, starts: np.ndarray) -> np.ndarray:
        return np.asarray(starts, np.int64)

    def _check_sha256(self, path: Path, sha: str) -> None:
        if file_sha256(path) != sha:
            raise CorruptCorpusError(f"{path} is corrupt: its sha256 differs from the manifest's; {self._hint}")

    def _shard(self, k: int) -> np.ndarray:
        """Shard k's tokens, hashed against the manifest first if it has not been yet ("lazy")."""
        if k in self._unhashed:
            record = self.manifest["shards"][k]
            self._check_sha256(self.dir / record["file"], record["sha256"])
            self._unhashed.discard(k)
        return self.shards[k]

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse a shard whose largest id does not fit ``vocab_size`` (the model's vocabulary) or the tokenizer's
        vocabulary recorded in the manifest: one ``np.max`` per shard. Raises ``CorruptCorpusError``."""
        vocab_size = int(vocab_size)
        tokenizer_vocab = int(self.manifest["vocab_size"])
        for record, tokens in zip(self.manifest["shards"], self.shards):
            if not len(tokens):
                continue
            top = int(tokens.max())
            path = self.dir / record["file"]
            if top >= tokenizer_vocab:
                raise CorruptCorpusError(
                    f"{path} holds token id {top}, outside the corpus's vocabulary of {tokenizer_vocab} ids "
                    f"(the model's vocabulary size is {vocab_size}): the shard is damaged (flipped bytes?); "
                    f"{self._hint}"
                )
            if top >= vocab_size:
                raise CorruptCorpusError(
                    f"{path} holds token id {top}, but the model's vocabulary size is {vocab_size} (the corpus was "
                    f"prepared with a {tokenizer_vocab}-id tokenizer): raise model.vocab_size to at least "
                    f"{tokenizer_vocab}, or prepare the data with a tokenizer of at most {vocab_size} ids"
                )

    def _check_tokenizer(self, expected: str | None, hint: str, verify: str) -> None:
        tok = self.manifest.get("tokenizer")
        if expected is not None:
            recorded = tok["sha256"] if tok else None
            if recorded != expected:
                raise CorruptCorpusError(
                    f"tokenizer mismatch: {self.dir} was prepared with tokenizer sha256 {str(recorded)[:12]}..., "
                    f"but the tokenizer given has sha256 {expected[:12]}...; use the tokenizer in "
                    f"{self.dir / (tok['file'] if tok else TOKENIZER)}, or {hint} with your tokenizer"
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
            out[done:done + take] = self._shard(k)[local:local + take]
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
            out[rows] = self._shard(int(k))[local[:, None] + offsets[None, :]]
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), length)
        return out


class TrainStream:
    """The training documents of a store joined end to end, skipping the held-out ones: position v of this stream
    is token ``to_physical(v)`` of the store. Runs of physically adjacent documents map in one piece, so a read
    inside a run is the store's own vectorised ``gather``; a read across a held-out gap is put together piecewise."""

    def __init__(self, store: TokenStore, documents: np.ndarray):
        self.store = store
        self.dir = store.dir
        starts, lengths = documents[:, 0].astype(np.int64), documents[:, 1].astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        breaks = np.flatnonzero(starts[1:] != starts[:-1] + lengths[:-1]) + 1 if len(starts) else np.zeros(0, int)
        first = np.concatenate([[0], breaks]).astype(np.int64) if len(starts) else np.zeros(0, np.int64)
        self.phys = starts[first]  # (runs,) physical start of each run
        self.vstart = cum[first]  # (runs,) its position in this stream
        self.vend = np.append(self.vstart[1:], cum[-1]).astype(np.int64)
        self.num_tokens = int(cum[-1])

    def to_physical(self, starts: np.ndarray) -> np.ndarray:
        starts = np.asarray(starts, np.int64)
        run = np.searchsorted(self.vstart, starts, side="right") - 1
        return self.phys[run] + starts - self.vstart[run]

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, np.int64)
        pos, done = int(start), 0
        while done < length:
            run = int(np.searchsorted(self.vstart, pos, side="right")) - 1
            take = min(length - done, int(self.vend[run]) - pos)
            if take <= 0:
                raise IndexError(f"read of [{start}, {start + length}) past the end of the training stream "
                                 f"({self.num_tokens})")
            out[done:done + take] = self.store.read(int(self.phys[run]) + pos - int(self.vstart[run]), take)
            pos += take
            done += take
        return out

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        starts = np.asarray(starts, np.int64)
        run = np.searchsorted(self.vstart, starts, side="right") - 1
        inside = starts + length <= self.vend[run]
        out = np.empty((len(starts), length), np.int64)
        if inside.any():
            out[inside] = self.store.gather(self.phys[run[inside]] + starts[inside] - self.vstart[run[inside]], length)
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), length)
        return out
