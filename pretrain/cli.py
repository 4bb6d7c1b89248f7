"""The one entry point: `lightspan <verb>` with verbs prepare, data, train, convert, eval, bench.

Every verb runs inside one error boundary (pretrain.errors.run_cli): a bad config, a missing file or a full disk
is one line `error: ...` on stderr with exit status 2; `--debug` anywhere on the line shows the traceback.
"""
from __future__ import annotations

import importlib
import sys

from pretrain.errors import run_cli

USAGE = """usage: lightspan [--debug] <verb> [args]

verbs:
  prepare   tokenize a corpus into token shards (--config FILE, or --source/--out)
  data      inspect prepared data: `lightspan data stats DIR`
  train     pretrain from a YAML config (same as `python -m pretrain`)
  convert   checkpoint <-> Hugging Face conversion
  eval      long-context evaluation
  bench     benchmarks: `lightspan bench {lightning,loader,lasp,attention,quality}`

--debug (anywhere, or LIGHTSPAN_DEBUG=1): show the traceback of an error instead of its one-line message
"""

BENCHES = ("lightning", "loader", "lasp", "attention", "quality")


def _prepare(argv) -> int:
    if "--config" in " ".join(argv):
        from pretrain.config import load_config
        from pretrain.data import ensure_prepared
        from pretrain.train import parse_args

        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)  # a ConfigError is reported by the boundary (run_cli)
        out = ensure_prepared(cfg)
        print(f"prepared data: {out.resolve()}")
        return 0
    from data_pipeline.cli import prepare_main

    return prepare_main(argv) or 0


def _data(argv) -> int:
    if not argv or argv[0] != "stats":
        print("usage: lightspan data stats DIR [--json] [--tokens-per-step N]", file=sys.stderr)
        return 2
    from data_pipeline.cli import stats_main

    return stats_main(argv[1:]) or 0


def _bench(argv) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: lightspan bench {{{','.join(BENCHES)}}} [args]", file=sys.stderr)
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


def main(argv=None) -> int:
    """`lightspan [--debug] <verb> [args]`: the verb's exit status; known errors are one line (see pretrain.errors)."""
    return run_cli(_dispatch, argv)


def _dispatch(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    verbs = {"prepare": _prepare, "data": _data, "train": _train, "bench": _bench,
             "convert": _convert, "eval": _eval}
    if verb not in verbs:
        print(f"unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
        return 2
    return verbs[verb](rest)


if __name__ == "__main__":
    sys.exit(main())
