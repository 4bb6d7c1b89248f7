"""`lightspan eval`: long-context evaluation of a run folder, a checkpoint folder or a Hugging Face export.

    lightspan eval PATH --out DIR [--tasks ppl,passkey,needle,mqar] [--data PREPARED_DIR] [--max-length N] ...
    lightspan eval --train-mqar OUT [--mqar-arch tnl|llama] [--mqar-steps N]      # the tiny MQAR recipe
    torchrun --nproc_per_node 2 -m evaluation PATH --out DIR                        # data-parallel

Lengths are multiples of the training length T (a run's longest training sequence; --train-len overrides):
perplexity at T/4 .. 16T, passkey and needle at T, 2T, 4T, 8T, 16T, MQAR at its own length L, 2L and 4L, all
capped by --max-length. Writes DIR/results.json and DIR/{perplexity,passkey,needle,mqar}.png, each titled with the
task, the model and its step, both axes named, the training length marked and the trials per point or cell
given. A SharedLLM that selects its context by query (model.sharedllm_select=query) is given each passkey and
needle question as its query. Under torchrun every rank scores its share of the examples and rank 0 writes the
files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TASKS = ("ppl", "passkey", "needle", "mqar")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lightspan eval", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="run folder, checkpoint folder, or Hugging Face export folder")
    p.add_argument("--out", help="output folder for results.json and the plots")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--data", default=None, help="prepared folder for perplexity (default: the run's own)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's / the export's)")
    p.add_argument("--train-len", type=int, default=None, help="training length T the grids are built on")
    p.add_argument("--max-length", type=int, default=None, help="longest context evaluated (default 16T)")
    p.add_argument("--ppl-lengths", type=_ints, default=None, help="e.g. 128,512,2048 (default T/4..16T)")
    p.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens scored (default 2 x max length)")
    p.add_argument("--stride-frac", type=float, default=0.5, help="window stride as a fraction of its length")
    p.add_argument("--lengths", type=_ints, default=None, help="passkey/needle lengths (default T..16T)")
    p.add_argument("--depths", type=int, default=5, help="number of depths from 0%% to 100%%")
    p.add_argument("--passkey-trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--mqar-examples", type=int, default=256)
    p.add_argument("--mqar-seq-len", type=int, default=None, help="default: the recipe's, else 256")
    p.add_argument("--mqar-kv", type=int, default=None, help="key-value pairs (default: the recipe's, else 16)")
    p.add_argument("--mqar-lengths", type=_ints, default=None,
                   help="MQAR sequence lengths for accuracy vs length (default L, 2L, 4L of the MQAR length L)")
    p.add_argument("--sharedllm-select", default=None, choices=("right", "query"),
                   help="SharedLLM: which half of each context chunk to expand (default: the checkpoint's "
                        "model.sharedllm_select); query: the half most like the passkey/needle question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=2048, help="TNL: tokens per forward, carrying the state")
    p.add_argument("--tokens-per-batch", type=int, default=16384)
    p.add_argument("--device", default="auto",
                   help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N; under torchrun a bare "
                        "cuda means cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-mqar", metavar="OUT", default=None,
                   help="train a tiny model on MQAR, save it as a checkpoint folder OUT, evaluate it, exit")
    p.add_argument("--mqar-arch", default="tnl", choices=("tnl", "llama"))
    p.add_argument("--mqar-steps", type=int, default=1500)
    p.add_argument("--mqar-seconds", type=float, default=90.0, help="the recipe stops after this wall time")
    return p.parse_args(argv)


def _grid(train_len: int, factors, max_length: int) -> list[int]:
    return sorted({max(16, int(train_len * f)) for f in factors if train_len * f <= max_length})


def train_mqar_main(args) -> int:
    from .model_io import ModelRunner
    from .mqar import MQARSpec, evaluate, save_mqar_model, train_mqar

    spec = MQARSpec(seq_len=args.mqar_seq_len or MQARSpec.seq_len, num_kv_pairs=args.mqar_kv or MQARSpec.num_kv_pairs)
    model, history = train_mqar(args.mqar_arch, spec, steps=args.mqar_steps, seed=args.seed,
                                time_limit_s=args.mqar_seconds, log_every=100)
    for h in history:
        print(f"[mqar] step {h['step']} loss {h['loss']:.4f} ({h['seconds']:.0f}s)")
    path = save_mqar_model(model, spec, args.train_mqar, history)
    result = evaluate(ModelRunner(model), spec, args.mqar_examples)
    print(f"[mqar] {args.mqar_arch}: query accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}); "
          f"checkpoint {path}")
    return 0


def run_tasks(args, loaded, tasks, log=print) -> dict:
    """Every requested task on a loaded model; returns the results dict (identical on every rank)."""
    from . import mqar, needle, passkey, perplexity

    runner, tok, T = loaded.runner, loaded.tokenizer, args.train_len or loaded.train_len
    max_len = args.max_length or 16 * T
    progress = not args.no_progress
    results = {"model": loaded.source, "step": getattr(loaded, "step", None), "arch": runner.cfg.arch,
               "train_len": T, "max_length": max_len, "tasks": {}}
    if runner.cfg.arch == "sharedllm":
        results["sharedllm_select"] = runner.cfg.sharedllm_select
    for task in tasks:
        t0 = time.perf_counter()
        if task == "ppl":
            data = Path(args.data) if args.data else loaded.prepared_dir
            if data is None or not data.is_dir():
                out = {"skipped": "no prepared folder: pass --data DIR (a `lightspan prepare` output)"}
            else:
                lengths = args.ppl_lengths or _grid(T, (1 / 4, 1 / 2, 1, 2, 4, 8, 16), max_len)
                tokens, info = perplexity.heldout_tokens(data, args.ppl_tokens or 2 * max(lengths))
                curve = perplexity.perplexity_curve(runner, tokens, lengths, args.stride_frac,
                                                    args.tokens_per_batch, progress)
                out = {"task": "ppl", "heldout": info, "curve": curve}
        elif task in ("passkey", "needle"):
            if tok is None:
                out = {"skipped": "no tokenizer found: pass --tokenizer PATH"}
            else:
                lengths = args.lengths or _grid(T, (1, 2, 4, 8, 16), max_len)
                from .retrieval import depth_grid

                depths = depth_grid(args.depths)
                if task == "passkey":
                    out = passkey.evaluate(runner, tok, lengths, depths, args.passkey_trials, args.seed, progress,
                                           2 * args.tokens_per_batch)
                else:
                    out = needle.evaluate(runner, tok, lengths, depths, args.seed, progress, 2 * args.tokens_per_batch)
        else:
            spec = mqar.MQARSpec(**loaded.mqar) if loaded.mqar else \
                mqar.MQARSpec(seq_len=256, num_kv_pairs=16, vocab_size=runner.vocab_size)
            if args.mqar_seq_len:
                spec.seq_len = args.mqar_seq_len
            if args.mqar_kv:
                spec.num_kv_pairs = args.mqar_kv
            lengths = args.mqar_lengths or [n for n in (spec.seq_len, 2 * spec.seq_len, 4 * spec.seq_len)
                                            if n <= max(max_len, spec.seq_len)]
            out = mqar.evaluate(runner, spec, args.mqar_examples, seed=12345 + args.seed, lengths=lengths)
            if not loaded.mqar:
                out["note"] = "the model was not trained on MQAR: a zero-shot probe of in-context recall"
        out["seconds"] = round(time.perf_counter() - t0, 2)
        results["tasks"][task] = out
        log(f"[eval] {task}: {summarize(task, out)} ({out['seconds']}s)")
    return results


def summarize(task: str, out: dict) -> str:
    if "skipped" in out:
        return f"skipped ({out['skipped']})"
    if task == "ppl":
        return ", ".join(f"L={p['length']}: {p['ppl']:.2f}" for p in out["curve"])
    if task == "mqar":
        return f"accuracy {out['accuracy']:.3f} (chance {out['chance']:.3f})"
    return f"overall {out['overall']:.3f} over lengths {out['lengths']}"


PLOT_TITLES = {"passkey": "passkey retrieval, exact match", "needle": "needle in a haystack, answer found"}


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    from .plots import plot_accuracy, plot_heatmap, plot_perplexity

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    written = [out_dir / "results.json"]
    tasks, T = results["tasks"], results["train_len"]
    who = {"model": results.get("model"), "step": results.get("step")}
    if "curve" in tasks.get("ppl", {}):
        ppl = tasks["ppl"]
        unseen = (ppl.get("heldout") or {}).get("unseen")
        title = "held-out perplexity vs context length" if unseen else "perplexity vs context length"
        written.append(plot_perplexity({results["arch"]: ppl["curve"]}, out_dir / "perplexity.png", T, title, **who))
    for name in ("passkey", "needle"):
        if "accuracy" in tasks.get(name, {}):
            written.append(plot_heatmap(tasks[name], out_dir / f"{name}.png", PLOT_TITLES[name], task=name,
                                        train_len=T, **who))
    mq = tasks.get("mqar", {})
    if "accuracy" in mq:
        points = mq.get("by_length") or [{"seq_len": mq["seq_len"], **{k: mq[k] for k in ("accuracy", "queries")}}]
        label = f"{results['arch']}, {mq['num_kv_pairs']} key-value pairs, vocab {mq['vocab_size']}"
        written.append(plot_accuracy({label: points}, out_dir / "mqar.png", "MQAR query accuracy vs length",
                                     T, mq.get("chance"), **who))
    return written


# numeric arguments: attribute -> (lowest allowed, whether the lowest itself is allowed); None (not given) passes
_ARG_RANGES = {
    "train_len": (1, True), "max_length": (1, True), "ppl_tokens": (1, True),
    "depths": (1, True), "passkey_trials": (1, True), "mqar_examples": (1, True), "mqar_seq_len": (1, True),
    "mqar_kv": (1, True), "mqar_lengths": (1, True), "chunk_size": (1, True), "tokens_per_batch": (1, True),
    "threads": (0, True), "mqar_steps": (1, True), "mqar_seconds": (0.0, False), "ppl_lengths": (1, True),
    "lengths": (1, True),
}


def _check_args(args) -> None:
    """Refuse a numeric argument out of range, or a device this machine lacks, before any model is loaded."""
    import math

    for name, (low, inclusive) in _ARG_RANGES.items():
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        rule = f"{'>=' if inclusive else '>'} {low:g}"
        for v in value if isinstance(value, list) else [value]:
            if v is not None and (not math.isfinite(v) or v < low or (v == low and not inclusive)):
                raise ValueError(f"{flag} must be {rule}, got {v}; pass {flag} with a value {rule}")
        if isinstance(value, list) and not value:
            raise ValueError(f"{flag} is empty; pass comma-separated lengths, e.g. {flag} 1024,4096")
    if not 0 < args.stride_frac <= 1:  # NaN fails too
        raise ValueError(f"--stride-frac must be in (0, 1] (the window stride as a fraction of its length), "
                         f"got {args.stride_frac}; e.g. --stride-frac 0.5")
    if args.path and not Path(args.path).exists():
        raise FileNotFoundError(f"{args.path}: no such run folder, checkpoint folder or Hugging Face export; "
                                f"pass an existing PATH (a run's train.out_dir)")
    from .distributed import resolve_device

    args.device = resolve_device(args.device)  # auto -> cuda / cpu; under torchrun cuda -> cuda:LOCAL_RANK


def main(argv=None) -> int:
    """`lightspan eval` / `python -m evaluation`: inside the CLI error boundary (pretrain.errors.run_cli)."""
    from pretrain.errors import run_cli

    return run_cli(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    _check_args(args)
    import torch

    if args.train_mqar:
        torch.set_num_threads(args.threads or 1)  # a tiny model: a second thread only adds contention
        return train_mqar_main(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.path or not args.out:
        print("usage: lightspan eval PATH --out DIR [--tasks ppl,passkey,needle,mqar] (see --help)", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"unknown task(s) {unknown}; choose from {list(TASKS)}", file=sys.stderr)
        return 2
    from .distributed import init_from_env, is_main
    from .model_io import load_for_eval

    created = init_from_env(args.device)
    try:
        loaded = load_for_eval(args.path, args.device, args.chunk_size, args.tokenizer, args.sharedllm_select)
        log = print if is_main() else (lambda *a, **k: None)
        log(f"[eval] {loaded.source} on {args.device}")
        results = run_tasks(args, loaded, tasks, log)
        if is_main():
            for path in write_outputs(results, Path(args.out)):
                print(f"[eval] wrote {path}")
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
