"""Command-line front ends: ``lightspan prepare`` -> ``prepare_main``, ``lightspan data stats`` -> ``stats_main``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _shard_from_env(shard: str, num_shards: int | None) -> tuple[int, int]:
    """--shard I, or --shard auto: torchrun's RANK / WORLD_SIZE, else a slurm array task's index and count."""
    import os

    if shard != "auto":
        try:
            i = int(shard)
        except ValueError:
            raise ValueError(f"--shard {shard!r}: give a shard index (0 <= I < --num-shards) or 'auto'") from None
        if num_shards is None:
            raise ValueError("--shard needs --num-shards N (how many shards the source is cut into)")
        return i, num_shards
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun: each rank one shard
        i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        raise ValueError("--shard auto reads RANK and WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID and "
                         "SLURM_ARRAY_TASK_COUNT (a slurm job array), and neither is set; pass --shard I --num-shards N")
    if num_shards is not None and num_shards != n:
        raise ValueError(f"--num-shards {num_shards} disagrees with the launcher's {n} tasks")
    return i, n


def _synthetic_options(items: list[str]) -> dict | None:
    """--synthetic KEY=VALUE ... -> {KEY: VALUE} (values read as YAML scalars or lists: 0.3, [passkey,needle])."""
    if not items:
        return None
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--synthetic {item!r}: write it as KEY=VALUE, e.g. --synthetic fraction=0.3")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"--synthetic {item!r}: cannot read {raw!r} as a value") from None
    return out


def prepare_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightspan prepare",
                                description="Tokenize a corpus into memory-mapped token shards (+ tokenizer, manifest).",
                                epilog="Sharded: `--tokenizer-only` once (or give --tokenizer to every shard), then "
                                       "`--shard I --num-shards N` for every I (any order, any machines), then "
                                       "`--merge DIR`. launch/slurm/prepare.sbatch runs all three on slurm.")
    p.add_argument("--source", default="stdlib",
                   help="'stdlib' (default), a jsonl/json/parquet/txt file or folder, a Megatron prefix "
                        "(or megatron:PREFIX), 'synthetic:retrieval' (generated retrieval documents over the "
                        "stdlib corpus; options: --synthetic), or a hub dataset name[:config]")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--tokenizer", default=None,
                   help="existing tokenizer: a sentencepiece .model, a Hugging Face tokenizer.json or a folder holding "
                        "one (local only); default: train a sentencepiece one")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--no-byte-fallback", action="store_true", help="train without byte fallback")
    p.add_argument("--tokenizer-sample-mb", type=float, default=None,
                   help="MB of text to train the tokenizer on (default: max(4, vocab x 250 bytes))")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (--merge: hashing threads)")
    p.add_argument("--text-field", default="text", help="column holding the text")
    p.add_argument("--split", default="train", help="hub dataset split")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="max tokens per shard file")
    p.add_argument("--max-documents", type=int, default=None, help="only the first N documents")
    p.add_argument("--holdout-docs", type=int, default=0,
                   help="keep N documents (evenly spread) out of training; evaluation's perplexity reads them")
    p.add_argument("--holdout", type=float, default=0.0, help="... or a fraction of the documents, in [0, 1)")
    p.add_argument("--shard", default=None,
                   help="prepare only shard I of --num-shards into OUT/shard_0000I/ ('auto': torchrun's RANK / "
                        "WORLD_SIZE or the slurm array task)")
    p.add_argument("--num-shards", type=int, default=None, help="how many shards the source is cut into")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="only train the tokenizer into OUT (the one every shard then uses)")
    p.add_argument("--merge", metavar="DIR", default=None,
                   help="join DIR/shard_*/ into one prepared folder (checks every shard; copies no token)")
    p.add_argument("--check", default="sha256", choices=["sha256", "size"],
                   help="--merge: hash every shard file against its manifest (default), or check sizes only")
    p.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --source synthetic:retrieval (repeatable): seed, documents, fraction, kinds, "
                        "keys, min_distance, max_distance (the config's data.synthetic_*)")
    p.add_argument("--overwrite", action="store_true", help="replace a different preparation in --out")
    p.add_argument("--verify", action="store_true", help="hash every written file against the manifest afterwards")
    args = p.parse_args(argv)
    if args.merge is None and args.out is None:
        p.error("--out is required (or --merge DIR)")

    from .preparation import merge_shards, prepare, prepare_tokenizer, verify_prepared

    sample = None if args.tokenizer_sample_mb is None else int(args.tokenizer_sample_mb * 1e6)
    try:
        synthetic = _synthetic_options(args.synthetic)
        if args.merge is not None:
            out = merge_shards(args.merge, holdout_docs=args.holdout_docs, holdout=args.holdout, check=args.check,
                               workers=args.workers)
        elif args.tokenizer_only:
            path = prepare_tokenizer(args.source, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                                     byte_fallback=not args.no_byte_fallback, tokenizer_sample_bytes=sample,
                                     text_field=args.text_field, split=args.split, max_documents=args.max_documents,
                                     overwrite=args.overwrite)
            print(f"[prepare] tokenizer: {path}")
            return 0
        else:
            shard = num_shards = None
            if args.shard is not None or args.num_shards is not None:
                shard, num_shards = _shard_from_env(args.shard if args.shard is not None else "auto",
                                                    args.num_shards)
            out = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          model_type=args.model_type, byte_fallback=not args.no_byte_fallback,
                          tokenizer_sample_bytes=sample, text_field=args.text_field, split=args.split,
                          num_workers=args.workers, shard_tokens=args.shard_tokens, max_documents=args.max_documents,
                          overwrite=args.overwrite, holdout_docs=args.holdout_docs, holdout=args.holdout,
                          shard=shard, num_shards=num_shards, synthetic=synthetic)
        if args.verify:
            verify_prepared(out)
            print(f"[prepare] verified every file in {out} against its manifest")
    except (OSError, ValueError, KeyError) as e:  # bad input of any kind (CorruptCorpusError is a ValueError)
        print(f"lightspan prepare: {e}", file=sys.stderr)
        return 1
    print(f"[prepare] done: {Path(out).resolve()}  (inspect with `lightspan data stats {out}`)")
    return 0


def stats_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightspan data stats",
                                description="Documents, tokens and per-bucket steps of a prepared corpus (a mixture: "
                                            "per-source tokens and effective epochs).")
    p.add_argument("dir", help="prepared folder (or a mixture folder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tokens-per-step", type=int, default=1 << 16)
    p.add_argument("--min-log2", type=int, default=8)
    p.add_argument("--max-log2", type=int, default=13)
    p.add_argument("--train-tokens", type=float, default=None,
                   help="mixture: tokens a run trains on, for the effective epochs (default: all sources' tokens)")
    p.add_argument("--verify", action="store_true", help="also hash every file against the manifest")
    args = p.parse_args(argv)

    from .corpus_stats import stats
    from .mixture import is_mixture, read_mixture
    from .preparation import verify_prepared

    try:
        if args.verify:
            dirs = [Path(args.dir) / s["dir"] for s in read_mixture(args.dir)["sources"]] \
                if is_mixture(args.dir) else [args.dir]
            for d in dirs:
                verify_prepared(d)
        s = stats(args.dir, args.tokens_per_step, args.min_log2, args.max_log2,
                  int(args.train_tokens) if args.train_tokens else None)
    except (OSError, ValueError) as e:  # bad input of any kind (CorruptCorpusError is a ValueError)
        print(f"lightspan data stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    if s.get("mixture"):
        _print_mixture(s)
        return 0
    _print_one(s)
    return 0


def _print_one(s: dict, indent: str = "") -> None:
    tok = s.get("tokenizer") or {}
    kind = f", {tok.get('kind')} tokenizer (eos {tok.get('eos_id')})" if tok else ""
    merged = f", merged from {s['merged_shards']} shards" if s.get("merged_shards") else ""
    print(f"{indent}{s['dir']}: source {s['source']!r}, vocab {s['vocab_size']} ({s['dtype']}){kind}, "
          f"{s['shards']} token file(s){merged}")
    print(f"{indent}  documents {s['documents']:,}  tokens {s['tokens']:,}  doc length " +
          " ".join(f"{k} {v:,}" for k, v in s["doc_length_percentiles"].items()))
    if s.get("heldout"):
        print(f"{indent}  held out (never read by the loaders): {s['heldout']['documents']:,} documents, "
              f"{s['heldout']['tokens']:,} tokens")
    print(f"{indent}  decomposition 2^{s['min_log2']}..2^{s['max_log2']}, {s['tokens_per_step']:,} tokens per step:")
    print(f"{indent}  {'seq_len':>8} {'pieces':>10} {'tokens':>13} {'share':>6} {'steps/epoch':>12}")
    for b in s["buckets"].values():
        share = b["tokens"] / max(s["tokens"], 1)
        print(f"{indent}  {b['seq_len']:>8} {b['pieces']:>10,} {b['tokens']:>13,} {share:>6.1%} "
              f"{b['steps_per_epoch']:>12,}")
    print(f"{indent}  dropped (tails under 2^{s['min_log2']}): {s['dropped_tokens']:,} tokens "
          f"({s['dropped_fraction']:.1%})")
    print(f"{indent}  steps per epoch: dd {s['steps_per_epoch']:,}, concat at 2^{s['max_log2']} "
          f"{s['concat_steps_per_epoch']:,}")


def _print_mixture(s: dict) -> None:
    print(f"{s['dir']}: mixture of {len(s['sources'])} sources, {s['tokens']:,} tokens; cycle of {s['cycle']} steps "
          f"({' + '.join(str(q) for q in s['quotas'])}), {s['tokens_per_step']:,} tokens per step")
    print(f"  effective epochs after {s['train_tokens']:,} trained tokens:")
    print(f"  {'source':<28} {'weight':>7} {'share':>7} {'documents':>10} {'tokens':>13} {'epochs':>8} {'dd epochs':>10}")
    for r in s["sources"]:
        dd = f"{r['loader_epochs']:.2f}" if r["loader_epochs"] is not None else "-"
        print(f"  {r['dir']:<28} {r['weight']:>7.3g} {r['share']:>7.1%} {r['documents']:>10,} {r['tokens']:>13,} "
              f"{r['effective_epochs']:>8.2f} {dd:>10}")
    for r in s["sources"]:
        print()
        _print_one(r["stats"], "  ")


if __name__ == "__main__":
    sys.exit(prepare_main())
