"""Passkey retrieval (Mohtashami & Jaggi's prompt): a 5-digit number hidden in repeated filler text.

Prompt: intro, the filler "The grass is green. The sky is blue. ..." repeated, "The pass key is NNNNN. Remember
it. NNNNN is the pass key." at a depth, and "What is the pass key? The pass key is". Scored by exact match: the
first run of digits in the greedy continuation must equal the key. Chance (guessing 5 digits): 1e-5.
Every key is drawn from random.Random(f"{seed}/{length}/{depth}/{trial}"): the same seed gives the same prompts.
"""
from __future__ import annotations

import random
import re

from .retrieval import Example, TooShort, accuracy_grid, assemble, depth_grid, run_grid

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
CHANCE = 1e-5


def make_examples(tok, lengths, depths=None, trials: int = 1, seed: int = 0) -> list[Example]:
    depths = depth_grid(5) if depths is None else depths
    intro, unit, question = tok.encode(INTRO), tok.encode(FILLER), tok.encode(QUESTION)
    out = []
    for length in lengths:
        reps = length // max(len(unit), 1) + 1
        filler = unit * reps
        boundaries = [i * len(unit) for i in range(reps)]
        for depth in depths:
            for trial in range(trials):
                key = str(random.Random(f"{seed}/{length}/{depth}/{trial}").randint(10000, 99999))
                answer_ids = tok.encode(" " + key)
                try:
                    ids = assemble(intro, filler, boundaries, tok.encode(NEEDLE.format(key=key)), question, length,
                                   depth)
                except TooShort:
                    continue
                out.append(Example(length, depth, trial, ids, key, answer_ids, len(answer_ids) + 3, query=question))
    return out


def score(example: Example, generated: str) -> bool:
    found = re.search(r"\d+", generated)
    return found is not None and found.group(0) == example.answer


def answer_nll(model, examples: list[Example]) -> dict:
    """Teacher-forced negative log-likelihood of each key's tokens after its prompt, mean per answer token by
    length: a graded signal where exact match is still 0 (small models), lower = closer to retrieving it."""
    import torch

    from .model_io import IGNORE, token_nll

    by_len: dict[int, list[float]] = {}
    for ex in examples:
        full = ex.ids + ex.answer_ids
        targets = [IGNORE] * (len(ex.ids) - 1) + ex.answer_ids
        nll, _ = token_nll(model, torch.tensor([full[:-1]]), torch.tensor([targets]),
                           torch.tensor([ex.query]) if ex.query else None)
        by_len.setdefault(ex.length, []).append(float(nll.sum()) / len(ex.answer_ids))
    return {str(length): sum(v) / len(v) for length, v in sorted(by_len.items())}


def evaluate(model, tok, lengths, depths=None, trials: int = 1, seed: int = 0, progress: bool = False,
             tokens_per_batch: int = 32768, with_nll: bool = False) -> dict:
    """Exact-match grid; with_nll adds `answer_nll` ({length: mean NLL per key token}, one more prefill each)."""
    examples = make_examples(tok, lengths, depths, trials, seed)
    records = run_grid(model, examples, score, eos_id=tok.eos_id, tokens_per_batch=tokens_per_batch,
                       decode=tok.decode, progress=progress, desc="passkey")
    out = {"task": "passkey", "seed": seed, "trials": trials, "chance": CHANCE, **accuracy_grid(records),
           "too_short": sorted(set(lengths) - {e.length for e in examples}), "records": records}
    if getattr(model, "selects_by_query", False):
        out["query"] = "the question's tokens (query-aware context selection)"
    if with_nll:
        out["answer_nll"] = answer_nll(model, examples)
    return out
