"""``prepare``: source -> tokenizer -> token shards + document index + manifest, in parallel, restartable.

Re-running on the same input with the same options is a no-op (the manifest's fingerprint matches and its files
are intact). An interrupted run leaves no manifest (it is written last), so the next run starts over cleanly:
stale ``.tmp`` files and unlisted shards are removed first. Output order is the source order whatever the number
of workers (ordered ``imap``), so the same input always gives byte-identical shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .shards import DOCUMENTS, FORMAT, MANIFEST, TOKENIZER, CorruptCorpusError, ShardWriter, TokenStore, \
    save_npy_atomic, token_dtype, write_atomic
from .sources import MegatronSource, TextSource, open_source
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# documents per task sent to a worker: big enough to amortise pickling, small enough for a smooth progress bar
_BATCH_DOCS = 64

_worker_tok: Tokenizer | None = None


def _worker_init(model_bytes: bytes) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(model_bytes)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode documents and append EOS to each. Returns (tokens concatenated (sum L,), lengths (n,), bytes in)."""
    ids = _worker_tok.encode_batch(texts)
    eos = _worker_tok.eos_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        tokens[pos + len(x)] = eos
        pos += len(x) + 1
    return tokens, lengths, sum(len(t) for t in texts)


def _batches(it, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def _clean_partial(out_dir: Path) -> None:
    """Remove what an interrupted or superseded run left: temp files, shards, the document index, bucket indexes."""
    for p in out_dir.iterdir():
        shard = p.name.startswith("tokens_") and p.suffix == ".bin"
        if shard or p.name.endswith(".tmp") or p.name == DOCUMENTS:
            p.unlink()
        elif p.is_dir() and p.name.startswith("dd_"):
            shutil.rmtree(p)


def _resolve_tokenizer(source, out_dir: Path, tokenizer, vocab_size, model_type, byte_fallback, sample_bytes, seed):
    """Return a Tokenizer (or None for pre-tokenized input without one)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer not in (None, "train"):
        return load_tokenizer(tokenizer)
    if isinstance(source, MegatronSource):
        return None  # tokens are already ids
    size = "an automatically sized" if sample_bytes is None else f"a {sample_bytes / 1e6:.1f} MB"
    print(f"[prepare] training a {model_type} tokenizer, vocab {vocab_size}, on {size} sample")
    t0 = time.time()
    tok = train_tokenizer(source.texts(), out_dir / TOKENIZER, vocab_size=vocab_size, model_type=model_type,
                          byte_fallback=byte_fallback, sample_bytes=sample_bytes, seed=seed)
    print(f"[prepare] tokenizer trained in {time.time() - t0:.1f}s (sha256 {tok.sha256[:12]})")
    return tok


def _fingerprint(source, tok: Tokenizer | None, options: dict) -> str:
    items = [source.fingerprint(), tok.sha256 if tok else "no-tokenizer", json.dumps(options, sort_keys=True)]
    return hashlib.sha256("\0".join(items).encode()).hexdigest()


def _existing_is_current(out_dir: Path, source, options: dict, tokenizer) -> dict | None:
    """The manifest if ``out_dir`` already holds this exact preparation, intact; else None.

    When no tokenizer was named ("train"), the one already in ``out_dir`` counts as the tokenizer asked for,
    so a re-run does not retrain.
    """
    if not (out_dir / MANIFEST).is_file():
        return None
    manifest = json.loads((out_dir / MANIFEST).read_text())
    tok = None
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer not in (None, "train"):
        tok = load_tokenizer(tokenizer)
    elif (out_dir / TOKENIZER).is_file():
        tok = load_tokenizer(out_dir / TOKENIZER)
    if manifest.get("fingerprint") != _fingerprint(source, tok, options):
        return None
    # sizes only: cheap enough for every start-up on every rank; `verify_prepared` hashes everything
    TokenStore(out_dir, verify="size")
    return manifest


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """Hold an exclusive lock on ``out_dir`` so ranks that all call ``prepare`` run it once: the first prepares,
    the others wait and then find the manifest current."""
    with open(out_dir / ".prepare.lock", "a") as f:  # "a": taking the lock leaves the folder untouched
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    tokenizer_sample_bytes: int | None = None,
    text_field: str = "text",
    split: str = "train",
    num_workers: int = 2,
    shard_tokens: int = 1 << 28,
    max_documents: int | None = None,
    append_eos: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Tokenize ``source`` into ``out_dir``; returns ``out_dir``.

    tokenizer: a ``.model`` path or a ``Tokenizer`` to use, or None to train one (``vocab_size``, ``model_type``,
        ``byte_fallback``, on ``tokenizer_sample_bytes`` of text, None: sized by the vocabulary). Megatron input needs none (ids are kept).
    num_workers: tokenizer processes (1 = in this process).
    shard_tokens: tokens per shard file at most (a longer document gets a shard to itself).
    append_eos: append EOS to every document (for Megatron input: unless it already ends with EOS; needs a tokenizer).
    overwrite: allow replacing a different preparation already in ``out_dir``.
    Several processes may call this at once on one folder: they take turns (a file lock), so it is done once.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        return _prepare_locked(source, out_dir, tokenizer, vocab_size, model_type, byte_fallback,
                               tokenizer_sample_bytes, text_field, split, num_workers, shard_tokens, max_documents,
                               append_eos, overwrite, seed, progress)


def _prepare_locked(source, out_dir, tokenizer, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
                    text_field, split, num_workers, shard_tokens, max_documents, append_eos, overwrite, seed,
                    progress) -> Path:
    src = open_source(source, text_field=text_field, split=split, max_documents=max_documents)
    options = {"append_eos": append_eos, "shard_tokens": shard_tokens, "format": FORMAT}
    if tokenizer in (None, "train") and not isinstance(src, MegatronSource):
        # a trained tokenizer is part of the preparation: other training options mean another preparation
        options["tokenizer_training"] = {"vocab_size": vocab_size, "model_type": model_type,
                                         "byte_fallback": byte_fallback, "sample_bytes": tokenizer_sample_bytes,
                                         "seed": seed}

    current = _existing_is_current(out_dir, src, options, tokenizer)
    if current is not None:
        print(f"[prepare] {out_dir} is already prepared from {source!r} "
              f"({current['num_documents']} documents, {current['num_tokens']} tokens): nothing to do")
        return out_dir
    if (out_dir / MANIFEST).is_file() and not overwrite:
        old = json.loads((out_dir / MANIFEST).read_text())
        raise FileExistsError(
            f"{out_dir} already holds a different preparation (source {old.get('source', {}).get('spec')!r}, "
            f"tokenizer sha256 {str((old.get('tokenizer') or {}).get('sha256'))[:12]}...); pass overwrite=True "
            f"(--overwrite) to replace it, or choose another output folder"
        )
    # from here on the folder is being rebuilt: the old manifest must not outlive its shards
    (out_dir / MANIFEST).unlink(missing_ok=True)
    _clean_partial(out_dir)

    tok = _resolve_tokenizer(src, out_dir, tokenizer, vocab_size, model_type, byte_fallback,
                             tokenizer_sample_bytes, seed)
    if tok is not None:
        tok.save(out_dir / TOKENIZER)
    fingerprint = _fingerprint(src, tok, options)

    t0 = time.time()
    if isinstance(src, MegatronSource):
        shards, documents, dtype, vocab, n_bytes = _write_pretokenized(src, out_dir, tok, shard_tokens, append_eos,
                                                                      progress)
    else:
        if not append_eos:
            raise ValueError("append_eos=False is only meaningful for pre-tokenized (Megatron) input")
        dtype, vocab = token_dtype(tok.vocab_size), tok.vocab_size
        shards, documents, n_bytes = _write_text(src, out_dir, tok, dtype, shard_tokens, num_workers, progress)
    elapsed = time.time() - t0

    doc_sha = save_npy_atomic(out_dir / DOCUMENTS, documents)
    manifest = {
        "format": FORMAT,
        "source": src.describe(),
        "fingerprint": fingerprint,
        "options": options,
        "tokenizer": None if tok is None else {
            "file": TOKENIZER, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id},
        "vocab_size": int(vocab),
        "dtype": np.dtype(dtype).name,
        "num_documents": int(len(documents)),
        "num_tokens": int(documents[:, 1].sum()) if len(documents) else 0,
        "source_bytes": int(n_bytes),
        "shards": shards,
        "documents": {"file": DOCUMENTS, "bytes": (out_dir / DOCUMENTS).stat().st_size, "sha256": doc_sha},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    rate = manifest["num_tokens"] / max(elapsed, 1e-9)
    print(f"[prepare] wrote {manifest['num_documents']} documents, {manifest['num_tokens']} tokens "
          f"({manifest['dtype']}) in {len(shards)} shard(s) to {out_dir} in {elapsed:.1f}s ({rate / 1e6:.2f} M tok/s)")
    return out_dir


def _write_text(src: TextSource, out_dir: Path, tok: Tokenizer, dtype, shard_tokens: int, num_workers: int,
                progress: bool):
    writer = ShardWriter(out_dir, dtype, shard_tokens)
    n_bytes = 0
    bar = tqdm(desc="[prepare] tokenizing", unit="doc", total=src.num_documents(), disable=not progress,
               mininterval=1.0)
    batches = _batches(src.texts(), _BATCH_DOCS)
    if num_workers <= 1:
        _worker_init(tok.model_bytes)
        results = map(_encode_batch, batches)
        pool = None
    else:
        # spawn, not fork: the parent may hold torch / OpenMP threads that a fork would copy half-initialised
        pool = mp.get_context("spawn").Pool(num_workers, initializer=_worker_init, initargs=(tok.model_bytes,))
        results = pool.imap(_encode_batch, batches, chunksize=1)
    try:
        for tokens, lengths, nb in results:
            writer.add(tokens, lengths)
            n_bytes += nb
            bar.update(len(lengths))
            bar.set_postfix_str(f"{n_bytes / 1e6:.1f} MB", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    shards, documents = writer.finish()
    return shards, documents, n_bytes


def _write_pretokenized(src: MegatronSource, out_dir: Path, tok: Tokenizer | None, shard_tokens: int,
                        append_eos: bool, progress: bool):
    """Copy a Megatron corpus's token ids, streaming; EOS is appended only where a tokenizer says what EOS is.
    Without a tokenizer a first pass finds the largest id (vocabulary = largest id + 1) to pick the dtype."""
    if append_eos and tok is None:
        append_eos = False  # no EOS id known: keep the documents exactly as Megatron stored them
    if tok is not None:
        vocab = tok.vocab_size
    else:
        vocab = 1 + max((int(d.max()) for d in src.tokens() if len(d)), default=0)
    dtype = token_dtype(vocab)
    writer = ShardWriter(out_dir, dtype, shard_tokens)

    def documents():
        for d in tqdm(src.tokens(), desc="[prepare] copying Megatron corpus", unit="doc", disable=not progress,
                      mininterval=1.0):
            if not len(d):
                continue
            if int(d.max()) >= vocab:
                raise ValueError(f"Megatron corpus {src.prefix} holds token id {int(d.max())} >= tokenizer vocab "
                                 f"{vocab}: wrong tokenizer for this corpus")
            yield d if not append_eos or d[-1] == tok.eos_id else np.append(d, tok.eos_id)

    for batch in _batches(documents(), 4096):
        writer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
    shards, documents_index = writer.finish()
    return shards, documents_index, dtype, vocab, 0


def verify_prepared(prepared_dir: str | Path, tokenizer: str | Path | Tokenizer | None = None) -> dict:
    """Hash every file of a prepared folder against its manifest (and the tokenizer, if given); returns the manifest.
    Raises ``CorruptCorpusError`` naming the bad file and the fix."""
    sha = None
    if tokenizer is not None:
        sha = (tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)).sha256
    return TokenStore(prepared_dir, verify="sha256", tokenizer_sha256=sha).manifest


__all__ = ["prepare", "verify_prepared", "CorruptCorpusError"]
