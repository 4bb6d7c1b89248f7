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

Sharded preparation, for a corpus too big for one machine (``prepare_shard``, ``merge_shards``):

1. the tokenizer is fixed once, before any shard runs: ``--tokenizer`` given to every shard (the first writes it
   into the output folder, a different one is refused), or ``prepare_tokenizer`` (``--tokenizer-only``) trains it
   into the folder from the whole source, as a one-process preparation would;
2. shard i of N (``--shard I --num-shards N``; any order, any machine, sharing the output folder) tokenizes its
   slice of the source (``sources.slice_source``: contiguous files, or every N-th document of a single file or hub
   dataset) into ``shard_<i:05d>/``, staged like any preparation: killed mid-way it leaves nothing, and re-run it
   writes the same bytes (a shard manifest holds no timestamp); a finished shard re-run is a no-op;
3. ``merge_shards`` (``--merge DIR``) checks that shards 0..N-1 are all there, from one source, one tokenizer and
   the same options, hashes their files against their manifests, and writes one document index and the manifest
   the loaders read, listing the shards' token files by relative path (``shard_00003/tokens_00000.bin``): no token
   is copied. The held-out split (``--holdout-docs``) is chosen here, over the joined index.

The merged folder holds the documents in shard order: for a slice by file that is the source order, so documents,
token stream and DD buckets equal a one-process preparation's exactly; by document it is a permutation (shard 0's
documents 0, N, 2N, ..., then shard 1's), the same multiset, the same tokens and the same DD bucket table.
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

from .shards import DOCUMENTS, FORMAT, HELDOUT, MANIFEST, SHARD_DIR, TOKENIZER, CorruptCorpusError, ShardWriter, \
    TokenStore, file_sha256, read_manifest, save_npy_atomic, token_dtype, write_atomic
from .sources import MegatronSource, TextSource, open_source, slice_source
from .tokenizer import HF_FILE, SP_FILE, TOKENIZER_FILES, TokenizerBase, load_tokenizer, \
    tokenizer_from_payload, train_tokenizer

# documents per task sent to a worker: big enough to amortise pickling, small enough for a smooth progress bar
_BATCH_DOCS = 64

_worker_tok: TokenizerBase | None = None


class OutputFolderError(ValueError):
    """An output folder ``prepare`` must not write: it overlaps the source, or holds files it did not write."""


def _worker_init(payload: tuple) -> None:
    global _worker_tok
    _worker_tok = tokenizer_from_payload(payload)


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
    """Return a tokenizer (or None for pre-tokenized input without one)."""
    if isinstance(tokenizer, TokenizerBase):
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


def _fingerprint(source, tok: TokenizerBase | None, options: dict) -> str:
    items = [source.fingerprint(), tok.fingerprint if tok else "no-tokenizer", json.dumps(options, sort_keys=True)]
    return hashlib.sha256("\0".join(items).encode()).hexdigest()


def _named_tokenizer(tokenizer) -> TokenizerBase | None:
    if isinstance(tokenizer, TokenizerBase):
        return tokenizer
    if tokenizer not in (None, "train"):
        return load_tokenizer(tokenizer)
    return None


def _folder_tokenizer(out_dir: Path) -> TokenizerBase | None:
    """The tokenizer already in ``out_dir`` (``tokenizer.model`` or ``tokenizer.json``), or None if there is none or
    it does not load (damage is reported by the integrity check, not here)."""
    try:
        if (out_dir / SP_FILE).is_file() or (out_dir / HF_FILE).is_file():
            return load_tokenizer(out_dir)
        return None
    except (OSError, ValueError, RuntimeError):
        return None


def _padding_options(manifest: dict, options: dict, folder_tok: TokenizerBase | None,
                     vocab_size: int) -> dict | None:
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
    if isinstance(manifest.get("merged"), dict):  # a merged sharded preparation (prepare --merge)
        return _merged_is_current(out_dir, manifest, source, options, tok)
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


def _merged_is_current(out_dir: Path, manifest: dict, source, options: dict, tok) -> dict | None:
    """A merged sharded preparation is current for ``source`` when it was made from this source (its whole
    fingerprint, recorded by every shard), with the tokenizer named (if one is; else the one it holds: a vocabulary
    asked for is checked against the model by the loader, not here) and the same held-out split."""
    if manifest.get("source_fingerprint") != source.fingerprint():
        return None
    if tok is not None and (manifest.get("tokenizer") or {}).get("sha256") != tok.sha256:
        return None
    if (manifest.get("options") or {}).get("holdout") != options.get("holdout"):
        return None
    TokenStore(out_dir, verify="size")
    return manifest


def _mismatch_error(out_dir: Path, manifest: dict, src, options: dict, tokenizer, vocab_size: int,
                    text_field: str, rerun: tuple | None = None) -> FileExistsError:
    """A different preparation is in ``out_dir``: say what differs and the two ways forward."""
    diffs = []
    old_src = manifest.get("source") or {}
    new_src = src.describe()
    if old_src.get("spec") != new_src["spec"]:
        diffs.append(f"source {old_src.get('spec')!r} there, {new_src['spec']!r} asked for")
    elif new_src.get("kind") == "synthetic" and old_src.get("options") != new_src.get("options"):
        old_o, new_o = old_src.get("options") or {}, new_src.get("options") or {}
        diffs += [f"data.synthetic_{k} {old_o.get(k)!r} there, {new_o.get(k)!r} asked for"
                  for k in sorted(set(old_o) | set(new_o)) if old_o.get(k) != new_o.get(k)]
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
    for key in ("append_eos", "shard_tokens", "format", "holdout"):
        if old_opts.get(key) != options.get(key):
            diffs.append(f"{key} {old_opts.get(key)!r} there, {options.get(key)!r} asked for")
    if not diffs:
        diffs.append(f"the source {new_src['spec']!r} or its files changed since it was prepared")
    out_arg, shard_args = rerun or (out_dir, "")  # a shard: the parent folder and --shard I --num-shards N
    command = f"lightspan prepare --source {new_src['spec']} --out {out_arg}{shard_args}"
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
    if src.kind in ("stdlib", "synthetic"):
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
    """A file or folder that ``prepare`` writes into a prepared folder (or an older version left there); a sharded
    preparation's ``shard_NNNNN/`` folders and their hidden lock files and staging folders included."""
    name = entry.name
    if entry.is_dir():
        return name.startswith("dd_") or SHARD_DIR.fullmatch(name) is not None or name.startswith(".shard_")
    return (name in (MANIFEST, DOCUMENTS, HELDOUT, ".prepare.lock", *TOKENIZER_FILES) or name.endswith(".tmp")
            or name.startswith(".shard_") or (name.startswith("tokens_") and name.endswith(".bin")))


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


def _shard_dirs(target: Path) -> list[Path]:
    return sorted(p for p in target.iterdir() if p.is_dir() and SHARD_DIR.fullmatch(p.name)) \
        if target.is_dir() else []


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


def _holdout_options(holdout_docs: int, holdout: float) -> dict | None:
    if holdout_docs and holdout:
        raise ValueError(f"give a held-out split as a number of documents ({holdout_docs}) or a fraction ({holdout}), "
                         f"not both")
    if not (isinstance(holdout_docs, int) and holdout_docs >= 0):
        raise ValueError(f"--holdout-docs must be a count >= 0, got {holdout_docs!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"the held-out fraction (data.holdout / --holdout) must be in [0, 1), got {holdout!r}")
    if holdout_docs:
        return {"documents": int(holdout_docs)}
    if holdout:
        return {"fraction": float(holdout)}
    return None


def split_holdout(documents: np.ndarray, holdout: dict | None, where) -> tuple[np.ndarray, np.ndarray]:
    """(training documents, held-out documents) of a document index. The held-out documents are M evenly spread
    ones, ``floor((k + 1/2) D / M)`` for k < M, so a corpus sorted by name or date is sampled across its whole
    range, and the rule needs nothing but the index (a merged sharded preparation applies it to the joined one)."""
    if not holdout:
        return documents, np.zeros((0, 2), np.int64)
    n = len(documents)
    m = holdout["documents"] if "documents" in holdout else max(1, round(holdout["fraction"] * n))
    if m >= n:
        raise ValueError(f"{where}: holding out {m} of {n} documents leaves none to train on; hold out fewer "
                         f"(--holdout-docs / data.holdout_docs, or a smaller --holdout / data.holdout)")
    picked = np.zeros(n, bool)
    picked[((np.arange(m) + 0.5) * n / m).astype(np.int64)] = True
    return documents[~picked], documents[picked]


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str | Path | TokenizerBase | None = None,
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
    holdout_docs: int = 0,
    holdout: float = 0.0,
    shard: int | None = None,
    num_shards: int | None = None,
    synthetic: dict | None = None,
) -> Path:
    """Tokenize ``source`` into ``out_dir``; returns ``out_dir``.

    tokenizer: a sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` or a folder holding one, or a loaded
        tokenizer; None to train a sentencepiece one (``vocab_size``, ``model_type``, ``byte_fallback``, on
        ``tokenizer_sample_bytes`` of text, None: sized by the vocabulary). Megatron input needs none (ids are kept).
        When a trained tokenizer is already in ``out_dir``, a larger ``vocab_size`` is taken as vocabulary padding
        (the folder is current) unless ``overwrite``.
    num_workers: tokenizer processes (1 = in this process).
    shard_tokens: tokens per shard file at most (a longer document gets a shard to itself).
    append_eos: append EOS to every document (for Megatron input: unless it already ends with EOS; needs a tokenizer).
    overwrite: allow replacing a different preparation already in ``out_dir`` (staged: the old one stays until
        the new one is complete).
    holdout_docs / holdout: keep that many documents (or that fraction of them) out of the training index
        (``split_holdout``); they are listed in ``heldout.npy`` and no loader reads them.
    shard, num_shards: prepare only shard ``shard`` of ``num_shards`` into ``out_dir/shard_<shard:05d>/``
        (``prepare_shard``); ``merge_shards(out_dir)`` joins them. The held-out split is then the merge's.
    synthetic: the options of a ``synthetic:retrieval`` source (``synthetic.OPTION_NAMES``: seed, documents,
        fraction, ...; the config's ``data.synthetic_*``); its held-out documents come from a disjoint stream.
    Several processes may call this at once on one folder: they take turns (a file lock), so it is done once.
    """
    if shard is not None or num_shards is not None:
        if holdout_docs or holdout:
            raise ValueError("the held-out split of a sharded preparation is chosen when the shards are merged: pass "
                             "--holdout-docs / --holdout to `lightspan prepare --merge DIR`, not to a shard")
        return prepare_shard(source, out_dir, 0 if shard is None else shard, 1 if num_shards is None else num_shards,
                             tokenizer=tokenizer, text_field=text_field, split=split, num_workers=num_workers,
                             shard_tokens=shard_tokens, max_documents=max_documents, overwrite=overwrite,
                             progress=progress)
    holdout_opts = _holdout_options(holdout_docs, holdout)
    out_dir = Path(out_dir)
    target = out_dir.expanduser().resolve()  # a symlinked output folder: work beside the real one
    # refused input touches nothing: the source is checked before the lock file or any folder is created
    src = open_source(source, text_field=text_field, split=split, max_documents=max_documents, synthetic=synthetic)
    if getattr(src, "kind", None) == "synthetic":
        src = src.with_holdout(holdout_opts)  # the documents heldout.npy will list come from the held-out stream
    _refuse_overlap(src, target, out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        _tidy_after_interruption(target)
        options = {"append_eos": append_eos, "shard_tokens": shard_tokens, "format": FORMAT}
        if holdout_opts:
            options["holdout"] = holdout_opts
        if tokenizer in (None, "train") and not isinstance(src, MegatronSource):
            # a trained tokenizer is part of the preparation: other training options mean another preparation
            options["tokenizer_training"] = {"vocab_size": vocab_size, "model_type": model_type,
                                             "byte_fallback": byte_fallback, "sample_bytes": tokenizer_sample_bytes,
                                             "seed": seed}
        if not (target / MANIFEST).is_file() and _shard_dirs(target) and not overwrite:
            names = ", ".join(p.name for p in _shard_dirs(target)[:3])
            raise OutputFolderError(f"{out_dir} holds a sharded preparation that is not merged yet ({names} ...): "
                                    f"run `lightspan prepare --merge {out_dir}` once every shard is done, or choose "
                                    f"another output folder (--overwrite replaces the shards)")
        return _prepare_locked(src, source, out_dir, target, tokenizer, vocab_size, model_type, byte_fallback,
                               tokenizer_sample_bytes, text_field, num_workers, shard_tokens, append_eos,
                               overwrite, seed, progress, options)


def _prepare_locked(src, source, out_dir, target, tokenizer, vocab_size, model_type, byte_fallback,
                    tokenizer_sample_bytes, text_field, num_workers, shard_tokens, append_eos, overwrite, seed,
                    progress, options, extra=None, rerun=None) -> Path:
    """Under ``target``'s lock, after tidying: no-op if current, else build in a staging folder and swap in.
    ``extra``: more manifest keys (a shard's slice; no timestamp then, so a re-run writes identical bytes);
    ``rerun``: (--out, extra arguments) for the mismatch message of a shard."""
    current = _existing_is_current(target, src, options, tokenizer, vocab_size, overwrite)
    if current is not None:
        print(f"[prepare] {out_dir} is already prepared from {source!r} "
              f"({current['num_documents']} documents, {current['num_tokens']} tokens): nothing to do")
        return out_dir
    if (target / MANIFEST).is_file() and not overwrite:
        TokenStore(target, verify="size")  # a damaged folder: say so (and how to rebuild) rather than "different"
        raise _mismatch_error(out_dir, read_manifest(target), src, options, tokenizer, vocab_size, text_field, rerun)
    _refuse_foreign(target, out_dir)

    staging = target.with_name(f".{target.name}.prepare-{_tag()}")
    staging.mkdir()
    try:
        manifest = _build(src, staging, tokenizer, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
                          num_workers, shard_tokens, append_eos, options, seed, progress, extra)
        _swap_in(staging, target)
    finally:
        if staging.exists():  # failed or interrupted: the output folder was not touched
            shutil.rmtree(staging, ignore_errors=True)
    rate = manifest["num_tokens"] / max(manifest.pop("_seconds"), 1e-9)
    held = manifest.get("heldout")
    print(f"[prepare] wrote {manifest['num_documents']} documents, {manifest['num_tokens']} tokens "
          f"({manifest['dtype']}) in {len(manifest['shards'])} shard(s) to {out_dir} ({rate / 1e6:.2f} M tok/s)"
          + (f"; held out {held['num_documents']} documents, {held['num_tokens']} tokens" if held else ""))
    return out_dir


def _write_index(out_dir: Path, documents: np.ndarray, holdout: dict | None, where) -> dict:
    """documents.npy (the training documents) and, with a held-out split, heldout.npy; their manifest entries."""
    train, held = split_holdout(documents, holdout, where)
    doc_sha = save_npy_atomic(out_dir / DOCUMENTS, train)
    entries = {
        "num_documents": int(len(train)),
        "num_tokens": int(train[:, 1].sum()) if len(train) else 0,
        "documents": {"file": DOCUMENTS, "bytes": (out_dir / DOCUMENTS).stat().st_size, "sha256": doc_sha},
    }
    if holdout:
        held_sha = save_npy_atomic(out_dir / HELDOUT, held)
        entries["heldout"] = {"file": HELDOUT, "bytes": (out_dir / HELDOUT).stat().st_size, "sha256": held_sha,
                              "num_documents": int(len(held)), "num_tokens": int(held[:, 1].sum()),
                              "rule": "evenly spread: documents floor((k + 1/2) D / M), k < M"}
    return entries


def _build(src, out_dir: Path, tokenizer, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
           num_workers, shard_tokens, append_eos, options, seed, progress, extra=None) -> dict:
    """Write a whole preparation into ``out_dir`` (the staging folder), manifest last; returns the manifest."""
    if not append_eos and not isinstance(src, MegatronSource):
        raise ValueError("append_eos=False is only meaningful for pre-tokenized (Megatron) input")
    tok = _resolve_tokenizer(src, out_dir, tokenizer, vocab_size, model_type, byte_fallback,
                             tokenizer_sample_bytes, seed)
    if tok is not None and not (extra and "slice" in extra):  # a shard's tokenizer lives in the parent folder
        tok.save_into(out_dir)
    fingerprint = _fingerprint(src, tok, options)

    t0 = time.time()
    if isinstance(src, MegatronSource):
        shards, documents, dtype, vocab, n_bytes = _write_pretokenized(src, out_dir, tok, shard_tokens, append_eos,
                                                                      progress)
    elif getattr(src, "kind", None) == "synthetic":  # generated at the token level: exact lengths and distances
        from .synthetic import write_synthetic

        dtype, vocab = token_dtype(tok.vocab_size), tok.vocab_size
        shards, documents, n_bytes = write_synthetic(src, out_dir, tok, dtype, shard_tokens, progress)
    else:
        dtype, vocab = token_dtype(tok.vocab_size), tok.vocab_size
        shards, documents, n_bytes = _write_text(src, out_dir, tok, dtype, shard_tokens, num_workers, progress)
    elapsed = time.time() - t0

    index = _write_index(out_dir, documents, options.get("holdout"), out_dir)
    tok_record = None
    if tok is not None:
        tok_record = tok.record()
        if extra and "slice" in extra:
            tok_record = None  # the shard folder holds no tokenizer file: the record sits in `slice`
    manifest = {
        "format": FORMAT,
        "source": src.describe(),
        "source_fingerprint": src.fingerprint(),
        "fingerprint": fingerprint,
        "options": options,
        "tokenizer": tok_record,
        "vocab_size": int(vocab),
        "dtype": np.dtype(dtype).name,
        "num_documents": index.pop("num_documents"),
        "num_tokens": index.pop("num_tokens"),
        "source_bytes": int(n_bytes),
        "shards": shards,
        **index,
    }
    if extra:
        manifest.update(extra)
    else:
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return dict(manifest, _seconds=elapsed)


# ------------------------------------------------------------------------------------------------------------
# sharded preparation: one tokenizer, N shards (each on its own), one merge
# ------------------------------------------------------------------------------------------------------------
def _install_tokenizer(target: Path, out_dir: Path, tokenizer) -> TokenizerBase:
    """The one tokenizer of a sharded preparation, in ``target`` (the parent folder): the one named (written into
    ``target`` by the first shard; a different one already there is refused), else the one already there (from
    ``lightspan prepare --tokenizer-only``); neither: refused with both ways to fix it."""
    named = _named_tokenizer(tokenizer)
    with _exclusive(target):
        there = _folder_tokenizer(target)
        if named is None:
            if there is None:
                raise ValueError(
                    f"a sharded preparation needs its tokenizer fixed before the shards run (every shard must use the "
                    f"same one), and {out_dir} holds none: pass --tokenizer PATH (a .model, a tokenizer.json or its "
                    f"folder) to every shard, or train it once first with `lightspan prepare --source ... --out "
                    f"{out_dir} --tokenizer-only --vocab-size V`")
            return there
        if there is not None and there.fingerprint != named.fingerprint:
            raise ValueError(f"{out_dir} already holds another tokenizer ({there.file_name}, sha256 "
                             f"{there.sha256[:12]}..., {there.vocab_size} ids) than the one given ({named.path}, sha256 "
                             f"{named.sha256[:12]}..., {named.vocab_size} ids): every shard must use one tokenizer; "
                             f"pass the same --tokenizer to every shard, or use a new output folder")
        if there is None:
            named.save_into(target)
        return named


def prepare_shard(source: str, out_dir: str | Path, shard: int, num_shards: int, tokenizer=None,
                  text_field: str = "text", split: str = "train", num_workers: int = 2, shard_tokens: int = 1 << 28,
                  max_documents: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Tokenize shard ``shard`` of ``num_shards`` of ``source`` (``sources.slice_source``) into
    ``out_dir/shard_<shard:05d>/``, a prepared folder of its own (tokens, document index, manifest; the tokenizer
    stays in ``out_dir``). Staged like ``prepare``: a shard killed mid-way leaves nothing, and re-running it
    rebuilds it byte-identical (no timestamp in a shard manifest); a complete shard re-run is a no-op. Returns the
    shard folder."""
    out_dir = Path(out_dir)
    target = out_dir.expanduser().resolve()
    src = open_source(source, text_field=text_field, split=split, max_documents=max_documents)
    part = slice_source(src, shard, num_shards)
    _refuse_overlap(src, target, out_dir)
    target.mkdir(parents=True, exist_ok=True)
    if (target / MANIFEST).is_file() and not isinstance(read_manifest(target).get("merged"), dict):
        raise OutputFolderError(f"{out_dir} holds a one-process preparation (its manifest.json is not a merge of "
                                f"shards): shards go into a folder of their own; choose another --out")
    tok = _install_tokenizer(target, out_dir, tokenizer)
    name = f"shard_{shard:05d}"
    # the whole source's fingerprint is part of every shard's: file boundaries depend on every file's size
    options = {"append_eos": True, "shard_tokens": shard_tokens, "format": FORMAT,
               "slice": {"num_shards": num_shards, "source_fingerprint": src.fingerprint()}}
    extra = {"slice": {"shard": shard, "num_shards": num_shards, "slice_by": part.slice_by,
                       "source": src.describe(), "source_fingerprint": src.fingerprint(),
                       "tokenizer": tok.record()}}
    shard_dir = target / name
    with _exclusive(shard_dir):
        _tidy_after_interruption(shard_dir)
        _prepare_locked(part, source, out_dir / name, shard_dir, tok, tok.vocab_size, "bpe", True, None, text_field,
                        num_workers, shard_tokens, True, overwrite, 0, progress, options, extra=extra,
                        rerun=(out_dir, f" --shard {shard} --num-shards {num_shards}"))
    return out_dir / name


def prepare_tokenizer(source: str, out_dir: str | Path, vocab_size: int = 8192, model_type: str = "bpe",
                      byte_fallback: bool = True, tokenizer_sample_bytes: int | None = None, text_field: str = "text",
                      split: str = "train", max_documents: int | None = None, seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Train the one sentencepiece tokenizer of a sharded preparation into ``out_dir/tokenizer.model``, from the
    whole source (the same sample ``prepare`` would train on), before the shards run. A tokenizer already there is
    kept unless ``overwrite``. Returns its path."""
    out_dir = Path(out_dir)
    target = out_dir.expanduser().resolve()
    src = open_source(source, text_field=text_field, split=split, max_documents=max_documents)
    if isinstance(src, MegatronSource):
        raise ValueError(f"source {source!r} is a Megatron corpus, already tokenized: it needs no tokenizer")
    _refuse_overlap(src, target, out_dir)
    target.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        there = _folder_tokenizer(target)
        if there is not None and not overwrite:
            print(f"[prepare] {out_dir} already holds a tokenizer ({there.file_name}, {there.vocab_size} ids, sha256 "
                  f"{there.sha256[:12]}): kept (--overwrite trains a new one; shards made with the old one then "
                  f"fail the merge)")
            return target / there.file_name
        for name in TOKENIZER_FILES:
            (target / name).unlink(missing_ok=True)
        tok = _resolve_tokenizer(src, target, None, vocab_size, model_type, byte_fallback, tokenizer_sample_bytes,
                                 seed)
    return target / tok.file_name


def merge_shards(out_dir: str | Path, holdout_docs: int = 0, holdout: float = 0.0, check: str = "sha256",
                 workers: int = 2) -> Path:
    """Join ``out_dir/shard_*/`` into one prepared folder: check that the shards are shards 0..N-1 of one source
    made with one tokenizer (the one in ``out_dir``), that every shard's files match its manifest (``check``:
    "sha256", hashed with ``workers`` threads, or "size"), then write ``documents.npy`` (the shards' document
    indexes joined, in shard order; the held-out split chosen over the joined index), and ``manifest.json`` last,
    listing the shards' token files by relative path. No token is copied. A missing, unfinished, foreign or damaged
    shard is refused, naming it and the command that rebuilds it. Re-running on unchanged shards is a no-op."""
    from concurrent.futures import ThreadPoolExecutor

    if check not in ("sha256", "size"):
        raise ValueError(f"check must be 'sha256' or 'size', not {check!r}")
    holdout_opts = _holdout_options(holdout_docs, holdout)
    out_dir = Path(out_dir)
    target = out_dir.expanduser().resolve()
    if not target.is_dir():
        raise FileNotFoundError(f"{out_dir} does not exist: nothing to merge (run `lightspan prepare ... --out "
                                f"{out_dir} --shard I --num-shards N` first)")
    with _exclusive(target):
        dirs = _shard_dirs(target)
        if not dirs:
            raise FileNotFoundError(f"{out_dir} holds no shard_NNNNN/ folders: run `lightspan prepare --source ... "
                                    f"--out {out_dir} --shard I --num-shards N` for every shard first")
        manifests = {}
        for d in dirs:
            if not (d / MANIFEST).is_file():
                raise CorruptCorpusError(f"shard {d.name} of {out_dir} is not finished (no {d.name}/{MANIFEST}): "
                                         f"re-run it (`lightspan prepare ... --out {out_dir} --shard "
                                         f"{int(d.name[6:])} --num-shards N`), then merge again")
            manifests[d.name] = read_manifest(d)
        first = next(iter(manifests.values()))
        sl = first.get("slice")
        if not isinstance(sl, dict) or not isinstance(sl.get("num_shards"), int):
            raise CorruptCorpusError(f"{dirs[0] / MANIFEST} has no shard record ('slice'): not written by "
                                     f"`lightspan prepare --shard`; remove {dirs[0]} or use another folder")
        n = sl["num_shards"]
        spec = (sl.get("source") or {}).get("spec", "...")
        rebuild = f"`lightspan prepare --source {spec} --out {out_dir} --shard {{i}} --num-shards {n}`"
        expected = [f"shard_{i:05d}" for i in range(n)]
        missing = [e for e in expected if e not in manifests]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CorruptCorpusError(f"shard {missing[0]}{more} of {n} is missing from {out_dir}: run "
                                     + rebuild.format(i=int(missing[0][6:])) + " then merge again")
        for name, m in manifests.items():
            s2 = m.get("slice") or {}
            if name not in expected or s2.get("num_shards") != n or s2.get("shard") != int(name[6:]):
                raise CorruptCorpusError(f"{out_dir}/{name} is not shard {name[6:]} of {n} (its manifest says shard "
                                         f"{s2.get('shard')} of {s2.get('num_shards')}): left from another "
                                         f"preparation; remove it, or re-run all shards with one --num-shards")
            for key in ("source_fingerprint",):
                if s2.get(key) != sl.get(key):
                    raise CorruptCorpusError(f"{out_dir}/{name} was made from another source (or the source changed "
                                             f"since shard_00000 was made): re-run " + rebuild.format(i=int(name[6:]))
                                             + " --overwrite")
            if (s2.get("tokenizer") or {}).get("sha256") != (sl.get("tokenizer") or {}).get("sha256") or \
                    m["dtype"] != first["dtype"] or m.get("options") != first.get("options"):
                raise CorruptCorpusError(f"{out_dir}/{name} was made with another tokenizer or options than "
                                         f"shard_00000: re-run " + rebuild.format(i=int(name[6:])) + " --overwrite")
        tok = _folder_tokenizer(target)
        want = (sl.get("tokenizer") or {}).get("sha256")
        if tok is None or tok.sha256 != want:
            raise CorruptCorpusError(f"the tokenizer in {out_dir} ({'none' if tok is None else tok.sha256[:12] + '...'}) "
                                     f"is not the one the shards were made with (sha256 {str(want)[:12]}...): restore "
                                     f"it, or re-run every shard with --tokenizer and --overwrite")

        shard_sha = {name: file_sha256(target / name / MANIFEST) for name in expected}
        if (target / MANIFEST).is_file():
            try:
                old = read_manifest(target)
            except CorruptCorpusError:
                old = {}
            merged = old.get("merged") or {}
            if ([s.get("manifest_sha256") for s in merged.get("shards", [])] == [shard_sha[e] for e in expected]
                    and (old.get("options") or {}).get("holdout") == holdout_opts):
                TokenStore(target, verify="size")
                print(f"[prepare] {out_dir} is already merged from these {n} shards: nothing to do")
                return out_dir

        def verify(name: str) -> None:
            try:
                TokenStore(target / name, verify=check)
            except CorruptCorpusError as e:
                raise CorruptCorpusError(f"shard {name} of {out_dir} is damaged: {e}") from None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(verify, expected))

        (target / MANIFEST).unlink(missing_ok=True)  # a merge that fails from here on leaves no stale manifest
        shards, docs, offset = [], [], 0
        for name in expected:
            m = manifests[name]
            for rec in m["shards"]:
                shards.append(dict(rec, file=f"{name}/{rec['file']}"))
            index = np.load(target / name / m["documents"]["file"])
            docs.append(index + np.array([offset, 0], np.int64))
            offset += sum(r["num_tokens"] for r in m["shards"])
        documents = np.concatenate(docs) if docs else np.zeros((0, 2), np.int64)
        options = {k: v for k, v in (first.get("options") or {}).items() if k != "slice"}
        if holdout_opts:
            options["holdout"] = holdout_opts
        index = _write_index(target, documents, holdout_opts, out_dir)
        source = {k: v for k, v in (sl.get("source") or {}).items()}
        fingerprint = hashlib.sha256("\0".join([*(manifests[e]["fingerprint"] for e in expected),
                                                json.dumps(options, sort_keys=True)]).encode()).hexdigest()
        manifest = {
            "format": FORMAT,
            "source": source,
            "source_fingerprint": sl["source_fingerprint"],
            "fingerprint": fingerprint,
            "options": options,
            "tokenizer": dict(sl["tokenizer"], file=tok.file_name),
            "vocab_size": first["vocab_size"],
            "dtype": first["dtype"],
            "num_documents": index.pop("num_documents"),
            "num_tokens": index.pop("num_tokens"),
            "source_bytes": sum(manifests[e].get("source_bytes", 0) for e in expected),
            "shards": shards,
            **index,
            "merged": {"num_shards": n, "slice_by": sl.get("slice_by"),
                       "order": "shard order: shard 0's documents, then shard 1's, ...",
                       "shards": [{"dir": e, "manifest_sha256": shard_sha[e],
                                   "num_documents": manifests[e]["num_documents"],
                                   "num_tokens": manifests[e]["num_tokens"]} for e in expected]},
        }
        write_atomic(target / MANIFEST, json.dumps(manifest, indent=1).encode())
    held = manifest.get("heldout")
    print(f"[prepare] merged {n} shards into {out_dir}: {manifest['num_documents']} documents, "
          f"{manifest['num_tokens']} tokens in {len(shards)} token file(s), none copied"
          + (f"; held out {held['num_documents']} documents" if held else ""))
    return out_dir


def _write_text(src: TextSource, out_dir: Path, tok: TokenizerBase, dtype, shard_tokens: int, num_workers: int,
                progress: bool):
    writer = ShardWriter(out_dir, dtype, shard_tokens)
    n_bytes = 0
    bar = tqdm(desc="[prepare] tokenizing", unit="doc", total=src.num_documents(), disable=not progress,
               mininterval=1.0)
    batches = _batches(src.texts(), _BATCH_DOCS)
    if num_workers <= 1:
        _worker_init(tok.payload())
        results = map(_encode_batch, batches)
        pool = None
    else:
        # spawn, not fork: the parent may hold torch / OpenMP threads that a fork would copy half-initialised
        pool = mp.get_context("spawn").Pool(num_workers, initializer=_worker_init, initargs=(tok.payload(),))
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


def _write_pretokenized(src: MegatronSource, out_dir: Path, tok: TokenizerBase | None, shard_tokens: int,
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


def verify_prepared(prepared_dir: str | Path, tokenizer: str | Path | TokenizerBase | None = None) -> dict:
    """Hash every file of a prepared folder against its manifest (and the tokenizer, if given); returns the manifest.
    Raises ``CorruptCorpusError`` naming the bad file and the fix."""
    sha = None
    if tokenizer is not None:
        sha = (tokenizer if isinstance(tokenizer, TokenizerBase) else load_tokenizer(tokenizer)).sha256
    return TokenStore(prepared_dir, verify="sha256", tokenizer_sha256=sha).manifest


__all__ = ["prepare", "prepare_shard", "prepare_tokenizer", "merge_shards", "split_holdout", "verify_prepared",
           "CorruptCorpusError"]
