"""Wires the `data` config section to `data_pipeline`: prepare the corpus (one source or a mixture) if needed,
build the loader, and check the tokenizer against the model's vocabulary."""
from __future__ import annotations

from pathlib import Path

from pretrain.config import Config, ConfigError


def mixture_sources(cfg: Config) -> list[dict] | None:
    """`data.sources` checked and completed ({path, weight, text_field, dir} each), or None for one source.
    Errors name the entry: `data.sources[1].weight must be a number > 0, got 0`."""
    if not cfg.data.sources:
        return None
    from data_pipeline.mixture import normalize_sources

    try:
        return normalize_sources(cfg.data.sources, cfg.data.text_field)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_named_tokenizer(cfg: Config) -> None:
    """A data.tokenizer with more ids than model.vocab_size is refused before anything is tokenized."""
    if not cfg.data.tokenizer:
        return
    import data_pipeline

    tok = data_pipeline.load_tokenizer(cfg.data.tokenizer)
    data_pipeline.check_model_vocab(tok.vocab_size, cfg.model.vocab_size, f"data.tokenizer {cfg.data.tokenizer}")


def ensure_prepared(cfg: Config) -> Path:
    """Tokenize `data.source` (or every `data.sources` entry) into `data.prepared_dir` unless it is already there
    (a one-process or a merged sharded preparation of the same source counts)."""
    import data_pipeline

    d = cfg.data
    out = Path(d.prepared_dir)
    sources = mixture_sources(cfg)
    _check_named_tokenizer(cfg)
    if sources is not None:
        data_pipeline.prepare_mixture(out, sources, tokenizer=d.tokenizer or None, vocab_size=cfg.model.vocab_size,
                                      text_field=d.text_field, num_workers=d.workers, holdout_docs=d.holdout_docs,
                                      holdout=d.holdout, synthetic=data_pipeline.synthetic_options(d))
        return out
    data_pipeline.prepare(
        d.source,
        out,
        tokenizer=d.tokenizer or None,
        vocab_size=cfg.model.vocab_size,
        num_workers=d.workers,
        text_field=d.text_field,
        holdout_docs=d.holdout_docs,
        holdout=d.holdout,
        synthetic=data_pipeline.synthetic_options(d),  # the options of a synthetic:... source (else unused)
    )
    return out


def corpus_vocab_size(prepared: Path) -> int:
    """The vocabulary of the tokenizer a prepared folder (or mixture folder) was made with, from its manifest."""
    import data_pipeline
    from data_pipeline.shards import read_manifest

    if data_pipeline.is_mixture(prepared):
        mix = data_pipeline.read_mixture(prepared)
        return max(int(read_manifest(prepared / s["dir"])["vocab_size"]) for s in mix["sources"])
    return int(read_manifest(prepared)["vocab_size"])


def padded_model_vocab(cfg: Config, tokenizer_vocab: int) -> int:
    """model.vocab_size for a tokenizer of `tokenizer_vocab` ids under `model.vocab_size_multiple_of` (m > 0): the
    smallest multiple of m x parallel.tp that holds the tokenizer (Megatron's rule); without the field (or 0):
    model.vocab_size unchanged."""
    import data_pipeline

    multiple = int(getattr(cfg.model, "vocab_size_multiple_of", 0) or 0)
    if multiple <= 0:
        return cfg.model.vocab_size
    return data_pipeline.padded_vocab_size(tokenizer_vocab, multiple, cfg.parallel.tp)


def build_train_loader(cfg: Config, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1):
    """Returns (stateful loader, tokenizer vocab size) over the prepared `data.prepared_dir` (`ensure_prepared` makes
    it). With `model.vocab_size_multiple_of` set, model.vocab_size is first set to the padded size
    (`padded_model_vocab`); a tokenizer larger than model.vocab_size is refused naming both numbers."""
    import data_pipeline

    d = cfg.data
    sources = mixture_sources(cfg)
    prepared = Path(d.prepared_dir)  # prepared by `ensure_prepared` on one rank before every rank gets here
    vocab = corpus_vocab_size(prepared)
    cfg.model.vocab_size = padded_model_vocab(cfg, vocab)
    data_pipeline.check_model_vocab(vocab, cfg.model.vocab_size, f"the tokenizer of {prepared}")
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
        weights=[s["weight"] for s in sources] if sources is not None else None,
    )
    return loader, vocab
