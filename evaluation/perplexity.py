"""Perplexity vs context length: sliding windows over a held-out token stream.

For a stream x of N tokens, a window length L and a stride s, windows start at 0, s, 2s, ... and the last one
is moved back to end exactly at N, so every window holds min(L, N) tokens. Each token t in [1, N) is scored
once, by the first window that reaches it, from the tokens before it in that window: the first window scores
all of its tokens, every later one only its last tokens (those past the previous window's end), so every
later score sees at least L - s tokens of context. With L >= N this is one window: the full-sequence
perplexity exp(mean_t -log p(x_t | x_<t)).

Held-out split: the documents a preparation kept out of training (`prepare --holdout-docs N` / `--holdout F`,
`data.holdout_docs` / `data.holdout`; no loader reads them), in their stored order; for a mixture folder, each
source's held-out documents in proportion to its weight. A folder prepared without a split falls back to its LAST
documents (stored order), which the training loaders do read; results say which.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from .distributed import gather_indexed, is_main, my_share
from .model_io import IGNORE, token_nll


def heldout_tokens(prepared_dir, n_tokens: int) -> tuple[np.ndarray, dict]:
    """Up to n_tokens tokens of held-out text, concatenated in order: the preparation's held-out documents when it
    has a held-out split (a mixture: each source's, split by weight), else its last documents (see above)."""
    from pathlib import Path

    from data_pipeline import TokenStore, is_mixture, read_mixture

    if is_mixture(prepared_dir):
        sources = read_mixture(prepared_dir)["sources"]
        total_w = sum(s["weight"] for s in sources)
        parts, infos = [], []
        for s in sources:
            want = max(1, round(n_tokens * s["weight"] / total_w))
            tokens, info = heldout_tokens(Path(prepared_dir) / s["dir"], want)
            parts.append(tokens)
            infos.append(dict(info, weight=s["weight"]))
        tokens = np.concatenate(parts)[:n_tokens]
        unseen = all(i["unseen"] for i in infos)
        return tokens, {"prepared_dir": str(prepared_dir), "sources": infos, "tokens": int(len(tokens)),
                        "unseen": unseen,
                        "note": "held-out = each mixture source's held-out documents, in proportion to its weight"
                                + ("" if unseen else " (some sources have no held-out split: their last documents, "
                                                      "which the loaders read)")}
    store = TokenStore(prepared_dir)
    if len(store.heldout):
        docs = np.asarray(store.heldout)
        parts, total = [], 0
        for start, length in docs:
            if total >= n_tokens:
                break
            take = min(int(length), n_tokens - total)
            parts.append(store.read(int(start), take))
            total += take
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        info = {"prepared_dir": str(prepared_dir), "split": "heldout", "num_documents": len(parts),
                "of_heldout_documents": int(len(docs)), "tokens": int(len(tokens)), "unseen": True,
                "note": f"held-out = {len(parts)} of the {len(docs)} documents the preparation kept out of training "
                        f"(no loader reads them)"}
        return tokens, info
    docs = np.asarray(store.documents)
    take, total = 0, 0
    while take < len(docs) and total < n_tokens:
        take += 1
        total += int(docs[-take, 1])
    first = len(docs) - take
    start = int(docs[first, 0])
    tokens = store.read(start, min(total, n_tokens))
    info = {"prepared_dir": str(prepared_dir), "split": "last_documents", "documents": [first, len(docs)],
            "num_documents": take, "tokens": int(len(tokens)), "unseen": False,
            "note": f"held-out = the last {take} of {len(docs)} documents of the prepared folder (stored order); "
                    f"the training loaders do not exclude them (prepare with --holdout-docs N or data.holdout for "
                    f"unseen text)"}
    return tokens, info


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of n tokens."""
    # a window can score tokens from begin+1 on, so stride <= length-1 leaves no token unscored
    length = min(length, n)
    stride = max(1, min(stride, length - 1))
    begins = list(range(0, max(n - length, 0), stride)) + [max(n - length, 0)]
    out, prev_end = [], 1
    for b in dict.fromkeys(begins):
        e = b + length
        if e > prev_end:
            out.append((b, e, max(prev_end, b + 1)))
            prev_end = e
    return out


def window_targets(tokens: torch.Tensor, begin: int, end: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (end-begin,), targets (end-begin,): targets[j] = x[begin+j+1] where begin+j+1 in [first, end)."""
    ids = tokens[begin:end]
    targets = torch.full_like(ids, IGNORE)
    lo = first - begin - 1
    targets[lo:end - begin - 1] = tokens[first:end]
    return ids, targets


def sliding_window_nll(model, tokens, length: int, stride: int, tokens_per_batch: int = 16384,
                       progress: bool = False) -> tuple[float, int]:
    """(sum of -log p over scored tokens, their count); the windows are shared out over data-parallel ranks."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    spans = windows(len(tokens), length, stride)
    mine = my_share(len(spans))
    per_batch = max(1, tokens_per_batch // min(length, len(tokens)))
    local = {}
    batches = [mine[i:i + per_batch] for i in range(0, len(mine), per_batch)]
    for batch in tqdm(batches, desc=f"ppl L={length}", disable=not (progress and is_main()), leave=False):
        pairs = [window_targets(tokens, *spans[i]) for i in batch]
        ids = torch.stack([p[0] for p in pairs])
        targets = torch.stack([p[1] for p in pairs])
        nll, _ = token_nll(model, ids, targets)
        for row, i in enumerate(batch):
            local[i] = (float(nll[row].sum()), int((targets[row] != IGNORE).sum()))
    records = gather_indexed(local)
    return math.fsum(r[0] for r in records), sum(r[1] for r in records)


def perplexity_curve(model, tokens, lengths, stride_frac: float = 0.5, tokens_per_batch: int = 16384,
                     progress: bool = False) -> list[dict]:
    """One point per context length: {length, stride, windows, tokens, nll, ppl}."""
    out = []
    for length in lengths:
        stride = max(1, int(length * stride_frac))
        total, count = sliding_window_nll(model, tokens, length, stride, tokens_per_batch, progress)
        out.append({"length": int(length), "stride": stride, "windows": len(windows(len(tokens), length, stride)),
                    "tokens": count, "nll": total / max(count, 1), "ppl": math.exp(total / max(count, 1))})
    return out
