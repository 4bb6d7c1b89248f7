"""Synthetic long-context retrieval documents (``data.source: synthetic:retrieval``): real text of the embedded
corpus (the standard library's ``.py`` files, ``stdlib_files()``) with key-value facts inserted and, later in the
same document, questions about them, so that a language model trained on it learns to look back and retrieve.

Retrieval document kinds (``data.synthetic_kinds``, drawn uniformly); the wording is evaluation/passkey.py's and
evaluation/needle.py's, each fact and question on a line of its own::

    passkey   The pass key is 48213. Remember it. 48213 is the pass key.            (one key)
              ... What is the pass key? The pass key is 48213.
    multikey  The pass key for Ada Finch is 48213. Remember it.                      (2..keys of them)
              ... What is the pass key for Ada Finch? The pass key for Ada Finch is 48213.
    multihop  Ada Finch points to Basil Marsh. ... Basil Marsh holds 48213.          (either order; 1..keys/2 chains)
              ... What number does Ada Finch point to? Ada Finch points to Basil Marsh. Basil Marsh holds 48213.
    needle    The secret ingredient of the red soup is saffron.                      (2..keys of them)
              ... What is the secret ingredient of the red soup? The secret ingredient of the red soup is saffron.

A retrieval document starts with the evaluation's intro line. Every fact is asked about once; its question starts
``min_distance..max_distance`` tokens after the fact (log-uniform; a multi-hop question comes after both facts and
is measured from the first). Facts and questions sit at line starts of the text, within ``TOL`` tokens of their
drawn positions. A plain document is a stretch of corpus text. Every document, plain or retrieval, is exactly 2^k
tokens with its EOS, the smallest power of two above a log-uniform draw in [min_distance, max_distance] plus
``LENGTH_ALLOWANCE``: dataset decomposition keeps such a document whole up to 2^data.max_log2 tokens, so a question
and its facts land in one training sequence (a longer document is cut into 2^max_log2 pieces: keep max_distance
under that). Exactly round(fraction x documents) documents, at seeded positions, are retrieval documents; plain and
retrieval documents draw their lengths alike, so that is also their expected share of the tokens.

Determinism: document i is a function of (seed, i, the options, the tokenizer, the corpus files) only, drawn from
``random.Random("lightspan-synthetic/<seed>/<split>/<i>")``: the same seed gives byte-identical shards.

Held-out split: ``prepare``'s own (``data.holdout_docs`` / ``data.holdout``: heldout.npy, evenly spread documents
no loader reads). The source is told which positions those are and generates them from a disjoint stream: another
seed stream, and corpus files, names, 5-digit values and (colour, dish, ingredient) triples of the held-out class.
A fixed keyed hash puts 1 in ``HELDOUT_SHARE`` of each in the held-out class; training documents use only the
training class, whatever the seed or the split, so no held-out fact or file ever occurs in a training document,
and evaluation prompts from ``retrieval_prompts(split="heldout")`` are unseen as well.

Lengths count tokens of the preparation's tokenizer: facts, questions and corpus text are tokenized as they read in
context (after a newline), so a document's tokens are, up to its seams, those of its text. ``texts()`` renders the
same kind of documents with lengths counted in characters: what a tokenizer is trained on when none is given.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .sources import _hash_strings, stdlib_files

PREFIX = "synthetic:"
TASKS = ("retrieval",)
KINDS = ("passkey", "multikey", "multihop", "needle")
GENERATOR = "lightspan-synthetic-retrieval/1"  # bump when the documents a given seed yields change
TOL = 8  # tokens a fact or question may move from its drawn position to sit at a line start
LENGTH_ALLOWANCE = 128  # tokens a document holds beyond its drawn distance (intro, facts, questions)
HELDOUT_SHARE = 8  # 1 in HELDOUT_SHARE files, names, values and triples are of the held-out class

# evaluation/passkey.py and evaluation/needle.py, word for word (tests/test_data_synthetic.py checks)
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
NEEDLE_INTRO = "Read the following notes carefully. A question about them follows.\n"
COLORS = ["red", "blue", "golden", "silver", "purple", "orange", "white", "black"]
DISHES = ["soup", "pie", "curry", "stew", "salad", "cake", "bread", "noodles"]
INGREDIENTS = ["saffron", "walnut", "ginger", "lemon", "basil", "honey", "pepper", "vanilla", "mustard", "coconut",
               "fennel", "cinnamon", "garlic", "mint", "sesame", "tamarind"]

PASSKEY_FACT = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
MULTIKEY_FACT = "The pass key for {name} is {value}. Remember it."
MULTIKEY_QUESTION = "What is the pass key for {name}? The pass key for {name} is"
HOP_LINK = "{a} points to {b}."
HOP_VALUE = "{b} holds {value}."
HOP_QUESTION = "What number does {a} point to? {a} points to"
NEEDLE_FACT = "The secret ingredient of the {color} {dish} is {ingredient}."
NEEDLE_QUESTION = "What is the secret ingredient of the {color} {dish}? The secret ingredient of the {color} {dish} is"
INTROS = {"passkey": PASSKEY_INTRO, "multikey": PASSKEY_INTRO, "multihop": PASSKEY_INTRO, "needle": NEEDLE_INTRO}

FIRST_NAMES = ["Ada", "Basil", "Cora", "Dario", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Leon",
               "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Silas", "Tara", "Ulric", "Vera", "Wendel", "Xenia",
               "Yusuf", "Zora", "Anton", "Beatrix", "Cyril", "Dora", "Emil", "Fiona", "Gideon", "Hanna", "Ivo", "Jana",
               "Kasimir", "Lena", "Milo", "Nora", "Otto", "Petra", "Rafael", "Selma", "Tobias", "Una", "Viktor",
               "Wanda"]
LAST_NAMES = ["Finch", "Harlow", "Kestrel", "Marsh", "Quill", "Rowan", "Thorne", "Vance", "Ashby", "Brook", "Calder",
              "Dunmore", "Ellery", "Fairfax", "Garnet", "Hale", "Ives", "Jarrow", "Keswick", "Lark", "Merrow",
              "Norwood", "Oakes", "Pryor", "Radley", "Sable", "Tindall", "Upton", "Voss", "Wren", "Yardley", "Zeller",
              "Ambrose", "Blackwood", "Crane", "Drury", "Everett", "Fenwick", "Gale", "Holt", "Ingram", "Jessop",
              "Kemble", "Lowell", "Mercer", "Nash", "Orme", "Pike"]

OPTION_NAMES = ("seed", "documents", "fraction", "kinds", "keys", "min_distance", "max_distance")


# ------------------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticOptions:
    """What a synthetic source generates; ``data.synthetic_<name>`` in the config (see pretrain/config.py)."""

    seed: int = 0
    documents: int = 2000
    fraction: float = 0.5
    kinds: tuple = KINDS
    keys: int = 4
    min_distance: int = 64
    max_distance: int = 4096

    @classmethod
    def from_dict(cls, raw: dict | None) -> "SyntheticOptions":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown synthetic option(s) {unknown}; known: {list(OPTION_NAMES)} "
                             f"(data.synthetic_<name> in the config)")
        kinds = raw.get("kinds") or KINDS  # [] (the config's default): every kind
        if isinstance(kinds, str):
            kinds = [k.strip() for k in kinds.split(",") if k.strip()]
        if not isinstance(kinds, (list, tuple)):
            raise ValueError(f"data.synthetic_kinds must be a list of {list(KINDS)}, got {kinds!r}")
        raw["kinds"] = tuple(kinds)
        opts = cls(**raw)
        opts.check()
        return opts

    def check(self) -> None:
        def refuse(name, want):
            raise ValueError(f"data.synthetic_{name} must be {want}, got {getattr(self, name)!r}; set "
                             f"--data.synthetic_{name} to such a value")

        for name, low in (("seed", 0), ("documents", 1), ("keys", 1), ("min_distance", 1), ("max_distance", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                refuse(name, f"an integer >= {low}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0 <= self.fraction <= 1:
            refuse("fraction", "a number in [0, 1] (the share of retrieval documents)")
        if self.max_distance < self.min_distance:
            raise ValueError(f"data.synthetic_max_distance ({self.max_distance}) must be >= data.synthetic_min_distance "
                             f"({self.min_distance})")
        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            refuse("kinds", f"a list of distinct kinds among {list(KINDS)} ([]: all of them)")

    def record(self) -> dict:
        return dict(dataclasses.asdict(self), kinds=list(self.kinds))


def synthetic_options(data_cfg) -> dict:
    """The ``synthetic_*`` fields of a config's data section (``pretrain.config.DataConfig``) as the options dict
    ``prepare(..., synthetic=...)`` takes; fields it lacks keep their defaults."""
    return {name: getattr(data_cfg, f"synthetic_{name}") for name in OPTION_NAMES
            if hasattr(data_cfg, f"synthetic_{name}")}


# ------------------------------------------------------------------------------------------------------------
# the corpus, split into a training and a held-out class
# ------------------------------------------------------------------------------------------------------------
def split_of(item: str) -> str:
    """"heldout" for 1 in HELDOUT_SHARE items (a keyed hash: no visible property of the item tells), else "train"."""
    digest = hashlib.blake2b(item.encode(), digest_size=8, key=b"lightspan-synthetic-split").digest()
    return "heldout" if int.from_bytes(digest, "little") % HELDOUT_SHARE == 0 else "train"


class _Corpus:
    """The stdlib files (at least 64 bytes) in two pools by the class of their path relative to the stdlib root;
    a file is drawn with probability proportional to its size. Texts are read once and kept."""

    def __init__(self):
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = stdlib_files()
        self.rel = [str(f.relative_to(self.root)) if f.is_relative_to(self.root) else str(f) for f in self.files]
        self.pools: dict[str, list[int]] = {"train": [], "heldout": []}
        sizes: dict[str, list[int]] = {"train": [], "heldout": []}
        for i, f in enumerate(self.files):
            size = f.stat().st_size
            if size >= 64:
                split = split_of("file/" + self.rel[i])
                self.pools[split].append(i)
                sizes[split].append(size)
        for split, pool in self.pools.items():
            if not pool:
                raise ValueError(f"the stdlib corpus under {self.root} has no {split} files: cannot generate the "
                                 f"synthetic source")
        self.cum = {s: np.cumsum(v).tolist() for s, v in sizes.items()}
        self._texts: dict[int, str] = {}

    def text(self, i: int) -> str:
        if i not in self._texts:
            self._texts[i] = self.files[i].read_bytes().decode("utf-8", errors="replace")
        return self._texts[i]

    def pick(self, rng: random.Random, split: str) -> int:
        """A pool index of ``split``, drawn by file size."""
        cum = self.cum[split]
        return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


@functools.lru_cache(maxsize=1)
def _corpus() -> _Corpus:
    return _Corpus()


class _Codec:
    """The units lengths are counted in: tokens of ``tok``, or characters (``tok=None``). Pieces are sequences of
    units (int64 arrays, or str) that concatenate into a document."""

    def __init__(self, tok=None):
        self.tok = tok
        self.chars_per_unit = 1 if tok is None else 4  # a generous bound: windows of text this long per unit needed
        if tok is not None:
            self._pre = list(tok.encode("\n"))
            self._nl = np.array([i for i in range(tok.vocab_size) if "\n" in tok.decode([i])], np.int64)

    def start(self, text: str):
        """``text`` at the start of a document."""
        return text if self.tok is None else np.asarray(self.tok.encode(text), np.int64)

    def cont(self, text: str):
        """``text`` as it is tokenized after a newline (no leading "dummy" space of a tokenizer that adds one)."""
        if self.tok is None:
            return text
        full = list(self.tok.encode("\n" + text))
        n = len(self._pre)
        ids = full[n:] if full[:n] == self._pre else list(self.tok.encode(text))
        return np.asarray(ids, np.int64)

    def window(self, text: str):
        """(units of ``text``, which starts at a line start; the unit offsets where a line starts, 0 included)."""
        units = self.cont(text)
        if self.tok is None:
            return units, np.array([0] + [m.end() for m in re.finditer("\n", text)], np.int64)
        return units, np.concatenate([[0], np.flatnonzero(np.isin(units, self._nl)) + 1]).astype(np.int64)

    def join(self, parts: list):
        if self.tok is None:
            return "".join(parts)
        return np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.zeros(0, np.int64)


_CODECS: dict[str, _Codec] = {}


def _codec(tok) -> _Codec:
    if tok is None:
        return _Codec(None)
    key = getattr(tok, "fingerprint", None) or str(id(tok))
    if key not in _CODECS:
        if len(_CODECS) >= 4:
            _CODECS.pop(next(iter(_CODECS)))
        _CODECS[key] = _Codec(tok)
    return _CODECS[key]


def _filler(corpus: _Corpus, codec: _Codec, rng: random.Random, split: str, need: int):
    """(at least ``need`` units of corpus text of ``split`` from a random line start of a size-weighted random file,
    running on into the next files of the pool; its line starts; the files read)."""
    pool = corpus.pools[split]
    j = corpus.pick(rng, split)
    text = corpus.text(pool[j])
    s = text.find("\n", rng.randrange(len(text))) + 1
    if s >= len(text):
        s = 0
    parts, bparts, total, used = [], [], 0, [corpus.rel[pool[j]]]
    while total < need:
        e = text.find("\n", s + (need - total) * codec.chars_per_unit + 256)
        e = len(text) if e < 0 else e + 1
        chunk = text[s:e]
        if not chunk.endswith("\n"):
            chunk += "\n"
        units, bounds = codec.window(chunk)
        parts.append(units)
        bparts.append(bounds + total)
        total += len(units)
        s = e
        if s >= len(text):
            j = (j + 1) % len(pool)
            text, s = corpus.text(pool[j]), 0
            used.append(corpus.rel[pool[j]])
    return codec.join(parts), np.concatenate(bparts), used


def _snap(bounds: np.ndarray, cur: int, pos: int, target: int, lo: int, hi: int) -> int:
    """The filler offset (>= cur) at which a piece aimed at document position ``target`` goes: the line start nearest
    to it whose document position is in [lo, hi] (never before ``pos``, the document position of offset ``cur``),
    else the offset of the target clamped to that window."""
    a, b = cur + max(lo - pos, 0), cur + max(hi - pos, 0)
    x = min(max(cur + target - pos, a), b)
    i, k = np.searchsorted(bounds, a, "left"), np.searchsorted(bounds, b, "right")
    if k > i:
        inside = bounds[i:k]
        return int(inside[np.argmin(np.abs(inside - x))])
    return int(x)


# ------------------------------------------------------------------------------------------------------------
# facts and questions
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """One thing asked: its facts (in document order), the question and answer, and what a test needs to know."""

    kind: str
    facts: list  # fact sentences
    question: str  # up to the answer
    answer: str  # what follows the question (multihop: the chain "B. B holds V")
    value: str  # what a correct answer contains (the 5-digit key, or the ingredient)
    subject: str


def _draw(split: str, used: set, make, namespace: str) -> str:
    """``make()`` until an item of the ``split`` class that ``used`` does not hold yet comes up (then added)."""
    while True:
        item = make()
        if item not in used and split_of(f"{namespace}/{item}") == split:
            used.add(item)
            return item


def _value(rng, split, used) -> str:
    return _draw(split, used, lambda: str(rng.randint(10000, 99999)), "value")


def _name(rng, split, used) -> str:
    return _draw(split, used, lambda: f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", "name")


def _groups(rng: random.Random, kind: str, n: int, split: str, shuffle_hops: bool = True) -> list[_Group]:
    """``n`` groups of ``kind``, of the ``split`` class: distinct names, values and (colour, dish) pairs."""
    names, values, pairs = set(), set(), set()
    out = []
    for _ in range(n):
        if kind == "passkey":
            v = _value(rng, split, values)
            out.append(_Group(kind, [PASSKEY_FACT.format(value=v)], PASSKEY_QUESTION, v, v, "pass key"))
        elif kind == "multikey":
            name, v = _name(rng, split, names), _value(rng, split, values)
            out.append(_Group(kind, [MULTIKEY_FACT.format(name=name, value=v)], MULTIKEY_QUESTION.format(name=name),
                              v, v, name))
        elif kind == "multihop":
            a, b, v = _name(rng, split, names), _name(rng, split, names), _value(rng, split, values)
            facts = [HOP_LINK.format(a=a, b=b), HOP_VALUE.format(b=b, value=v)]
            if shuffle_hops and rng.random() < 0.5:
                facts.reverse()
            out.append(_Group(kind, facts, HOP_QUESTION.format(a=a), f"{b}. {b} holds {v}", v, a))
        elif kind == "needle":
            while True:  # a (colour, dish) pair new to this document, with an ingredient of the class
                color, dish, ingredient = rng.choice(COLORS), rng.choice(DISHES), rng.choice(INGREDIENTS)
                if (color, dish) not in pairs and split_of(f"needle/{color} {dish} {ingredient}") == split:
                    pairs.add((color, dish))
                    break
            out.append(_Group(kind, [NEEDLE_FACT.format(color=color, dish=dish, ingredient=ingredient)],
                              NEEDLE_QUESTION.format(color=color, dish=dish), ingredient, ingredient,
                              f"{color} {dish}"))
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}; known: {list(KINDS)}")
    return out


def _loguniform(rng: random.Random, lo: int, hi: int) -> int:
    if hi <= lo:
        return lo
    return min(hi, max(lo, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))))


# ------------------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------------------
class SyntheticSource:
    """``synthetic:retrieval`` as a source of ``prepare``: see the module docstring. ``documents(tok)`` yields
    (document without EOS, record); ``texts()`` the documents with lengths in characters."""

    kind = "synthetic"
    text_field = "text"

    def __init__(self, spec: str, options: SyntheticOptions, max_documents: int | None = None,
                 heldout: tuple = (), holdout: dict | None = None):
        self.spec, self.options, self.max_documents = spec, options, max_documents
        self.task = spec[len(PREFIX):]
        self.heldout = tuple(int(i) for i in heldout)
        self.holdout = holdout
        self._heldout_set = set(self.heldout)

    # --- what prepare asks of a source -------------------------------------------------------------------
    def describe(self) -> dict:
        corpus_root = sysconfig.get_paths()["stdlib"]
        d = {"spec": self.spec, "kind": "synthetic", "task": self.task, "generator": GENERATOR,
             "options": self.options.record(), "python": sys.version.split()[0], "root": corpus_root,
             "text_field": self.text_field}
        if self.heldout:
            d["heldout"] = {"documents": len(self.heldout), "holdout": self.holdout,
                            "stream": "held-out seed stream, files, names, values and triples (synthetic.split_of)"}
        if self.max_documents is not None:
            d["max_documents"] = self.max_documents
        return d

    def fingerprint(self) -> str:
        from .sources import open_source

        return _hash_strings([self.spec, GENERATOR, json.dumps(self.options.record(), sort_keys=True),
                              self.max_documents, json.dumps(self.heldout), open_source("stdlib").fingerprint()])

    def num_documents(self) -> int:
        n = self.options.documents
        return n if self.max_documents is None else min(n, self.max_documents)

    def texts(self) -> Iterator[str]:
        for text, _ in self.documents(None):
            yield text

    def with_holdout(self, holdout: dict | None) -> "SyntheticSource":
        """This source with the positions ``prepare``'s held-out split will take (``split_holdout``'s rule over
        ``num_documents()``) generated from the held-out stream."""
        from .preparation import split_holdout

        positions: tuple = ()
        if holdout:
            n = self.num_documents()
            index = np.stack([np.arange(n), np.ones(n, np.int64)], axis=1).astype(np.int64)
            _, held = split_holdout(index, holdout, f"source {self.spec!r}")
            positions = tuple(int(i) for i in held[:, 0])
        return SyntheticSource(self.spec, self.options, self.max_documents, positions, holdout)

    # --- the documents ------------------------------------------------------------------------------------
    def retrieval_positions(self) -> set:
        o = self.options
        k = int(round(o.fraction * o.documents))
        return set(random.Random(f"lightspan-synthetic/{o.seed}/assign").sample(range(o.documents), k))

    def documents(self, tok=None) -> Iterator[tuple]:
        """(document body: token ids (int64, no EOS) with ``tok``, else text; record) for every document in order.
        A record holds: index, split ("train" | "heldout"), kind ("plain" or a retrieval kind), length (with EOS),
        facts (sentences), questions (subjects), answers, distances (tokens from a group's first fact to its
        question), files (corpus files read, relative to the stdlib root)."""
        o = self.options
        corpus, codec = _corpus(), _codec(tok)
        retrieval = self.retrieval_positions()
        for i in range(self.num_documents()):
            split = "heldout" if i in self._heldout_set else "train"
            rng = random.Random(f"lightspan-synthetic/{o.seed}/{split}/{i}")
            d = _loguniform(rng, o.min_distance, o.max_distance)
            length = 1 << (d + LENGTH_ALLOWANCE).bit_length()  # > d + allowance: room for the EOS
            if i in retrieval:
                body, record = self._retrieval(rng, corpus, codec, split, length, d)
            else:
                buf, _, files = _filler(corpus, codec, rng, split, length - 1)
                body, record = buf[:length - 1], {"kind": "plain", "length": length, "facts": [], "questions": [],
                                                  "answers": [], "distances": [], "files": files}
            yield body, dict(record, index=i, split=split)

    def _retrieval(self, rng, corpus, codec, split, length, d):
        o = self.options
        kind = rng.choice(o.kinds)
        if kind == "passkey":
            n = 1
        elif kind == "multihop":
            n = rng.randint(1, max(1, o.keys // 2))
        else:  # several keys: 2..keys (where keys allows)
            n = rng.randint(min(2, o.keys), o.keys)
        groups = _groups(rng, kind, n, split)
        intro = codec.start(INTROS[kind])
        units = [([codec.cont(f + "\n") for f in g.facts], codec.cont(f"\n{g.question} {g.answer}.\n"))
                 for g in groups]
        while (events := self._layout(rng, len(intro), length - 1, units, d)) is None:
            if length >= 1 << 24:  # cannot happen: one group fits in a document of its distance + its pieces
                raise AssertionError("a synthetic document does not fit 16M tokens")
            length *= 2
        kept = sorted({gi for _, gi, _, _, _ in events})  # groups that found no room are left out
        body, distances, files = self._assemble(rng, corpus, codec, split, intro, units, events, length - 1)
        return body, {"kind": kind, "length": length, "facts": [f for gi in kept for f in groups[gi].facts],
                      "questions": [groups[gi].subject for gi in kept], "answers": [groups[gi].value for gi in kept],
                      "distances": [distances[gi] for gi in kept], "files": files}

    def _layout(self, rng, start: int, body: int, units, d_first: int):
        """Drawn positions [(position, group, fact index or -1 for the question, distance, (least, most
        distance))], sorted, all in [start, body], every piece with 4 TOL of room after it. Groups are placed in
        turn (the first at distance ``d_first``, clipped to what fits), each in up to 32 draws that miss the pieces
        already placed; a group that finds no room is left out. None when the first group does not fit at all.
        A question never comes before its facts: where min/max_distance are shorter than the facts, it follows
        them right away."""
        o = self.options
        events, taken = [], []  # taken: reserved [begin, end) intervals
        for gi, (facts, question) in enumerate(units):
            lens = [len(f) for f in facts]
            need = sum(lens) + 4 * TOL * len(lens)  # the facts and their room come before the question
            lo_d, hi_d = max(o.min_distance, need), max(o.max_distance, need)
            top = min(hi_d, body - 4 * TOL - len(question) - start)
            if top < lo_d:
                if gi == 0:
                    return None
                continue
            for _ in range(32):
                dist = min(max(d_first, lo_d), top) if gi == 0 else _loguniform(rng, lo_d, top)
                f = rng.randint(start, body - 4 * TOL - len(question) - dist)
                mine = [(f, 0, lens[0])]
                if len(facts) == 2:  # multihop: the second fact between the first and the question
                    mine.append((rng.randint(f + lens[0] + 4 * TOL, f + dist - lens[1] - 4 * TOL), 1, lens[1]))
                mine.append((f + dist, -1, len(question)))
                spans = [(p, p + size + 4 * TOL) for p, _, size in mine]
                if all(e <= b0 or e0 <= b for b, e in spans for b0, e0 in taken):
                    taken += spans
                    events += [(p, gi, k, dist, (lo_d, hi_d)) for p, k, _ in mine]
                    break
        return sorted(events)

    def _assemble(self, rng, corpus, codec, split, intro, units, events, body):
        """intro + filler with every piece at a line start near its drawn position, exactly ``body`` units."""
        buf, bounds, files = _filler(corpus, codec, rng, split, body + 8 * TOL)
        parts, pos, cur = [intro], len(intro), 0
        first, distances = {}, {}
        for nominal, gi, k, dist, (least, most) in events:
            if k >= 0:
                piece, target, lo, hi = units[gi][0][k], nominal, nominal - TOL, nominal + TOL
            else:  # the question: its distance from where the group's first fact actually went
                piece, target = units[gi][1], first[gi] + dist
                lo, hi = max(target - TOL, first[gi] + least), min(target + TOL, first[gi] + most)
            end = _snap(bounds, cur, pos, target, lo, hi)
            parts.append(buf[cur:end])
            pos, cur = pos + end - cur, end
            if k >= 0:
                first.setdefault(gi, pos)
            else:
                distances[gi] = pos - first[gi]
            parts.append(piece)
            pos += len(piece)
        if pos > body:  # the layout leaves room for every shift; this is a bug, not bad input
            raise AssertionError(f"synthetic document overflows: {pos} > {body} units")
        parts.append(buf[cur:cur + body - pos])
        return codec.join(parts), distances, files


def open_synthetic(spec: str, options: dict | None = None, max_documents: int | None = None) -> SyntheticSource:
    task = spec[len(PREFIX):]
    if task not in TASKS:
        raise ValueError(f"unknown synthetic source {spec!r}: known {[PREFIX + t for t in TASKS]}")
    return SyntheticSource(spec, SyntheticOptions.from_dict(options), max_documents)


def write_synthetic(src: SyntheticSource, out_dir: Path, tok, dtype, shard_tokens: int, progress: bool):
    """Token shards of ``src``'s documents, each followed by EOS (``prepare``'s writer for a synthetic source).
    Returns (shard records, document index, 0 source bytes)."""
    from tqdm import tqdm

    from .shards import ShardWriter

    writer = ShardWriter(out_dir, dtype, shard_tokens)
    eos = np.array([tok.eos_id], np.int64)
    parts, lengths, pending = [], [], 0
    for body, _ in tqdm(src.documents(tok), desc="[prepare] generating", unit="doc", total=src.num_documents(),
                        disable=not progress, mininterval=1.0):
        if len(body) and int(body.max()) >= tok.vocab_size:
            raise ValueError(f"token id {int(body.max())} >= the tokenizer's {tok.vocab_size} ids")
        parts += [body, eos]
        lengths.append(len(body) + 1)
        pending += len(body) + 1
        if pending >= 1 << 20:
            writer.add(np.concatenate(parts), np.array(lengths))
            parts, lengths, pending = [], [], 0
    if lengths:
        writer.add(np.concatenate(parts), np.array(lengths))
    shards, documents = writer.finish()
    return shards, documents, 0


# ------------------------------------------------------------------------------------------------------------
# evaluation prompts
# ------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalPrompt:
    """The fields of evaluation.retrieval.Example (``Example(**dataclasses.asdict(p))``)."""

    length: int
    depth: float
    trial: int
    ids: list  # the prompt, exactly `length` tokens, ending where the answer starts
    answer: str  # what a correct generation contains: the 5-digit key, or the ingredient
    answer_ids: list  # what an oracle generates (multihop: the chain " B. B holds V")
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    query: list = field(default_factory=list)  # the question's tokens (the query of a query-aware model)


def retrieval_prompts(tok, lengths, depths=None, kind: str = "passkey", trials: int = 1, seed: int = 0,
                      keys: int = 4, split: str = "heldout") -> list[RetrievalPrompt]:
    """Evaluation prompts in the training documents' format: the kind's intro, corpus text with the facts of
    ``keys`` groups (passkey: 1; multihop: keys // 2 chains, at least 1) at line starts, and the question about the
    first group at the very end, ``length`` tokens in all. ``depth`` places the asked fact (multihop: the link
    "A points to B"; its value fact goes anywhere) at that fraction of the text between intro and question: 0 right
    after the intro, 1 right before the question; the other facts go at random. Text, names and values are of the
    ``split`` class (default "heldout": never in a training document). A length too short for the fixed parts is
    left out (as evaluation/passkey.py does). Prompt (seed, kind, length, depth, trial) is the same every time."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {list(KINDS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    depths = [0.0, 0.25, 0.5, 0.75, 1.0] if depths is None else depths
    corpus, codec = _corpus(), _codec(tok)
    n = 1 if kind == "passkey" else max(1, keys // 2) if kind == "multihop" else max(1, keys)
    out = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"lightspan-synthetic-eval/{seed}/{kind}/{length}/{depth}/{trial}")
                groups = _groups(rng, kind, n, split, shuffle_hops=False)
                asked = groups[0]
                intro = codec.start(INTROS[kind])
                question = codec.cont(f"\n{asked.question}")
                full = codec.cont(f"\n{asked.question} {asked.answer}")
                if list(full[:len(question)]) == list(question):
                    answer_ids = [int(t) for t in full[len(question):]]
                else:
                    answer_ids = list(tok.encode(f" {asked.answer}"))
                pieces = [(codec.cont(f + "\n"), gi, k) for gi, g in enumerate(groups) for k, f in enumerate(g.facts)]
                room = length - len(intro) - len(question) - sum(len(p) for p, _, _ in pieces)
                if room < 0:
                    continue
                buf, bounds, files = _filler(corpus, codec, rng, split, room + TOL)
                bounds = bounds[bounds <= room]
                placed = []
                for order, (piece, gi, k) in enumerate(pieces):
                    target = depth * room if (gi, k) == (0, 0) else rng.uniform(0, room)
                    at = _snap(bounds, 0, 0, int(round(target)), int(target) - TOL, min(int(target) + TOL, room))
                    placed.append((min(at, room), order, piece, gi, k))
                placed.sort(key=lambda p: (p[0], p[1]))
                parts, cur, pos, asked_at = [intro], 0, len(intro), None
                for at, _, piece, gi, k in placed:
                    parts.append(buf[cur:at])
                    pos, cur = pos + at - cur, at
                    if gi == 0 and asked_at is None:
                        asked_at = pos
                    parts += [piece]
                    pos += len(piece)
                parts += [buf[cur:room], question]
                ids = [int(t) for t in codec.join(parts)]
                assert len(ids) == length, (len(ids), length)
                out.append(RetrievalPrompt(length, depth, trial, ids, asked.value, answer_ids, len(answer_ids) + 3,
                                           {"kind": kind, "question": asked.subject, "keys": n, "split": split,
                                            "distance": length - len(question) - asked_at},
                                           [int(t) for t in question]))
    return out


def plain_heldout_tokens(tok, n_tokens: int, seed: int = 0) -> np.ndarray:
    """``n_tokens`` tokens of plain corpus text of the held-out class (files no training document of any seed
    reads), tokenized as documents tokenize it: what "held-out perplexity on plain text" is measured on."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rng = random.Random(f"lightspan-synthetic-plain/{seed}")
    buf, _, _ = _filler(_corpus(), _codec(tok), rng, "heldout", n_tokens)
    return np.asarray(buf[:n_tokens], np.int64)


def score_generation(prompt: RetrievalPrompt, generated: str) -> bool:
    """A 5-digit answer: the first run of digits in the generation equals it (evaluation/passkey.py's rule; a
    multi-hop chain names no digits before its value); a word: the generation contains it, case-insensitive."""
    if prompt.answer.isdigit():
        found = re.search(r"\d+", generated)
        return found is not None and found.group(0) == prompt.answer
    return prompt.answer.lower() in generated.lower()


__all__ = ["SyntheticSource", "SyntheticOptions", "synthetic_options", "open_synthetic", "write_synthetic",
           "retrieval_prompts", "RetrievalPrompt", "score_generation", "plain_heldout_tokens", "split_of", "KINDS"]
