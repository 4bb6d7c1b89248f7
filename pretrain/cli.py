"""The one entry point: `lightspan <verb>` with verbs prepare, data, train, convert, eval, bench, generate, config,
plan.

Every verb answers `--help` (exit 0). Every verb runs inside one error boundary (pretrain.errors.run_cli): a bad
config, a missing file or a full disk is one line `error: ...` on stderr with exit status 2; `--debug` anywhere
on the line shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from pretrain.errors import run_cli

USAGE = """usage: lightspan [--debug] <verb> [args]     (`lightspan <verb> --help` for each)

verbs:
  prepare   tokenize a corpus into token shards (--config FILE [overrides], or --source/--out)
  data      inspect prepared data: `lightspan data stats DIR`
  train     pretrain from a YAML config (same as `python -m pretrain`); --help lists every config field
  convert   checkpoint <-> Hugging Face conversion
  eval      long-context evaluation
  bench     benchmarks: `lightspan bench {lightning,loader,lasp,attention,quality,memory,compile,dd_speed}`
  plan      layouts that fit: `lightspan plan --config FILE --gpus N --device h100-80gb [--seq-len L]`
  generate  continue a prompt with a trained model (greedy or sampled): `lightspan generate RUN --prompt TEXT`
  config    the config schema: `lightspan config show --config FILE [overrides]` (resolved YAML),
            `lightspan config fields` (every field, its type, default and meaning)

--debug (anywhere, or LIGHTSPAN_DEBUG=1): show the traceback of an error instead of its one-line message
"""

BENCHES = ("lightning", "loader", "lasp", "attention", "quality", "memory", "compile", "dd_speed")
HELP = ("-h", "--help")


def _wants_help(argv) -> bool:
    return any(a in HELP for a in argv)


def _config_mode(argv) -> bool:
    """`prepare --config FILE` or schema overrides (--data.source=...): prepare what a training run would read."""
    return any(a == "--config" or a.startswith("--config=") or (a.startswith("--") and "." in a.split("=")[0])
               for a in argv)


PREPARE_HELP = """usage: lightspan prepare --config FILE [--section.key=VALUE ...]
       lightspan prepare --source SOURCE --out DIR [options]

Tokenize a corpus into memory-mapped token shards (+ tokenizer, manifest), in two forms:

  --config FILE [overrides]   prepare exactly what `lightspan train --config FILE` will read: the config's data
                              section (data.source, data.prepared_dir, data.tokenizer, data.text_field,
                              data.workers) and model.vocab_size; overrides as in train (--data.workers=8).
                              Nothing is done when data.prepared_dir already holds this preparation.
                              `lightspan train --help` lists the fields.
  --source ... --out DIR      a preparation of its own, with the options below.
"""


def _prepare(argv) -> int:
    if _wants_help(argv):
        print(PREPARE_HELP)
        from data_pipeline.cli import prepare_main

        try:
            prepare_main(["--help"])
        except SystemExit:
            pass
        return 0
    if _config_mode(argv):
        from pretrain.config import load_config
        from pretrain.data import ensure_prepared
        from pretrain.train import parse_args

        args, overrides = parse_args(argv, prog="lightspan prepare")
        cfg = load_config(args.config, overrides)  # a ConfigError is reported by the boundary (run_cli)
        out = ensure_prepared(cfg)
        print(f"prepared data: {out.resolve()}")
        return 0
    from data_pipeline.cli import prepare_main

    return prepare_main(argv) or 0


DATA_USAGE = """usage: lightspan data stats DIR [--json] [--tokens-per-step N] [--min-log2 A] [--max-log2 B] [--verify]

Inspect a prepared corpus: documents, tokens, length percentiles and the dataset-decomposition buckets.
`lightspan data stats --help` for the options."""


def _data(argv) -> int:
    if not argv or argv[0] in HELP:
        print(DATA_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "stats":
        print(f"unknown data command {argv[0]!r}\n{DATA_USAGE}", file=sys.stderr)
        return 2
    from data_pipeline.cli import stats_main

    return stats_main(argv[1:]) or 0


def _bench(argv) -> int:
    usage = (f"usage: lightspan bench {{{','.join(BENCHES)}}} [args]\n\n"
             "Benchmarks that print same-run ratios (tables and conditions: bench/RESULTS.md); "
             "`lightspan bench NAME --help` for each one's options.")
    if not argv or argv[0] in HELP:
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in BENCHES:
        print(f"unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return importlib.import_module(f"bench.{argv[0]}").main(argv[1:]) or 0


def _convert(argv) -> int:
    from pretrain.convert import main as convert_main

    return convert_main(argv)


def _eval(argv) -> int:
    from evaluation.cli import main as eval_main

    return eval_main(argv)


def _train(argv) -> int:
    from pretrain.train import main as train_main

    return train_main(argv)


def _generate(argv) -> int:
    from evaluation.generate_cli import main as generate_main

    return generate_main(argv)


def _config(argv) -> int:
    p = argparse.ArgumentParser(prog="lightspan config", description="The config schema and resolved configs.")
    sub = p.add_subparsers(dest="command", metavar="{show,fields}")
    show = sub.add_parser("show", help="print the resolved config (file + overrides, checked) as YAML",
                          usage="lightspan config show [--config FILE] [--section.key=VALUE ...]",
                          description="Print the config a run would use (the file, then the overrides; every value "
                                      "checked as in train) as YAML; `load_config` reads it back unchanged.")
    show.add_argument("--config", default=None, help="YAML file (default: the schema's defaults)")
    sub.add_parser("fields", help="every config field with its type, default and meaning",
                   description="Every config field with its type, default and meaning (also at the end of "
                               "`lightspan train --help`).")
    args, rest = p.parse_known_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        return 2
    if args.command == "fields":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        from pretrain.config_doc import fields_help

        print(fields_help())
        return 0
    from pretrain.config import load_config
    from pretrain.config_doc import config_yaml

    cfg = load_config(args.config, rest)
    source = args.config or "the schema's defaults"
    print(config_yaml(cfg, header=f"resolved from {source}" + (f" + {' '.join(rest)}" if rest else "")), end="")
    return 0


def _plan(argv) -> int:
    from pretrain.plan import main as plan_main

    return plan_main(argv)


VERBS = {"prepare": _prepare, "data": _data, "train": _train, "bench": _bench, "convert": _convert,
         "eval": _eval, "generate": _generate, "config": _config, "plan": _plan}


def main(argv=None) -> int:
    """`lightspan [--debug] <verb> [args]`: the verb's exit status; known errors are one line (see pretrain.errors)."""
    return run_cli(_dispatch, argv)


def _dispatch(argv) -> int:
    try:
        return _run_verb(argv)
    except BrokenPipeError:  # `lightspan train --help | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run_verb(argv) -> int:
    if not argv or argv[0] in HELP:
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
        return 2
    return VERBS[verb](rest)


if __name__ == "__main__":
    sys.exit(main())
