"""Mixtures: several sources, each prepared on its own, blended by weight when the loader reads them.

A mixture folder (``data.prepared_dir`` when ``data.sources`` is set) holds::

    mixture.json     format, the sources (sub-folder, path, text field, weight) and the shared tokenizer's record
    tokenizer.*      the one tokenizer every source is prepared with (tokenizer.model, or tokenizer.json + config)
    <dir>/           one prepared folder per source: a one-process or a merged sharded preparation; <dir> is the
                     source's ``dir`` if given, else ``<file name>-<8 hex digits of sha256(path, text field)>``

Blending is by whole steps: every step is one source's batch (one sequence length, ``tokens_per_step`` tokens), so
source k's share of the tokens is exactly its share of the steps. A mixture cycle of C steps gives source k
n_k steps: n_k is w_k C rounded by largest remainder, and C is the smallest cycle length (at most 10,000) for which
every n_k is within 1% of w_k C (weights 0.8/0.2: C = 5, n = 4 + 1; 1/3 each: C = 3). Within a cycle the n_k steps
are spread by smooth weighted round robin (the same fixed order every cycle: A A B A A for 0.8/0.2 ...).

Mixture step s is step j of source k, where k = order[s mod C] and j = (s div C) n_k + (the draws of k earlier in
the cycle); source k's own loader (DD or concat, its own shuffles, curriculum and epochs, epoch = j div its steps
per epoch) makes that step's batch. So the global batch of every step stays a pure function of (config, seed, step)
and the state is one global position: a mixture resumes exactly, mid-cycle, on any dp x cp layout
(``stateful.py``). A source that runs out of documents starts its next epoch (a reshuffle) while the others go on:
its effective epochs are w_k x (tokens trained) / (its tokens), reported by ``lightspan data stats``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .shards import CorruptCorpusError, check_file_name, write_atomic
from .stateful import StatefulLoader

MIXTURE = "mixture.json"
MIXTURE_FORMAT = "lightspan-mixture/1"
MAX_CYCLE = 10_000


def source_dir_name(path: str, text_field: str = "text") -> str:
    """The default sub-folder of a mixture source: its file name (made safe) and 8 hex digits of its identity."""
    base = Path(str(path).rstrip("/")).name or "source"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or "source"
    digest = hashlib.sha256(f"{path}\0{text_field}".encode()).hexdigest()[:8]
    return f"{slug[:40]}-{digest}"


def mixture_quotas(weights) -> tuple[list[int], int]:
    """(steps per source in one cycle, cycle length C); see the module docstring."""
    w = np.asarray(weights, np.float64)
    if not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
    w = w / w.sum()
    for c in range(1, MAX_CYCLE + 1):
        exact = w * c
        n = np.floor(exact).astype(np.int64)
        rest = c - int(n.sum())
        if rest:
            n[np.argsort(-(exact - n), kind="stable")[:rest]] += 1
        if np.all(n >= 1) and np.all(np.abs(n - exact) <= 0.01 * exact):
            return n.tolist(), c
    n = np.maximum(np.round(w * MAX_CYCLE).astype(np.int64), 1)  # a tiny weight: at least one step per cycle
    return n.tolist(), int(n.sum())


def cycle_order(quotas: list[int]) -> np.ndarray:
    """(C,) the source of each step of a cycle: smooth weighted round robin over the quotas (ties: lower k)."""
    quotas = np.asarray(quotas, np.int64)
    total = int(quotas.sum())
    current = np.zeros(len(quotas), np.int64)
    order = np.empty(total, np.int64)
    for t in range(total):
        current += quotas
        k = int(np.argmax(current))
        current[k] -= total
        order[t] = k
    return order


class MixtureLoader(StatefulLoader):
    """Blends per-source loaders (all DD or all concat, on the same dp/cp coordinates) by weight, whole steps at a
    time; see the module docstring. Batches are the sources' batches plus ``source`` (k), ``source_step`` (j) and
    ``source_epoch``; ``epoch`` is the mixture cycle and ``starts`` are offsets in source k's token stream."""

    def __init__(self, children: list[StatefulLoader], weights, names: list[str]):
        if not children or len(children) != len(weights) or len(names) != len(children):
            raise ValueError("a mixture needs one loader, one weight and one name per source")
        kinds = {c.kind for c in children}
        if len(kinds) != 1:
            raise ValueError(f"a mixture's sources need one loader kind, got {sorted(kinds)}")
        self.kind = f"mixture-{children[0].kind}"
        self.children, self.names = children, list(names)
        self.weights = [float(w) for w in weights]
        self.quotas, self.cycle = mixture_quotas(self.weights)
        self.order = cycle_order(self.quotas)
        self.before = np.zeros(self.cycle, np.int64)  # draws of order[t]'s source before step t of a cycle
        for k in range(len(children)):
            at = np.flatnonzero(self.order == k)
            self.before[at] = np.arange(len(at))
        self.child_steps = [int(c.steps_per_epoch) for c in children]  # constant from epoch to epoch
        first = children[0]
        self.dp_rank, self.dp_size, self.cp_rank, self.cp_size = first.dp_rank, first.dp_size, first.cp_rank, \
            first.cp_size
        self.config = {"cycle": self.cycle, "quotas": list(self.quotas),
                       "sources": [{"name": n, "weight": w, "loader": dict(c.config)}
                                   for n, w, c in zip(self.names, self.weights, children)]}
        self._init_position()

    def _start_epoch(self, epoch: int) -> int:
        return self.cycle

    def source_position(self, epoch: int, step: int) -> tuple[int, int]:
        """(source k, its step j) of step ``step`` of mixture cycle ``epoch``."""
        k = int(self.order[step])
        return k, epoch * self.quotas[k] + int(self.before[step])

    def _make_batch(self, step: int) -> dict[str, Any]:
        k, j = self.source_position(self.epoch, step)
        child = self.children[k]
        epoch, local = divmod(j, self.child_steps[k])
        if child.epoch != epoch:
            child.epoch = epoch
            child.steps_per_epoch = child._start_epoch(epoch)
        batch = child._make_batch(local)
        batch.update(source=k, source_step=j, source_epoch=epoch)
        return batch

    def share(self) -> list[float]:
        """Each source's fraction of the steps (and tokens) of a cycle."""
        return [q / self.cycle for q in self.quotas]


def is_mixture(folder: str | Path) -> bool:
    return (Path(folder) / MIXTURE).is_file()


def read_mixture(folder: str | Path) -> dict:
    """mixture.json, checked for shape: a list of sources, each with a ``dir`` that is a plain name inside the folder
    and a positive weight. Raises ``CorruptCorpusError`` naming the file and the key."""
    path = Path(folder) / MIXTURE
    rerun = "re-run `lightspan prepare --config ...` with data.sources to rewrite it"
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCorpusError(f"{path} is not valid JSON ({e}); {rerun}") from None
    if not isinstance(raw, dict) or raw.get("format") != MIXTURE_FORMAT or not isinstance(raw.get("sources"), list) \
            or not raw["sources"]:
        raise CorruptCorpusError(f"{path} is not a lightspan mixture ({MIXTURE_FORMAT}, a non-empty 'sources' "
                                 f"list); {rerun}")
    for n, s in enumerate(raw["sources"]):
        if not isinstance(s, dict) or "dir" not in s:
            raise CorruptCorpusError(f"{path}: source {n} has no 'dir'; {rerun}")
        check_file_name(s["dir"], path)
        w = s.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise CorruptCorpusError(f"{path}: source {n} ({s['dir']}) has weight {w!r}, not a number > 0; {rerun}")
    return raw


def write_mixture(folder: str | Path, sources: list[dict], tokenizer_record: dict | None) -> Path:
    path = Path(folder) / MIXTURE
    body = {"format": MIXTURE_FORMAT, "tokenizer": tokenizer_record,
            "blend": "whole steps; cycle of C steps, n_k = w_k C by largest remainder (data_pipeline/mixture.py)",
            "sources": sources}
    data = json.dumps(body, indent=1).encode()
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
    return path


def normalize_sources(sources: list, default_text_field: str = "text", where: str = "data.sources") -> list[dict]:
    """Check a mixture's source list ([{path, weight, text_field?, dir?}, ...]) and fill in the defaults; errors
    name the entry and the key (``where[i].key``)."""
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"{where} must be a non-empty list of {{path, weight, text_field}} mappings")
    out, dirs = [], {}
    for i, s in enumerate(sources):
        at = f"{where}[{i}]"
        if isinstance(s, str):
            s = {"path": s, "weight": 1.0}
        if not isinstance(s, dict):
            raise ValueError(f"{at} must be a mapping {{path, weight, text_field}}, got {s!r}")
        unknown = sorted(set(s) - {"path", "weight", "text_field", "dir"})
        if unknown:
            raise ValueError(f"{at} has unknown key(s) {unknown}; allowed: path, weight, text_field, dir")
        path = s.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{at}.path must be a source (a file, folder, 'stdlib' or a hub name), got {path!r}")
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"{at}.weight must be a number > 0, got {weight!r}")
        field = s.get("text_field", default_text_field)
        if not isinstance(field, str) or not field:
            raise ValueError(f"{at}.text_field must be a column name, got {field!r}")
        name = s.get("dir") or source_dir_name(path, field)
        try:
            check_file_name(name, Path(where))
        except CorruptCorpusError:
            raise ValueError(f"{at}.dir {name!r} must be a plain folder name (no '/', not '..')") from None
        if name in dirs:
            raise ValueError(f"{at} and {where}[{dirs[name]}] would share the sub-folder {name!r}: give one a "
                             f"different 'dir'")
        dirs[name] = i
        out.append({"path": path, "weight": float(weight), "text_field": field, "dir": name})
    return out


def _interleave(iterators: list, quotas: list[int]):
    """Documents of several sources in a weighted round robin (for training one tokenizer on all of them)."""
    order = cycle_order(quotas)
    live = [iter(it) for it in iterators]
    done = [False] * len(live)
    while not all(done):
        for k in order:
            if done[k]:
                continue
            try:
                yield next(live[k])
            except StopIteration:
                done[k] = True


def prepare_mixture(out_dir: str | Path, sources: list, tokenizer=None, vocab_size: int = 8192,
                    text_field: str = "text", num_workers: int = 2, holdout_docs: int = 0, holdout: float = 0.0,
                    overwrite: bool = False, progress: bool = True, **prepare_kwargs) -> Path:
    """Prepare every source of a mixture into its sub-folder of ``out_dir`` with one tokenizer, and write
    ``mixture.json``. The tokenizer: the one named (written into ``out_dir``), else the one already in ``out_dir``,
    else a sentencepiece tokenizer of ``vocab_size`` trained once on all sources (a weighted round robin of their
    documents). Each source is a ``prepare`` call (a no-op when current, e.g. a merged sharded preparation of it);
    the held-out split applies to each source."""
    from .preparation import _exclusive, _folder_tokenizer, _named_tokenizer, prepare
    from .sources import open_source
    from .tokenizer import train_tokenizer

    sources = normalize_sources(sources, text_field)
    out = Path(out_dir)
    target = out.expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        named = _named_tokenizer(tokenizer)
        there = _folder_tokenizer(target)
        if named is not None:
            if there is not None and there.fingerprint != named.fingerprint:
                raise ValueError(f"{out} already holds another tokenizer ({there.file_name}, {there.vocab_size} ids, "
                                 f"sha256 {there.sha256[:12]}...) than data.tokenizer ({named.path}, "
                                 f"{named.vocab_size} ids): every source of a mixture uses one tokenizer; use a new "
                                 f"data.prepared_dir")
            tok = named
            if there is None:
                tok.save_into(target)
        elif there is not None:
            tok = there
        else:
            opened = [open_source(s["path"], text_field=s["text_field"], synthetic=prepare_kwargs.get("synthetic"))
                      for s in sources]
            print(f"[prepare] training one tokenizer (vocab {vocab_size}) on the {len(sources)} mixture sources")
            quotas, _ = mixture_quotas([s["weight"] for s in sources])
            tok = train_tokenizer(_interleave([o.texts() for o in opened], quotas), target / "tokenizer.model",
                                  vocab_size=vocab_size)
    for s in sources:
        prepare(s["path"], target / s["dir"], tokenizer=tok, text_field=s["text_field"], num_workers=num_workers,
                holdout_docs=holdout_docs, holdout=holdout, overwrite=overwrite, progress=progress, **prepare_kwargs)
    write_mixture(target, sources, tok.record())
    return out
