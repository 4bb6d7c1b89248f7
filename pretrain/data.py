"""Wires the `data` config section to `data_pipeline`: prepare the corpus if needed, build the loader."""
from __future__ import annotations

from pathlib import Path

from pretrain.config import Config


def ensure_prepared(cfg: Config) -> Path:
    """Tokenize `data.source` into `data.prepared_dir` unless a complete manifest is already there."""
    import data_pipeline

    out = Path(cfg.data.prepared_dir)
    data_pipeline.prepare(
        cfg.data.source,
        out,
        tokenizer=cfg.data.tokenizer or None,
        vocab_size=cfg.model.vocab_size,
        num_workers=cfg.data.workers,
        text_field=cfg.data.text_field,
    )
    return out


def build_train_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1):
    """Returns (stateful loader, tokenizer vocab size)."""
    import data_pipeline

    d = cfg.data
    prepared = ensure_prepared(cfg)
    loader = data_pipeline.build_loader(
        prepared,
        kind=d.loader,
        tokens_per_step=d.tokens_per_step,
        seq_len=d.seq_len,
        min_log2=d.min_log2,
        max_log2=d.max_log2,
        curriculum=d.curriculum,
        cycles=d.cycles,
        seed=cfg.train.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        cp_rank=cp_rank,
        cp_size=cp_size,
    )
    return loader, data_pipeline.load_tokenizer(prepared).vocab_size


def check_sharedllm_data(cfg: Config) -> None:
    """SharedLLM trains on sequences of n*C context tokens + running text: every length the loader can emit
    must leave running text that the cp ranks can split evenly, and the n chunks must split over cp."""
    m, d, cp = cfg.model, cfg.data, cfg.parallel.cp
    n, c = m.sharedllm_context_chunks, m.sharedllm_chunk
    if m.sharedllm_select != "right":
        raise ValueError(f"model.sharedllm_select={m.sharedllm_select!r} needs a query per example (instruction or QA "
                         f"data); language-model pretraining on the corpus expands the half nearest the running "
                         f"text: set model.sharedllm_select=right")
    lengths = [d.seq_len] if d.loader == "concat" else [1 << i for i in range(d.min_log2, d.max_log2 + 1)]
    field = "data.seq_len" if d.loader == "concat" else "2^data.min_log2"
    short = min(lengths)
    if short <= n * c:
        raise ValueError(f"model.arch=sharedllm: {field} ({short}) leaves no running text after the "
                         f"{n} x {c} context tokens (model.sharedllm_context_chunks x model.sharedllm_chunk): "
                         f"raise {field} above {n * c} or lower model.sharedllm_context_chunks")
    if n % cp:
        raise ValueError(f"model.sharedllm_context_chunks ({n}) not divisible by parallel.cp ({cp}): each cp rank "
                         f"compresses an equal share of the context chunks")
    bad = [t - n * c for t in lengths if (t - n * c) % cp]
    if bad:
        raise ValueError(f"model.arch=sharedllm: running text of {bad[0]} tokens not divisible by parallel.cp ({cp})")


def sharedllm_batch(batch: dict, model_cfg, cp_rank: int = 0, cp_size: int = 1) -> dict:
    """A loader batch of whole sequences (B, n*C + T) -> SharedLLM's inputs, this cp rank's share of them.

    input_ids / labels: the running text's columns [cp_rank*T/cp, (cp_rank+1)*T/cp) (labels of the context are
    dropped: the loss is on the running text); context_chunks: (B, n/cp, C) this rank's chunks; chunk_offset,
    total_chunks (n) and position_offset (the text shard's start) for `SharedLLM.forward`.
    """
    from model.sharedllm import split_context

    n, c = model_cfg.sharedllm_context_chunks, model_cfg.sharedllm_chunk
    if int(batch.get("position_offset", 0)):
        raise ValueError("sharedllm_batch needs whole sequences: build the loader with cp_size=1")
    chunks, text = split_context(batch["input_ids"], n, c)
    labels = batch["labels"][:, n * c:]
    t = text.shape[1]
    if n % cp_size or t % cp_size:
        raise ValueError(f"SharedLLM context chunks ({n}) and running text ({t} tokens) must both divide by "
                         f"parallel.cp ({cp_size})")
    per_chunks, per_text = n // cp_size, t // cp_size
    cols = slice(cp_rank * per_text, (cp_rank + 1) * per_text)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    out.update(input_ids=text[:, cols], labels=labels[:, cols], position_offset=cp_rank * per_text,
               context_chunks=chunks[:, cp_rank * per_chunks:(cp_rank + 1) * per_chunks],
               chunk_offset=cp_rank * per_chunks, total_chunks=n)
    return out
