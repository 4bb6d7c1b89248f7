"""The launchers' check before any worker starts: `python -m launch.preflight --nnodes N --nproc P -- TRAIN_ARGS`.

launch/torchrun.sh runs it on every node (and train.sbatch through it) before torchrun, so a setting that cannot
work fails at once, with the numbers and the fix, instead of after a rendezvous timeout or inside every worker:

- the interpreter has no torch (a bare `python` from PATH instead of the venv's);
- the config does not load (unknown key, bad value: the CLI's one-line `error: ...`);
- the layout does not match the launch: parallel dp*pp*cp*tp must equal NNODES x NPROC (the same rule the
  trainer enforces at start-up, parallel.mesh.check_layout), and the model/data shapes must divide.

With --dry-run it then prints one rank's dry run (`lightspan train --dry-run`: resolved config, parameters,
FLOPs, the mesh on torch's fake backend) and no worker is started.
"""
from __future__ import annotations

import argparse
import sys


def _parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m launch.preflight",
                                description="Check a launch (layout vs node and process counts) before torchrun.")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc", type=int, required=True, help="processes per node")
    p.add_argument("--dry-run", action="store_true", help="also print one rank's dry run (no worker starts)")
    if "--" in argv:
        i = argv.index("--")
        ours, train = argv[:i], argv[i + 1:]
    else:
        ours, train = argv, []
    return p.parse_args(ours), train


def layout_mismatch(parallel, nnodes: int, nproc: int) -> str | None:
    """The message for a layout whose product is not NNODES x NPROC, with the dp that would fit; None if it fits."""
    dp, pp, cp, tp = parallel.dp, parallel.pp, parallel.cp, parallel.tp
    product, world = dp * pp * cp * tp, nnodes * nproc
    if product == world:
        return None
    rest = pp * cp * tp
    fixes = [f"launch {product} process(es) (NNODES/--nnodes x NPROC/--nproc; under slurm --nodes x --gpus-per-node)"]
    if world % rest == 0:
        fixes.insert(0, f"set --parallel.dp={world // rest} (= {world} / (pp*cp*tp = {rest}))")
    return (f"the layout parallel dp*pp*cp*tp = {dp}*{pp}*{cp}*{tp} = {product} process(es), but this launch starts "
            f"NNODES x NPROC = {nnodes} x {nproc} = {world}: {' or '.join(fixes)}")


def check(argv: list[str]) -> int:
    args, train = _parse(argv)
    if args.nnodes < 1 or args.nproc < 1:
        raise ValueError(f"--nnodes ({args.nnodes}) and --nproc ({args.nproc}) must be >= 1")
    try:
        import torch  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{sys.executable} cannot import {e.name!r}: it is not lightspan's environment; activate "
                         f"the venv (source .venv/bin/activate), set PYTHON=/path/to/.venv/bin/python, or run "
                         f"`make setup`") from None
    from parallel.mesh import check_layout
    from pretrain.config import load_config
    from pretrain.train import parse_args

    targs, overrides = parse_args(train)
    cfg = load_config(targs.config, overrides)
    message = layout_mismatch(cfg.parallel, args.nnodes, args.nproc)
    if message:
        raise ValueError(message)
    world = args.nnodes * args.nproc
    check_layout(cfg.parallel, world, cfg.model, cfg.data)  # the trainer's own check, with the launch's world
    p = cfg.parallel
    print(f"layout: dp={p.dp} pp={p.pp} cp={p.cp} tp={p.tp} = {world} process(es) = {args.nnodes} node(s) x "
          f"{args.nproc} per node: ok", flush=True)
    if args.dry_run or targs.dry_run:
        from pretrain.train import dry_run

        print("one rank's dry run (no worker is started):", flush=True)
        dry_run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    from pretrain.errors import run_cli

    return run_cli(check, argv)


if __name__ == "__main__":
    sys.exit(main())
