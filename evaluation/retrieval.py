"""The engine shared by passkey and needle-in-a-haystack: place a needle in filler at a depth, at an exact
token length, decode greedily, score the answer.

A prompt is assembled from token pieces: intro + filler[:p] + needle + filler[p:] + question, with the filler
cut so the whole prompt is exactly `length` tokens, and p the filler-sentence boundary nearest to
depth x (filler length). Depth 0 puts the needle right after the intro, depth 1 right before the question.
All prompts of one length have the same size, so they batch without padding. A model that selects its context
by a query (a SharedLLM with model.sharedllm_select=query: `selects_by_query`) is handed each example's question
tokens as `query_ids`; such batches also share the question's length.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .distributed import gather_indexed, is_main, my_share


@dataclass
class Example:
    length: int
    depth: float
    trial: int
    ids: list  # the prompt, exactly `length` tokens
    answer: str  # what a correct generation contains
    answer_ids: list  # the answer's tokens (what an oracle generates)
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    query: list = field(default_factory=list)  # the question's tokens (the query of a query-aware model)


class TooShort(ValueError):
    """The requested length cannot hold the prompt's fixed parts; such lengths are left out and reported."""


def assemble(intro: list, filler: list, boundaries: list, needle: list, question: list, length: int,
             depth: float) -> list:
    """intro + filler[:p] + needle + filler[p:room] + question, exactly `length` tokens.

    filler: at least `room` tokens; boundaries: sorted sentence starts in filler (0 included)."""
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise TooShort(f"length {length} is too short for the prompt's fixed parts "
                         f"({len(intro) + len(needle) + len(question)} tokens)")
    if len(filler) < room:
        raise ValueError(f"filler has {len(filler)} tokens, {room} needed")
    cut = [b for b in boundaries if b <= room] + [room]
    target = depth * room
    i = bisect.bisect_left(cut, target)
    p = min(cut[max(i - 1, 0):i + 1], key=lambda b: abs(b - target)) if cut else 0
    return intro + filler[:p] + needle + filler[p:room] + question


def depth_grid(n: int) -> list[float]:
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [0.5]


def run_grid(model, examples: list[Example], score, eos_id=None, tokens_per_batch: int = 32768,
             decode=None, progress: bool = False, desc: str = "retrieval") -> list[dict]:
    """Greedy-decode every example (shared out over data-parallel ranks, batched by length) and score it.

    score(example, generated_text) -> bool; decode(ids) -> text. Returns one record per example, in order."""
    mine = my_share(len(examples))
    by_query = bool(getattr(model, "selects_by_query", False))
    by_len: dict[tuple, list[int]] = {}
    for i in mine:
        ex = examples[i]
        by_len.setdefault((ex.length, len(ex.query) if by_query else 0), []).append(i)
    batches = []
    for (length, _), idx in sorted(by_len.items()):
        size = max(1, tokens_per_batch // length)
        batches += [idx[j:j + size] for j in range(0, len(idx), size)]
    local = {}
    for batch in tqdm(batches, desc=desc, disable=not (progress and is_main()), leave=False):
        ids = torch.tensor([examples[i].ids for i in batch], dtype=torch.long)
        kw = {}
        if by_query and examples[batch[0]].query:
            kw["query_ids"] = torch.tensor([examples[i].query for i in batch], dtype=torch.long)
        new = model.generate(ids, max(examples[i].max_new_tokens for i in batch), eos_id=eos_id, **kw)
        for row, i in enumerate(batch):
            ex = examples[i]
            toks = [int(t) for t in new[row, :ex.max_new_tokens].tolist()]
            if eos_id is not None and eos_id in toks:
                toks = toks[:toks.index(eos_id)]
            text = decode(toks)
            local[i] = {"length": ex.length, "depth": ex.depth, "trial": ex.trial, "answer": ex.answer,
                        "generated": text, "correct": bool(score(ex, text)), **ex.meta}
    return gather_indexed(local)


def accuracy_grid(records: list[dict]) -> dict:
    """{lengths, depths, accuracy[length_i][depth_j], cell_trials[length_i][depth_j] (examples per cell), overall}."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    cells = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(r["correct"])
    acc = [[(sum(cells[(l, d)]) / len(cells[(l, d)])) if (l, d) in cells else None for d in depths]
           for l in lengths]
    counts = [[len(cells.get((l, d), ())) for d in depths] for l in lengths]
    overall = sum(r["correct"] for r in records) / max(len(records), 1)
    return {"lengths": lengths, "depths": depths, "accuracy": acc, "cell_trials": counts, "overall": overall}
