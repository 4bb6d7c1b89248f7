"""Command-line front ends: ``lightspan prepare`` -> ``prepare_main``, ``lightspan data stats`` -> ``stats_main``."""

from __future__ import annotations

import argparse
import json
import sys


def prepare_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightspan prepare",
                                description="Tokenize a corpus into memory-mapped token shards (+ tokenizer, manifest).")
    p.add_argument("--source", default="stdlib",
                   help="'stdlib' (default), a jsonl/json/parquet/txt file or folder, a Megatron prefix "
                        "(or megatron:PREFIX), or a hub dataset name[:config]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default=None, help="existing sentencepiece .model (default: train one)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--no-byte-fallback", action="store_true", help="train without byte fallback")
    p.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="MB of text to train the tokenizer on (default: max(4, vocab x 250 bytes))")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--text-field", default="text", help="column holding the text")
    p.add_argument("--split", default="train", help="hub dataset split")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="max tokens per shard file")
    p.add_argument("--max-documents", type=int, default=None, help="only the first N documents")
    p.add_argument("--overwrite", action="store_true", help="replace a different preparation in --out")
    p.add_argument("--verify", action="store_true", help="hash every written file against the manifest afterwards")
    args = p.parse_args(argv)

    from .preparation import prepare, verify_prepared

    sample = None if args.tokenizer_sample_mb is None else int(args.tokenizer_sample_mb * 1e6)
    try:
        out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      model_type=args.model_type, byte_fallback=not args.no_byte_fallback,
                      tokenizer_sample_bytes=sample, text_field=args.text_field, split=args.split,
                      num_workers=args.workers, shard_tokens=args.shard_tokens, max_documents=args.max_documents,
                      overwrite=args.overwrite)
        if args.verify:
            verify_prepared(out)
            print(f"[prepare] verified every file in {out} against its manifest")
    except (OSError, ValueError, KeyError) as e:  # bad input of any kind (CorruptCorpusError is a ValueError)
        print(f"lightspan prepare: {e}", file=sys.stderr)
        return 1
    print(f"[prepare] done: {out.resolve()}  (inspect with `lightspan data stats {out}`)")
    return 0


def stats_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightspan data stats",
                                description="Documents, tokens and per-bucket steps of a prepared corpus.")
    p.add_argument("dir", help="prepared folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tokens-per-step", type=int, default=1 << 16)
    p.add_argument("--min-log2", type=int, default=8)
    p.add_argument("--max-log2", type=int, default=13)
    p.add_argument("--verify", action="store_true", help="also hash every file against the manifest")
    args = p.parse_args(argv)

    from .preparation import verify_prepared
    from .corpus_stats import stats

    try:
        if args.verify:
            verify_prepared(args.dir)
        s = stats(args.dir, args.tokens_per_step, args.min_log2, args.max_log2)
    except (OSError, ValueError) as e:  # bad input of any kind (CorruptCorpusError is a ValueError)
        print(f"lightspan data stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['dir']}: source {s['source']!r}, vocab {s['vocab_size']} ({s['dtype']}), {s['shards']} shard(s)")
    print(f"  documents {s['documents']:,}  tokens {s['tokens']:,}  doc length " +
          " ".join(f"{k} {v:,}" for k, v in s["doc_length_percentiles"].items()))
    print(f"  decomposition 2^{s['min_log2']}..2^{s['max_log2']}, {s['tokens_per_step']:,} tokens per step:")
    print(f"  {'seq_len':>8} {'pieces':>10} {'tokens':>13} {'share':>6} {'steps/epoch':>12}")
    for b in s["buckets"].values():
        share = b["tokens"] / max(s["tokens"], 1)
        print(f"  {b['seq_len']:>8} {b['pieces']:>10,} {b['tokens']:>13,} {share:>6.1%} {b['steps_per_epoch']:>12,}")
    print(f"  dropped (tails under 2^{s['min_log2']}): {s['dropped_tokens']:,} tokens ({s['dropped_fraction']:.1%})")
    print(f"  steps per epoch: dd {s['steps_per_epoch']:,}, concat at 2^{s['max_log2']} {s['concat_steps_per_epoch']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(prepare_main())
