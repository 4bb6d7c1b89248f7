"""`lightspan train` / `python -m pretrain`: parse, build, train, close."""
from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import load_config, to_dict


class _HelpWithFields(argparse.Action):
    """-h/--help: the options, then every config field (generated from the schema: pretrain.config_doc)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from pretrain.config_doc import fields_help

        parser.print_help()
        print()
        print(fields_help())
        parser.exit()


def parse_args(argv, prog: str = "lightspan train"):
    p = argparse.ArgumentParser(
        prog=prog, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [--config FILE] [--dry-run] [--section.key=VALUE ...]",
        description="Pretrain a model from a YAML config (the same as `python -m pretrain`; under torchrun, every "
                    "rank runs it).",
        epilog="Any config field below can be overridden: --train.lr=3e-4 --model.layers=4 (or --train.lr 3e-4).\n"
               "The resolved config: `lightspan config show --config FILE [overrides]`. Launchers: "
               "launch/torchrun.sh, launch/slurm/train.sbatch.")
    p.add_argument("-h", "--help", action=_HelpWithFields, help="show this help and every config field, then exit")
    p.add_argument("--config", default=None, help="YAML file under configs/ (defaults: the schema's defaults)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameters, FLOPs, the mesh (built on torch's fake backend "
                        "for any world size) and the per-rank memory estimate, then exit (refused if it does not fit)")
    p.add_argument("--plan-device", default="h100-80gb",
                   help="the device --dry-run sizes the layout for (h100-80gb, h200-141gb, a100-80gb, a100-40gb, cpu)")
    return p.parse_known_args(argv)


def dry_run(cfg, plan_device: str = "h100-80gb") -> None:
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
    print_mesh(cfg)
    from pretrain.plan import DEVICES, check_fits

    if plan_device not in DEVICES:
        raise ValueError(f"--plan-device {plan_device!r}: choose one of {sorted(DEVICES)}")
    print(check_fits(cfg, plan_device))


def print_mesh(cfg) -> None:
    """Build the whole mesh on torch's fake process-group backend (no peers, no traffic) and print it."""
    from parallel.parallelize import fake_mesh

    p = cfg.parallel
    mesh = fake_mesh(p, cfg.model, cfg.data)
    ranks = mesh.mesh
    print(f"mesh: {tuple(mesh.mesh_dim_names)} shape {tuple(ranks.shape)} (fake backend, this process is rank 0)")
    for i, name in enumerate(mesh.mesh_dim_names):
        group = ranks.movedim(i, -1).reshape(-1, ranks.shape[i])[0].tolist()
        shown = group if len(group) <= 8 else group[:4] + ["..."] + group[-2:]
        print(f"  {name}: size {ranks.shape[i]}, rank 0's group {shown}")
    per_stage = cfg.model.layers // p.pp
    print(f"  per rank: {cfg.model.heads // p.tp} of {cfg.model.heads} heads, {per_stage} of {cfg.model.layers} layers "
          f"(stage s holds layers [s*{per_stage}, (s+1)*{per_stage})), 1/{p.cp} of each sequence, "
          f"1/{p.dp} of the batch")


def main(argv=None) -> int:
    """Inside the CLI error boundary (`pretrain.errors.run_cli`): known errors are one line, exit 2."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        dry_run(cfg, args.plan_device)
        return 0
    from pretrain import faults
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, callbacks=faults.from_environment())
    try:
        trainer.train()
    finally:
        trainer.env.close()
    return 0
