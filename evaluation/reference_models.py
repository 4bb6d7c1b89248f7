"""Stand-in models with the evaluation interface (see model_io): an oracle and a random guesser.

They let each task's generator and scorer be tested apart from any network: the oracle must score 100%,
the random guesser about chance.
"""
from __future__ import annotations

import torch


class OracleModel:
    """Knows the answers. `answers` maps a prompt (tuple of token ids) to either
    - the tokens to generate (for generate), or
    - a (T,) target tensor with IGNORE(-100) where nothing is asked (for logits_chunks): the oracle puts all
      its mass on the target at asked positions.
    """

    def __init__(self, vocab_size: int, answers: dict):
        self.vocab_size = vocab_size
        self.answers = answers

    def logits_chunks(self, ids: torch.Tensor):
        out = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            target = self.answers.get(tuple(row))
            if target is None:
                continue
            target = torch.as_tensor(target)
            asked = (target >= 0).nonzero()[:, 0]
            out[b, asked, target[asked]] = 30.0
        yield 0, out

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id=None) -> torch.Tensor:
        rows = [list(self.answers.get(tuple(r), []))[:max_new_tokens] for r in ids.tolist()]
        width = max(len(r) for r in rows)
        fill = eos_id if eos_id is not None else 0
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


class RandomModel:
    """Guesses uniformly among `choices` (default: the whole vocabulary), seeded."""

    def __init__(self, vocab_size: int, choices=None, seed: int = 0):
        self.vocab_size = vocab_size
        self.choices = torch.as_tensor(choices if choices is not None else range(vocab_size))
        self.gen = torch.Generator().manual_seed(seed)

    def logits_chunks(self, ids: torch.Tensor):
        out = torch.full((*ids.shape, self.vocab_size), -30.0)
        noise = torch.rand(*ids.shape, len(self.choices), generator=self.gen)
        out[..., self.choices] = noise
        yield 0, out

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id=None) -> torch.Tensor:
        pick = torch.randint(len(self.choices), (ids.shape[0], max_new_tokens), generator=self.gen)
        return self.choices[pick]


class CharTokenizer:
    """One token per character (ids 4 + code point mod (vocab - 4)); eos 2. Enough to test the prompt builders
    without a trained sentencepiece model. decode inverts encode for characters below vocab - 4."""

    eos_id, bos_id, pad_id = 2, 1, 3

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) % (self.vocab_size - 4) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 4) for i in ids if int(i) >= 4)
