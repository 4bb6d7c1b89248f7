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
        vocab_size=cfg.model.vocab_size,  # token ids are range-checked against the model's vocabulary
    )
    return loader, data_pipeline.load_tokenizer(prepared).vocab_size
