"""Where documents come from: the embedded stdlib corpus, local files, a hub dataset, a Megatron corpus.

A source is opened from one string:

- ``"stdlib"``: the Python standard library's own ``.py`` files, found at run time under
  ``sysconfig.get_paths()["stdlib"]`` (sorted, ``site-packages`` skipped, one file = one document).
- a local file or folder of ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` files, read through Hugging Face
  ``datasets`` (the ``text_field`` column, ``"text"`` by default; a ``.txt`` file is one document).
- a Megatron indexed dataset (``prefix.bin`` + ``prefix.idx``, given as the prefix, either file, or
  ``"megatron:PREFIX"``): already tokenized, so it yields token arrays instead of text.
- anything else is taken as a Hugging Face hub dataset name (``"name"`` or ``"name:config"``), which needs a network.

Every source reports ``describe()`` (recorded in the manifest) and ``fingerprint()`` (what decides whether a
re-run of ``prepare`` has anything to do).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

# datasets builder name for each file extension we accept.
_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


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

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "text_field": self.text_field}
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
        for f in self.files:
            st = f.stat()
            items += [str(f), st.st_size, st.st_mtime_ns]
        return _hash_strings(items)

    def num_documents(self) -> int | None:
        """Known in advance for the stdlib corpus (for the progress bar); None otherwise."""
        if self.kind != "stdlib":
            return None
        return len(self.files) if self.max_documents is None else min(len(self.files), self.max_documents)

    def texts(self) -> Iterator[str]:
        n = 0
        for text in self._all_texts():
            if self.max_documents is not None and n >= self.max_documents:
                return
            n += 1
            yield text

    def _all_texts(self) -> Iterator[str]:
        if self.kind == "stdlib":
            for f in self.files:
                # a few stdlib test files are deliberately not UTF-8; keep them, replacing bad bytes
                yield f.read_bytes().decode("utf-8", errors="replace")
            return
        for ds in self._hf_datasets():
            for row in ds:
                if self.text_field not in row:
                    raise KeyError(
                        f"source {self.spec!r} has no column {self.text_field!r} (columns: {sorted(row)}); "
                        f"pass --text-field with one of them"
                    )
                text = row[self.text_field]
                if text:
                    yield text

    def _hf_datasets(self):
        import datasets

        datasets.disable_progress_bars()
        if self.kind == "hub":
            name, _, config = self.spec.partition(":")
            yield datasets.load_dataset(name, config or None, split=self.split, streaming=True)
            return
        # streaming: one pass, no Arrow cache to build, nothing downloaded ahead of use.
        # One load per builder type so a folder may mix jsonl and parquet; files keep their sorted order.
        by_builder: dict[str, list[str]] = {}
        for f in self.files:
            by_builder.setdefault(_FILE_BUILDERS[f.suffix.lower()], []).append(str(f))
        for builder, files in by_builder.items():
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            yield datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)


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
) -> TextSource | MegatronSource:
    """Open a source from its spec string (see the module docstring). Nothing is read yet."""
    if spec == "stdlib":
        return TextSource(spec, "stdlib", stdlib_files(), text_field, split, max_documents)
    prefix = _megatron_prefix(spec)
    if prefix is not None:
        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"Megatron corpus {spec!r}: {prefix + suffix} is missing")
        return MegatronSource(spec, prefix, max_documents)
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ValueError(
                f"{path}: unknown file type {path.suffix!r}; accepted: {sorted(_FILE_BUILDERS)} or a Megatron .bin/.idx"
            )
        return TextSource(spec, "files", [path], text_field, split, max_documents)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"folder {path} holds no {sorted(_FILE_BUILDERS)} files")
        return TextSource(spec, "files", files, text_field, split, max_documents)
    if spec.startswith(("/", ".", "~")):  # hub names look like "owner/name", never like these
        raise FileNotFoundError(f"source {spec!r} looks like a path but does not exist")
    return TextSource(spec, "hub", [], text_field, split, max_documents)
