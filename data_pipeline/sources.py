"""Where documents come from: the embedded stdlib corpus, local files, a hub dataset, a Megatron corpus.

A source is opened from one string:

- ``"stdlib"``: the Python standard library's own ``.py`` files, found at run time under
  ``sysconfig.get_paths()["stdlib"]`` (sorted, ``site-packages`` skipped, one file = one document).
- a local file or folder of ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` files, read through Hugging Face
  ``datasets`` (the ``text_field`` column, ``"text"`` by default; a ``.txt`` file is one document).
- a Megatron indexed dataset (``prefix.bin`` + ``prefix.idx``, given as the prefix, either file, or
  ``"megatron:PREFIX"``): already tokenized, so it yields token arrays instead of text.
- ``"synthetic:retrieval"``: generated long-context retrieval documents over the stdlib corpus (``synthetic.py``;
  its options come as ``open_source(..., synthetic={...})``, from the config's ``data.synthetic_*``).
- anything else is taken as a Hugging Face hub dataset name (``"name"``, ``"owner/name"``, ``"name:config"``),
  which needs a network. A spec that can only be a path (it starts with ``/``, ``.`` or ``~``, has more than one
  ``/`` or a backslash, ends in a file suffix such as ``.jsonl``, or its folder part exists here) and does not exist
  is refused with "no such file", never sent to the hub.

Input that cannot be read is refused with one sentence naming the file and the fix (``SourceError``, a
``ValueError``): an empty file, bytes that are not UTF-8 (with the line and byte offset of the first), a JSON line
that does not parse (with its line number), a missing or non-text column, a source that yields no documents.

Every source reports ``describe()`` (recorded in the manifest) and ``fingerprint()`` (what decides whether a
re-run of ``prepare`` has anything to do).

``slice_source(src, i, n)`` is shard i of n of a text source, for sharded preparation: by file when the source has
at least n files (contiguous runs of the sorted files, balanced by bytes, each shard at least one file: the
shards in order are the source in order), else by document (document j goes to shard j mod n: the shards in
order are a permutation of the source's order, the same multiset of documents).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from .synthetic import SyntheticSource

class SourceError(ValueError):
    """A source that exists but cannot be used: empty, not UTF-8, not valid JSON, no such column, no documents."""


class MissingColumnError(SourceError, KeyError):
    """The text column is not in the source's rows (a ``KeyError`` too, for callers that catch that)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class NoSuchSourceError(FileNotFoundError):
    """A source spec naming no existing file or folder (and, for a hub name, no reachable hub dataset)."""


# datasets builder name for each file extension we accept.
_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


# suffixes that mark a spec as a file path (never a hub dataset name)
_PATH_SUFFIXES = set(_FILE_BUILDERS) | {".bin", ".idx", ".gz", ".zst", ".bz2", ".xz", ".csv", ".tsv", ".arrow",
                                        ".jsonl.gz", ".model"}


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files on this interpreter, sorted, without ``site-packages``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def _hash_strings(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class TextSource:
    """Documents as text. ``texts()`` yields one ``str`` per document, in a fixed order."""

    spec: str
    kind: str  # "stdlib" | "files" | "hub"
    files: list[Path] = field(default_factory=list)
    text_field: str = "text"
    split: str = "train"
    max_documents: int | None = None
    shard: int = 0  # slice_source: this source is shard `shard` of `num_shards`, cut by `slice_by`
    num_shards: int = 1
    slice_by: str = ""  # "" (the whole source) | "file" (self.files is this shard's files) | "document"

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "text_field": self.text_field}
        if self.slice_by:
            d.update(shard=self.shard, num_shards=self.num_shards, slice_by=self.slice_by)
            if self.slice_by == "file":
                d["files"] = len(self.files)
        if self.kind == "stdlib":
            d["python"] = sys.version.split()[0]
            d["root"] = sysconfig.get_paths()["stdlib"]
        if self.kind == "hub":
            d["split"] = self.split
        if self.max_documents is not None:
            d["max_documents"] = self.max_documents
        return d

    def fingerprint(self) -> str:
        """Changes when the input changes: file names, sizes and mtimes for local inputs; the name for the hub."""
        items = [self.spec, self.kind, self.text_field, self.split, self.max_documents]
        if self.slice_by:
            items += [self.slice_by, self.shard, self.num_shards]
        for f in self.files:
            st = f.stat()
            items += [str(f), st.st_size, st.st_mtime_ns]
        return _hash_strings(items)

    def num_documents(self) -> int | None:
        """Known in advance for the stdlib corpus (for the progress bar); None otherwise."""
        if self.kind != "stdlib":
            return None
        n = len(self.files) if self.max_documents is None else min(len(self.files), self.max_documents)
        if self.slice_by == "document":
            n = len(range(self.shard, n, self.num_shards))
        return n

    def texts(self) -> Iterator[str]:
        """The documents' texts in order (this shard's, for a slice). Raises ``SourceError`` if there are none at
        all (a slice by file may be empty: the other shards hold the documents)."""
        n = 0
        strided = self.slice_by == "document"
        for text in self._all_texts():
            if self.max_documents is not None and n >= self.max_documents:
                return
            n += 1
            if strided and (n - 1) % self.num_shards != self.shard:
                continue
            yield text
        if n == 0 and self.max_documents != 0 and self.slice_by != "file":
            where = ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
            raise SourceError(
                f"source {self.spec!r} yielded no documents: "
                + (f"no row of {where} has a non-empty {self.text_field!r} value" if self.files else "it is empty")
                + "; check the file(s), or pass --text-field with the column that holds the text"
            )

    def _all_texts(self) -> Iterator[str]:
        if self.kind == "stdlib":
            for f in self.files:
                # a few stdlib test files are deliberately not UTF-8; keep them, replacing bad bytes
                yield f.read_bytes().decode("utf-8", errors="replace")
            return
        row_number = 0
        for builder, files in self._groups():
            try:
                for row in self._hf_dataset(builder, files):
                    row_number += 1
                    text = self._text_of(row, row_number, files)
                    if text:
                        yield text
            except SourceError:
                raise
            except UnicodeDecodeError as e:
                raise self._not_utf8(files, e) from None
            except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid (a JSON parse error) is a ValueError
                if self.kind == "hub":
                    raise
                raise self._unparsable(files, e) from None

    def _text_of(self, row, row_number: int, files: list[str]):
        where = files[0] if len(files) == 1 else f"source {self.spec!r}"
        if not isinstance(row, dict) or self.text_field not in row:
            columns = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise MissingColumnError(
                f"{where}: row {row_number} has no column {self.text_field!r} (columns: {columns}); "
                f"pass --text-field with one of them"
            )
        text = row[self.text_field]
        if text is not None and not isinstance(text, str):
            raise SourceError(
                f"{where}: row {row_number} has a value of type {type(text).__name__} ({str(text)[:40]!r}) in "
                f"column {self.text_field!r}, not text; pass --text-field with the column that holds the text"
            )
        return text

    def _groups(self) -> list[tuple[str, list[str]]]:
        """(datasets builder, files) in order: one load per builder type so a folder may mix jsonl and parquet;
        files keep their sorted order. A hub source is one group with no files."""
        if self.kind == "hub":
            return [("hub", [])]
        by_builder: dict[str, list[str]] = {}
        for f in self.files:
            by_builder.setdefault(_FILE_BUILDERS[f.suffix.lower()], []).append(str(f))
        return list(by_builder.items())

    def _hf_dataset(self, builder: str, files: list[str]):
        import datasets

        datasets.disable_progress_bars()
        # streaming: one pass, no Arrow cache to build, nothing downloaded ahead of use.
        if builder == "hub":
            name, _, config = self.spec.partition(":")
            try:
                return datasets.load_dataset(name, config or None, split=self.split, streaming=True)
            except Exception as e:  # noqa: BLE001 - any failure here means: not a usable hub dataset
                raise NoSuchSourceError(
                    f"source {self.spec!r}: no such local file or folder, and loading it as a Hugging Face hub "
                    f"dataset failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the "
                    f"path, or the dataset name and the network"
                ) from None
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)

    def _not_utf8(self, files: list[str], error: UnicodeDecodeError) -> SourceError:
        for f in files:
            bad = first_invalid_utf8(Path(f))
            if bad is not None:
                offset, line, byte = bad
                return SourceError(
                    f"{f} is not valid UTF-8: byte 0x{byte:02x} at line {line} (byte offset {offset}); "
                    f"re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove that line"
                )
        return SourceError(f"source {self.spec!r} ({', '.join(files)}) is not valid UTF-8 ({error}); "
                           f"re-encode it as UTF-8")

    def _unparsable(self, files: list[str], error: Exception) -> SourceError:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        for f in files:
            bad = first_invalid_json_line(Path(f))
            if bad is not None:
                line, reason = bad
                return SourceError(f"{f}: line {line} is not valid JSON ({reason}); fix or remove that line")
        return SourceError(f"source {self.spec!r} ({', '.join(files)}) cannot be read ({first}); check the files")


def first_invalid_utf8(path: Path, block: int = 1 << 20) -> tuple[int, int, int] | None:
    """(byte offset, line number from 1, the byte) of the first byte of ``path`` that is not valid UTF-8, or
    None. Streams the file in blocks (a character cut by a block end is carried over)."""
    offset, line, carry = 0, 1, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = carry + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                good, carry = len(data), b""
            except UnicodeDecodeError as e:
                if chunk and e.reason == "unexpected end of data" and e.start >= len(data) - 3:
                    good, carry = e.start, data[e.start:]  # a character cut by the block end: read on
                else:
                    return offset + e.start, line + data.count(b"\n", 0, e.start), data[e.start]
            line += data.count(b"\n", 0, good)
            offset += good
            if not chunk:
                return None


def first_invalid_json_line(path: Path) -> tuple[int, str] | None:
    """(line number from 1, parser message) of the first non-blank line of a JSON-lines file that does not parse
    as JSON, or None (for a ``.json`` file: the whole file's parse error)."""
    import json

    if path.suffix.lower() == ".json":
        try:
            json.loads(path.read_bytes())
            return None
        except ValueError as e:
            return getattr(e, "lineno", 1), str(e)
    if path.suffix.lower() != ".jsonl":
        return None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    json.loads(raw)
                except ValueError as e:
                    return n, str(e)
    return None


@dataclass
class MegatronSource:
    """A Megatron-LM indexed dataset: ``tokens()`` yields one int array per document (its sequences joined)."""

    spec: str
    prefix: str
    max_documents: int | None = None

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": "megatron", "prefix": self.prefix}
        if self.max_documents is not None:
            d["max_documents"] = self.max_documents
        return d

    def fingerprint(self) -> str:
        items = [self.spec, "megatron", self.max_documents]
        for suffix in (".bin", ".idx"):
            st = os.stat(self.prefix + suffix)
            items += [suffix, st.st_size, st.st_mtime_ns]
        return _hash_strings(items)

    def tokens(self) -> Iterator[np.ndarray]:
        from .megatron_io import iter_megatron_documents

        for n, doc in enumerate(iter_megatron_documents(self.prefix)):
            if self.max_documents is not None and n >= self.max_documents:
                return
            yield doc


def slice_source(src, shard: int, num_shards: int) -> TextSource:
    """Shard ``shard`` of ``num_shards`` of a text source (see the module docstring): a deterministic function of
    the source's sorted files and their sizes, or of document order."""
    import dataclasses

    if isinstance(src, MegatronSource):
        raise ValueError(f"source {src.spec!r} is a Megatron corpus, already tokenized: copying it is not the slow "
                         f"part; prepare it in one process (without --shard)")
    if getattr(src, "kind", None) == "synthetic":
        raise ValueError(f"source {src.spec!r} is generated, and its held-out documents are chosen as it is "
                         f"generated: prepare it in one process (without --shard)")
    if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard, int) and 0 <= shard < num_shards):
        raise ValueError(f"--shard {shard} --num-shards {num_shards}: need num_shards >= 1 and 0 <= shard < "
                         f"num_shards")
    if len(src.files) >= num_shards and src.max_documents is None:
        sizes = np.array([max(f.stat().st_size, 1) for f in src.files], np.int64)
        prefix = np.concatenate([[0], np.cumsum(sizes)])
        total, count = int(prefix[-1]), len(src.files)
        bounds = [0]
        for k in range(1, num_shards):
            b = int(np.searchsorted(prefix, k * total / num_shards, side="left"))
            b = max(b, bounds[-1] + 1)  # every shard at least one file ...
            bounds.append(min(b, count - (num_shards - k)))  # ... and enough left for the rest
        bounds.append(count)
        files = src.files[bounds[shard]:bounds[shard + 1]]
        return dataclasses.replace(src, files=files, shard=shard, num_shards=num_shards, slice_by="file")
    return dataclasses.replace(src, shard=shard, num_shards=num_shards, slice_by="document")


def _megatron_prefix(spec: str) -> str | None:
    if spec.startswith("megatron:"):
        return spec[len("megatron:"):]
    for suffix in (".bin", ".idx"):
        if spec.endswith(suffix) and os.path.exists(spec[: -len(suffix)] + ".idx"):
            return spec[: -len(suffix)]
    if os.path.exists(spec + ".idx") and os.path.exists(spec + ".bin"):
        return spec
    return None


def open_source(
    spec: str,
    text_field: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    synthetic: dict | None = None,
) -> TextSource | MegatronSource | SyntheticSource:
    """Open a source from its spec string (see the module docstring). Nothing is read yet. ``synthetic``: the options
    of a ``synthetic:...`` source (``synthetic.OPTION_NAMES``; ignored by other sources)."""
    if spec.startswith("synthetic:"):
        from .synthetic import open_synthetic

        return open_synthetic(spec, synthetic, max_documents)
    if spec == "stdlib":
        return TextSource(spec, "stdlib", stdlib_files(), text_field, split, max_documents)
    prefix = _megatron_prefix(spec)
    if prefix is not None:
        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"Megatron corpus {spec!r}: {prefix + suffix} is missing")
        return MegatronSource(spec, prefix, max_documents)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ValueError(
                f"{path}: unknown file type {path.suffix!r}; accepted: {sorted(_FILE_BUILDERS)} or a Megatron .bin/.idx"
            )
        if _is_blank(path):
            raise SourceError(f"{path} is empty ({path.stat().st_size} bytes, no documents): nothing to prepare; "
                              f"check that it was written completely, or pass another --source")
        return TextSource(spec, "files", [path], text_field, split, max_documents)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"folder {path} holds no {sorted(_FILE_BUILDERS)} files")
        blank = [f for f in files if _is_blank(f)]
        if blank:
            names = ", ".join(str(f) for f in blank[:3]) + (f" and {len(blank) - 3} more" if len(blank) > 3 else "")
            raise SourceError(f"folder {path} holds empty file(s): {names}; remove them (or finish writing them) "
                              f"and run again")
        return TextSource(spec, "files", files, text_field, split, max_documents)
    if _looks_like_path(spec):
        raise NoSuchSourceError(f"source {spec!r}: no such file or folder ({path.resolve()} does not exist)"
                                f"{_did_you_mean(path)}; check the path given as --source / data.source")
    return TextSource(spec, "hub", [], text_field, split, max_documents)


def _is_blank(path: Path) -> bool:
    """An empty file, or one of whitespace only (checked for small files; a big file is not blank)."""
    size = path.stat().st_size
    return size == 0 or (size < 1 << 16 and not path.read_bytes().strip())


def _looks_like_path(spec: str) -> bool:
    """True for a spec that cannot be a hub dataset name ("name", "owner/name", either with ":config")."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec or os.sep != "/" and os.sep in spec:
        return True
    name = spec.split(":", 1)[0]
    if name.count("/") > 1:
        return True
    lower = name.lower()
    if any(lower.endswith(suffix) for suffix in _PATH_SUFFIXES):
        return True
    parent = Path(name).parent
    return str(parent) != "." and parent.is_dir()  # "data/x": "data" is a folder here, so this is a path


def _did_you_mean(path: Path) -> str:
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" ({parent} does not exist either)"
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {str(parent / close[0])!r}?" if close else ""
