"""Needle in a haystack on generated filler: a length x depth grid, scored by string match.

The haystack is seeded random sentences ("The quiet river follows a narrow bridge near the old market.");
the needle says "The secret ingredient of the <color> <dish> is <ingredient>." and the prompt ends with
"What is the secret ingredient of the <color> <dish>? The secret ingredient of the <color> <dish> is". A
generation is correct when it contains the ingredient (case-insensitive). Chance: 1 / len(INGREDIENTS) for a
guesser that knows the answer is one of the listed ingredients.
"""
from __future__ import annotations

import random

from .retrieval import Example, TooShort, accuracy_grid, assemble, depth_grid, run_grid

INTRO = "Read the following notes carefully. A question about them follows.\n"
ADJ = ["quiet", "bright", "narrow", "old", "green", "heavy", "small", "busy", "cold", "gentle", "tall", "empty"]
NOUN = ["river", "bridge", "market", "garden", "train", "tower", "library", "forest", "harbor", "street",
        "village", "window"]
VERB = ["follows", "faces", "passes", "meets", "crosses", "watches", "joins", "leaves", "reaches", "circles"]
PLACE = ["the station", "the hill", "the school", "the lake", "the square", "the mill", "the church", "the farm"]
COLORS = ["red", "blue", "golden", "silver", "purple", "orange", "white", "black"]
DISHES = ["soup", "pie", "curry", "stew", "salad", "cake", "bread", "noodles"]
INGREDIENTS = ["saffron", "walnut", "ginger", "lemon", "basil", "honey", "pepper", "vanilla", "mustard", "coconut",
               "fennel", "cinnamon", "garlic", "mint", "sesame", "tamarind"]
CHANCE = 1 / len(INGREDIENTS)


def haystack(tok, n_tokens: int, rng: random.Random) -> tuple[list, list]:
    """(tokens, sentence starts) of seeded filler sentences, at least n_tokens long."""
    tokens, starts = [], []
    while len(tokens) < n_tokens:
        s = (f" The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} "
             f"{rng.choice(NOUN)} near {rng.choice(PLACE)}.")
        starts.append(len(tokens))
        tokens += tok.encode(s)
    return tokens, starts


def make_examples(tok, lengths, depths=None, seed: int = 0) -> list[Example]:
    depths = depth_grid(5) if depths is None else depths
    intro = tok.encode(INTRO)
    out = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}/{length}/{depth}")
            color, dish, ingredient = rng.choice(COLORS), rng.choice(DISHES), rng.choice(INGREDIENTS)
            needle = tok.encode(f" The secret ingredient of the {color} {dish} is {ingredient}.")
            question = tok.encode(f"\nWhat is the secret ingredient of the {color} {dish}? "
                                  f"The secret ingredient of the {color} {dish} is")
            filler, starts = haystack(tok, length, rng)
            try:
                ids = assemble(intro, filler, starts, needle, question, length, depth)
            except TooShort:
                continue
            answer_ids = tok.encode(" " + ingredient)
            out.append(Example(length, depth, 0, ids, ingredient, answer_ids, len(answer_ids) + 3,
                               {"question": f"{color} {dish}"}, query=question))
    return out


def score(example: Example, generated: str) -> bool:
    return example.answer.lower() in generated.lower()


def evaluate(model, tok, lengths, depths=None, seed: int = 0, progress: bool = False,
             tokens_per_batch: int = 32768) -> dict:
    examples = make_examples(tok, lengths, depths, seed)
    records = run_grid(model, examples, score, eos_id=tok.eos_id, tokens_per_batch=tokens_per_batch,
                       decode=tok.decode, progress=progress, desc="needle")
    out = {"task": "needle", "seed": seed, "trials": 1, "chance": CHANCE, **accuracy_grid(records),
           "too_short": sorted(set(lengths) - {e.length for e in examples}), "records": records}
    if getattr(model, "selects_by_query", False):
        out["query"] = "the question's tokens (query-aware context selection)"
    return out
