"""lightspan data pipeline: sources -> tokenizer -> token shards -> dataset decomposition -> stateful loader.

Public API::

    prepare(source, out_dir, tokenizer=None, vocab_size=8192, num_workers=2, holdout_docs=0, holdout=0.0,
            shard=None, num_shards=None, ...) -> Path
    prepare_tokenizer(source, out_dir, vocab_size, ...) -> Path   (the one tokenizer of a sharded preparation)
    prepare_shard(source, out_dir, shard, num_shards, tokenizer=None, ...) -> Path ; merge_shards(out_dir, ...) -> Path
    prepare_mixture(out_dir, sources=[{path, weight, text_field}], tokenizer=None, ...) -> Path
    load_tokenizer(path) -> Tokenizer | HFTokenizer (sentencepiece .model, or Hugging Face tokenizer.json / folder)
    train_tokenizer(texts, out_path, vocab_size, ...) -> Tokenizer ; padded_vocab_size(n, multiple_of, tp) -> int
    build_loader(prepared_dir, kind="dd"|"concat", tokens_per_step, seq_len=None, min_log2=8, max_log2=13,
                 curriculum="grow_p2", cycles=8, seed=0, dp_rank=0, dp_size=1, cp_rank=0, cp_size=1,
                 verify="lazy", tokenizer=None, vocab_size=None, weights=None) -> loader (MixtureLoader for a
                 mixture folder)
    stats(prepared_dir, tokens_per_step, min_log2, max_log2, train_tokens=None) -> dict
    verify_prepared(prepared_dir, tokenizer=None) -> manifest
    export_megatron(prepared_dir, out_prefix) -> prefix   (needs megatron-core)
    prepare("synthetic:retrieval", out_dir, synthetic={seed, documents, fraction, kinds, keys, min_distance,
            max_distance}, holdout_docs=...)   (generated retrieval documents; synthetic_options(cfg.data))
    retrieval_prompts(tok, lengths, depths, kind, trials, seed, keys, split="heldout") -> [RetrievalPrompt]
            (evaluation prompts in the synthetic documents' format) ; score_generation(prompt, text) -> bool ;
            plain_heldout_tokens(tok, n) -> held-out-class corpus text (held-out perplexity)

Bad input raises one-sentence errors naming the file and the fix: ``SourceError`` (a ValueError: empty, not
UTF-8, unparsable, no text column), ``NoSuchSourceError`` (a FileNotFoundError), ``OutputFolderError`` (a
ValueError: the output overlaps the source or holds foreign files), ``CorruptCorpusError`` (a ValueError and a
RuntimeError: a prepared folder that disagrees with its manifest, or token ids outside the vocabulary).

Names are imported on first use (PEP 562): tokenizer worker processes, which import this package, and the
``prepare`` / ``stats`` commands then never pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "preparation", "verify_prepared": "preparation", "OutputFolderError": "preparation",
    "prepare_shard": "preparation", "prepare_tokenizer": "preparation", "merge_shards": "preparation",
    "split_holdout": "preparation",
    "prepare_mixture": "mixture", "MixtureLoader": "mixture", "is_mixture": "mixture", "read_mixture": "mixture",
    "build_loader": "loader", "LOADER_KINDS": "loader",
    "stats": "corpus_stats",
    "Tokenizer": "tokenizer", "HFTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer", "padded_vocab_size": "tokenizer", "check_model_vocab": "tokenizer",
    "is_hf_tokenizer": "tokenizer",
    "DDLoader": "dd_loader", "ConcatLoader": "concat_loader",
    "TokenStore": "shards", "CorruptCorpusError": "shards",
    "export_megatron": "megatron_io", "MegatronNotInstalled": "megatron_io",
    "decompose_lengths": "decompose",
    "epoch_schedule": "curriculum", "curriculum_odds": "curriculum", "CURRICULA": "curriculum",
    "open_source": "sources", "stdlib_files": "sources", "SourceError": "sources",
    "NoSuchSourceError": "sources",
    "IGNORE_INDEX": "sharding",
    "SyntheticSource": "synthetic", "synthetic_options": "synthetic", "retrieval_prompts": "synthetic",
    "RetrievalPrompt": "synthetic", "score_generation": "synthetic", "plain_heldout_tokens": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
