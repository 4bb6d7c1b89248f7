"""``prepare``: source -> tokenizer -> token shards + document index + manifest, in parallel, restartable.

Re-running on the same input with the same options is a no-op (the manifest's fingerprint matches and its files
are intact). Output order is the source order whatever the number of workers (ordered ``imap``), so the same input
always gives byte-identical shards.

Every preparation is staged: it is built in a hidden sibling folder ``.<name>.prepare-<host>-<pid>`` and swapped
in (an atomic exchange of the two folders where the file system allows it, else two renames) only when complete.
So a failed or interrupted run (a bad source, Ctrl-C, a full disk) leaves the previous preparation in the output
folder byte-identical, and leaves no partial one: its staging folder is removed on the way out, or by the next
run if the process was killed. The lock that makes concurrent ``prepare`` calls take turns is a sibling file too
(``.<name>.prepare.lock``), so the swap does not move it.

Careless input is refused before anything is written, with one sentence naming the cause and the fix: an output
folder that is, contains or lies inside the source; an output folder holding files ``prepare`` did not write; a
different preparation already in the folder without ``overwrite`` (naming what differs: the source, the
tokenizer's vocabulary size there and the one asked for, other options); see ``sources`` for unreadable input.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .shards import DOCUMENTS, FORMAT, MANIFEST, TOKENIZER, CorruptCorpusError, ShardWriter, TokenStore, \
    read_manifest, save_npy_atomic, token_dtype, write_atomic
from .sources import MegatronSource, TextSource, open_source
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# documents per task sent to a worker: big enough to amortise pickling, small enough for a smooth progress bar
_BATCH_DOCS = 64

_worker_tok: Tokenizer | None = None


class OutputFolderError(ValueError):
    """An output folder ``prepare`` must not write: it overlaps the source, or holds files it did not write."""


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


def _named_tokenizer(tokenizer) -> Tokenizer | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer not in (None, "train"):
        return load_tokenizer(tokenizer)
    return None


def _folder_tokenizer(out_dir: Path) -> Tokenizer | None:
    """The tokenizer already in ``out_dir``, or None if there is none or it does not load (damage is reported by
    the integrity check, not here)."""
    try:
        return load_tokenizer(out_dir / TOKENIZER) if (out_dir / TOKENIZER).is_file() else None
    except (OSError, ValueError, RuntimeError):
        return None


def _padding_options(manifest: dict, options: dict, folder_tok: Tokenizer | None, vocab_size: int) -> dict | None:
    """The options under which the folder counts as current when the vocabulary asked for only pads the folder's
    trained tokenizer (``vocab_size`` > its vocabulary: a model may have more ids than its tokenizer); else None."""
    asked = options.get("tokenizer_training")
    recorded = (manifest.get("options") or {}).get("tokenizer_training")
    if folder_tok is None or not asked or not isinstance(recorded, dict) or "vocab_size" not in recorded:
        return None
    if vocab_size <= folder_tok.vocab_size:
        return None
    return dict(options, tokenizer_training=dict(asked, vocab_size=recorded["vocab_size"]))


def _existing_is_current(out_dir: Path, source, options: dict, tokenizer, vocab_size: int,
                         overwrite: bool) -> dict | None:
    """The manifest if ``out_dir`` already holds this exact preparation, intact; else None.

    When no tokenizer was named ("train"), the one already in ``out_dir`` counts as the tokenizer asked for,
    so a re-run does not retrain; and a larger ``vocab_size`` than that tokenizer's is vocabulary padding, not
    another preparation (unless ``overwrite``: then a tokenizer of the new size is trained).
    """
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except CorruptCorpusError:
        if overwrite:
            return None  # replaced below
        raise
    tok = _named_tokenizer(tokenizer)
    folder_tok = _folder_tokenizer(out_dir) if tok is None else None
    recorded = manifest.get("fingerprint")
    if recorded != _fingerprint(source, tok or folder_tok, options):
        padded = None if overwrite else _padding_options(manifest, options, folder_tok, vocab_size)
        if padded is None or recorded != _fingerprint(source, folder_tok, padded):
            return None
        print(f"[prepare] {out_dir} holds a {folder_tok.vocab_size}-id tokenizer; vocabulary {vocab_size} is taken as "
              f"padding of it (ids {folder_tok.vocab_size}..{vocab_size - 1} never occur in the data); pass "
              f"--overwrite to train a {vocab_size}-id tokenizer instead")
    # sizes only: cheap enough for every start-up on every rank; `verify_prepared` hashes everything
    TokenStore(out_dir, verify="size")
    return manifest


def _mismatch_error(out_dir: Path, manifest: dict, src, options: dict, tokenizer, vocab_size: int,
                    text_field: str) -> FileExistsError:
    """A different preparation is in ``out_dir``: say what differs and the two ways forward."""
    diffs = []
    old_src = manifest.get("source") or {}
    new_src = src.describe()
    if old_src.get("spec") != new_src["spec"]:
        diffs.append(f"source {old_src.get('spec')!r} there, {new_src['spec']!r} asked for")
    elif manifest.get("source_fingerprint") not in (None, src.fingerprint()):
        diffs.append(f"the source {new_src['spec']!r} changed since it was prepared (file sizes or times)")
    elif old_src.get("text_field") != new_src.get("text_field"):
        diffs.append(f"text field {old_src.get('text_field')!r} there, {new_src.get('text_field')!r} asked for")
    old_opts = manifest.get("options") or {}
    old_train, new_train = old_opts.get("tokenizer_training"), options.get("tokenizer_training")
    old_tok = manifest.get("tokenizer") or {}
    named = _named_tokenizer(tokenizer)
    if named is not None:
        if old_tok.get("sha256") != named.sha256:
            diffs.append(f"tokenizer sha256 {str(old_tok.get('sha256'))[:12]}... there ({old_tok.get('vocab_size')} "
                         f"ids), the tokenizer given has sha256 {named.sha256[:12]}... ({named.vocab_size} ids)")
    elif new_train and isinstance(old_train, dict):
        for key in sorted(set(old_train) | set(new_train)):
            if old_train.get(key) == new_train.get(key):
                continue
            if key == "vocab_size":
                there = old_tok.get("vocab_size", old_train.get("vocab_size"))
                diffs.append(f"the tokenizer there has a vocabulary of {there}, a vocabulary of {vocab_size} was "
                             f"asked for (model.vocab_size / --vocab-size)"
                             + (": a model cannot embed a larger tokenizer's ids" if vocab_size < there else ""))
            else:
                diffs.append(f"tokenizer {key} {old_train.get(key)!r} there, {new_train.get(key)!r} asked for")
    elif new_train and old_tok:
        diffs.append(f"the folder was prepared with a given tokenizer (sha256 {str(old_tok.get('sha256'))[:12]}...), "
                     f"and training one (vocabulary {vocab_size}) was asked for")
    for key in ("append_eos", "shard_tokens", "format"):
        if old_opts.get(key) != options.get(key):
            diffs.append(f"{key} {old_opts.get(key)!r} there, {options.get(key)!r} asked for")
    if not diffs:
        diffs.append(f"the source {new_src['spec']!r} or its files changed since it was prepared")
    command = f"lightspan prepare --source {new_src['spec']} --out {out_dir}"
    if named is not None:
        command += f" --tokenizer {named.path or '...'}"
    elif new_train:
        command += f" --vocab-size {vocab_size}"
    if text_field != "text":
        command += f" --text-field {text_field}"
    return FileExistsError(
        f"{out_dir} already holds a different preparation: {'; '.join(diffs)}. Either use a new folder for this "
        f"one (data.prepared_dir in the config, or --out), or replace this one (pass overwrite=True): "
        f"`{command} --overwrite`"
    )


@contextlib.contextmanager
def _exclusive(target: Path):
    """Hold an exclusive lock beside ``target`` so ranks that all call ``prepare`` run it once: the first
    prepares, the others wait and then find the manifest current. The lock file is a sibling, not inside the
    folder, so swapping a new preparation in does not change the file the lock is on. Where the lock cannot be
    created (a read-only parent), go on without it: a current folder is still usable, and building will fail with
    the file system's own error."""
    try:
        f = open(target.parent / f".{target.name}.prepare.lock", "a")  # "a": taking the lock changes nothing
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source_paths(src) -> list[Path]:
    """The local paths a source reads (resolved), for the overlap check."""
    if isinstance(src, MegatronSource):
        return [Path(src.prefix + suffix).resolve() for suffix in (".bin", ".idx")]
    if src.kind == "stdlib":
        import sysconfig
        return [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    if src.kind == "files":
        return [Path(src.spec).expanduser().resolve()] + [f.resolve() for f in src.files]
    return []


def _refuse_overlap(src, target: Path, out_dir: Path) -> None:
    for path in _source_paths(src):
        if path == target:
            raise OutputFolderError(f"the output folder {out_dir} is the source {src.spec!r}: preparing would "
                                    f"replace its own input; choose another output folder")
        if target in path.parents:
            raise OutputFolderError(f"the output folder {out_dir} contains the source {path}: preparing replaces "
                                    f"the whole output folder and would delete its input; choose an output folder "
                                    f"outside the source")
        if path in target.parents:
            raise OutputFolderError(f"the output folder {out_dir} is inside the source folder {path}: the prepared "
                                    f"files would become part of the source; choose an output folder outside it")


def _ours(entry: Path) -> bool:
    """A file or folder that ``prepare`` writes into a prepared folder (or an older version left there)."""
    name = entry.name
    if entry.is_dir():
        return name.startswith("dd_")
    return (name in (MANIFEST, TOKENIZER, DOCUMENTS, ".prepare.lock") or name.endswith(".tmp")
            or (name.startswith("tokens_") and name.endswith(".bin")))


def _refuse_foreign(target: Path, out_dir: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputFolderError(f"the output {out_dir} is a file, not a folder; choose a folder")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if not _ours(p))
    if foreign:
        names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"the output folder {out_dir} holds files that prepare did not write ({names}): a preparation replaces "
            f"the whole folder; move them out, or choose a new or empty output folder"
        )


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _tidy_after_interruption(target: Path) -> None:
    """Run under the lock, before anything else: put back a previous preparation that a killed swap left aside
    (only possible without an atomic exchange), then remove the staging folders of killed runs."""
    has_manifest = (target / MANIFEST).is_file()
    for old in _siblings(target, "old"):
        if not has_manifest and (old / MANIFEST).is_file() and (not target.exists() or not any(target.iterdir())):
            if target.exists():
                target.rmdir()
            os.rename(old, target)
            has_manifest = True
            print(f"[prepare] restored the previous preparation of {target} from {old} (a swap was interrupted)")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for staging in _siblings(target, "prepare"):
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two folders (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete preparation in ``staging`` at ``target``; the old folder, if any, is removed after."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # rename(2) replaces an empty folder
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old preparation
        return
    old = target.with_name(f".{target.name}.old-{_tag()}")
    os.rename(target, old)  # interrupted right here: the next run restores `old` (_tidy_after_interruption)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


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
        When a trained tokenizer is already in ``out_dir``, a larger ``vocab_size`` is taken as vocabulary padding
        (the folder is current) unless ``overwrite``.
    num_workers: tokenizer processes (1 = in this process).
    shard_tokens: tokens per shard file at most (a longer document gets a shard to itself).
    append_eos: append EOS to every document (for Megatron input: unless it already ends with EOS; needs a tokenizer).
    overwrite: allow replacing a different preparation already in ``out_dir`` (staged: the old one stays until
        the new one is complete).
    Several processes may call this at once on one folder: they take turns (a file lock), so it is done once.
    """
    out_dir = Path(out_dir)
    target = out_dir.expanduser().resolve()  # a symlinked output folder: work beside the real one
    # refused input touches nothing: the source is checked before the lock file or any folder is created
    src = open_source(source, text_field=text_field, split=split, max_documents=max_documents)
    _refuse_overlap(src, target, out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        return _prepare_locked(src, source, out_dir, target, tokenizer, vocab_size, model_type, byte_fallback,
                               tokenizer_sample_bytes, text_field, num_workers, shard_tokens, append_eos,
                               overwrite, seed, progress)


def _prepare_locked(src, source, out_dir, target, tokenizer, vocab_size, model_type, byte_fallback,
                    tokenizer_sample_bytes, text_field, num_workers, shard_tokens, append_eos, overwrite, seed,
                    progress) -> Path:
    _tidy_after_interruption(target)
    options = {"append_eos": append_eos, "shard_tokens": shard_tokens, "format": FORMAT}
    if tokenizer in (None, "train") and not isinstance(src, MegatronSource):
        # a trained tokenizer is part of the preparation: other training options mean another preparation
        options["tokenizer_training"] = {"vocab_size": vocab_size, "model_type": model_type,
                                         "byte_fallback": byte_fallback, "sample_bytes": tokenizer_sample_bytes,
                                         "seed": seed}

    current = _existing_is_current(target, src, options, tokenizer, vocab_size, overwrite)
    if current is not None:
        print(f"[prepare] {out_dir} is already prepared from {source!r} "
              f"({current['num_documents']} documents, {current['num_tokens']} tokens): nothing to do")
        return out_dir
    if (target / MANIFEST).is_file() and not overwrite:
        TokenStore(target, verify="size")  # a damaged folder: say so (and how to rebuild) rather than "different"
        raise _mismatch_error(out_dir, read_manifest(target), src, options, tokenizer, vocab_size, text_field)
    _refuse_foreign(target, out_dir)

    staging = target.with_name(f".{target.name}.prepare-{_tag()}")
    staging.mkdir()
    try:
        manifest = _build(src, staging, tokenizer, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
                          num_workers, shard_tokens, append_eos, options, seed, progress)
        _swap_in(staging, target)
    finally:
        if staging.exists():  # failed or interrupted: the output folder was not touched
            shutil.rmtree(staging, ignore_errors=True)
    rate = manifest["num_tokens"] / max(manifest.pop("_seconds"), 1e-9)
    print(f"[prepare] wrote {manifest['num_documents']} documents, {manifest['num_tokens']} tokens "
          f"({manifest['dtype']}) in {len(manifest['shards'])} shard(s) to {out_dir} ({rate / 1e6:.2f} M tok/s)")
    return out_dir


def _build(src, out_dir: Path, tokenizer, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
           num_workers, shard_tokens, append_eos, options, seed, progress) -> dict:
    """Write a whole preparation into ``out_dir`` (the staging folder), manifest last; returns the manifest."""
    if not append_eos and not isinstance(src, MegatronSource):
        raise ValueError("append_eos=False is only meaningful for pre-tokenized (Megatron) input")
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
        dtype, vocab = token_dtype(tok.vocab_size), tok.vocab_size
        shards, documents, n_bytes = _write_text(src, out_dir, tok, dtype, shard_tokens, num_workers, progress)
    elapsed = time.time() - t0

    doc_sha = save_npy_atomic(out_dir / DOCUMENTS, documents)
    manifest = {
        "format": FORMAT,
        "source": src.describe(),
        "source_fingerprint": src.fingerprint(),
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
    return dict(manifest, _seconds=elapsed)


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
