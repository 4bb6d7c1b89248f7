"""`lightspan train` / `python -m pretrain`: parse, build, train, close."""
from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import ConfigError, load_config, to_dict


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lightspan train", description="Pretrain a model from a YAML config.",
                                epilog="Any config field can be overridden: --train.lr=3e-4 --model.layers=4")
    p.add_argument("--config", default=None, help="YAML file under configs/ (defaults: the schema's defaults)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, parameters and FLOPs, then exit")
    return p.parse_known_args(argv)


def dry_run(cfg) -> None:
    import torch

    from model import build_model
    from model.flops import count_params, flops_per_token

    print(json.dumps(to_dict(cfg), indent=2))
    with torch.device("meta"):
        model = build_model(cfg.model)
    seq = cfg.data.seq_len if cfg.data.loader == "concat" else 2**cfg.data.max_log2
    n = count_params(model)
    p = cfg.parallel
    print(f"parameters: {n:,} ({n / 1e9:.3f}B)")
    print(f"training FLOPs per token at seq_len {seq}: {flops_per_token(cfg.model, seq):.4e}")
    print(f"layout: dp={p.dp} pp={p.pp} cp={p.cp} tp={p.tp} world_size={p.dp * p.pp * p.cp * p.tp}")


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(cfg)
        return 0
    from pretrain.trainer import Trainer

    Trainer(cfg).train()
    return 0
