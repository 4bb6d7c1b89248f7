"""Quality at tiny scale, side by side in one run: what the long-context choices buy, measured here.

    python -m bench.quality [--parts lm,sharedllm,mqar] [--steps 150] [--mqar-steps 800] [--prepared DIR]
                            [--out runs/bench-quality] [--skip-train]

1. Dataset decomposition vs concat-and-chunk at equal tokens: two TNLs of configs/tiny.yaml trained for the same
   steps x tokens_per_step on the embedded corpus (data/stdlib-2k; `lightspan prepare --config configs/tiny.yaml`
   makes it), one on the DD loader (grow_p2, buckets 2^6..2^9), one on the concat loader (fixed 512-token
   windows). Then perplexity vs context length on held-out documents (the last ones of the prepared folder) and
   passkey retrieval, both through `evaluation`. Ratio: DD ppl / concat ppl per length.
2. SharedLLM-TNL vs plain TNL on passkey beyond the training length: a SharedLLM of the same width and depth
   (M=2 compressor layers, 128-token chunks, depth-2 tree of 8 positions per node) trained for the same steps x
   tokens on the same 512-token concat windows (2 x 128 context tokens + 256 tokens of running text each), vs the
   TNL + concat run of part 1; passkey exact match at 1x, 4x and 16x the training length, plus the keys' mean
   NLL per token (a graded signal where exact match is 0).
3. MQAR (Zoology): tiny models of the same width trained on the MQAR recipe for the same steps each, then
   query accuracy on fresh examples: plain TNL, the softmax baseline, a hybrid TNL (lightning + softmax layers)
   when `model.attention_pattern` exists; SharedLLM is not in this part (MQAR's 32-token examples have no
   context to compress: SharedLLM on them is its decoder, a plain TNL).
Prints the tables and writes results.json plus a perplexity plot into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path


SHAREDLLM = ["--model.arch=sharedllm", "--model.sharedllm_layers=2", "--model.sharedllm_chunk=128",
             "--model.sharedllm_depth=2", "--model.sharedllm_node_positions=8", "--model.sharedllm_context_chunks=2"]


def _train_lm(loader: str, steps: int, out_root: Path, config: str, threads: int,
              prepared: str | None, name: str | None = None, extra: tuple = ()) -> tuple[Path, list, float]:
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    name = name or loader
    overrides = [f"--data.loader={loader}", f"--train.steps={steps}", f"--train.out_dir={out_root / name}",
                 f"--train.warmup_steps={max(1, steps // 10)}", "--checkpoint.every=0", "--checkpoint.resume=none",
                 "--log.tensorboard=false", f"--log.every={max(1, steps // 5)}", f"--train.threads={threads}"]
    if loader == "concat":
        overrides.append("--data.seq_len=512")
    if prepared:
        overrides.append(f"--data.prepared_dir={prepared}")
    cfg = load_config(config, [*overrides, *extra])
    t0 = time.perf_counter()
    losses = Trainer(cfg).train()
    return out_root / name, losses, time.perf_counter() - t0


def _passkey_beyond(run_dir: Path, lengths: list, trials: int) -> dict:
    from evaluation import passkey
    from evaluation.model_io import load_for_eval

    loaded = load_for_eval(run_dir)
    r = passkey.evaluate(loaded.runner, loaded.tokenizer, lengths, [0.0, 0.5, 1.0], trials=trials, seed=0,
                         with_nll=True)
    return {k: r[k] for k in ("lengths", "depths", "accuracy", "overall", "answer_nll")}


def _eval_lm(run_dir: Path, ppl_tokens: int, lengths: list, progress: bool) -> dict:
    from evaluation import passkey, perplexity
    from evaluation.model_io import load_for_eval

    loaded = load_for_eval(run_dir)
    tokens, info = perplexity.heldout_tokens(loaded.prepared_dir, ppl_tokens)
    curve = perplexity.perplexity_curve(loaded.runner, tokens, lengths, 0.5, 16384, progress)
    keys = passkey.evaluate(loaded.runner, loaded.tokenizer, [loaded.train_len, 4 * loaded.train_len],
                            [0.0, 0.5, 1.0], trials=2, seed=0)
    return {"curve": curve, "heldout": info, "passkey": {k: keys[k] for k in ("lengths", "depths", "accuracy",
                                                                             "overall")}}


def _mqar_rows(steps: int, seconds: float, threads: int) -> list[dict]:
    import torch

    from evaluation import mqar
    from evaluation.model_io import ModelRunner
    from model import ModelConfig

    spec = mqar.MQARSpec()
    variants = [("TNL (LL)", "tnl", {}), ("softmax baseline", "llama", {})]
    if "attention_pattern" in {f.name for f in dataclasses.fields(ModelConfig)}:
        variants.append(("hybrid TNL (LS)", "tnl", {"attention_pattern": "LS"}))
    else:
        variants.append(("hybrid TNL", None, "model.attention_pattern not available"))
    rows = []
    for name, arch, extra in variants:
        if arch is None:
            rows.append({"model": name, "note": extra})
            print(f"[quality] MQAR {name}: {extra}", flush=True)
            continue
        if threads > 0:
            torch.set_num_threads(threads)
        model, history = mqar.train_mqar(arch, spec, steps=steps, time_limit_s=seconds, log_every=100,
                                         model_overrides=extra)
        result = mqar.evaluate(ModelRunner(model), spec, n_examples=512)
        steps = history[-1]["step"]
        rows.append({"model": name, "steps": steps, "seconds": round(history[-1]["seconds"], 1),
                     "final_loss": round(history[-1]["loss"], 3), "accuracy": result["accuracy"],
                     "chance": result["chance"]})
        print(f"[quality] MQAR {name}: {steps} steps in {history[-1]['seconds']:.0f}s, loss "
              f"{history[-1]['loss']:.3f}, accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f})",
              flush=True)
    return rows, dataclasses.asdict(spec)


def _sharedllm_part(args, out: Path, lm: dict | None = None) -> dict:
    """Part 2: SharedLLM-TNL vs the TNL + concat run (trained here unless part 1 or --skip-train left it)."""
    rows = {}
    for name, extra in (("concat", ()), ("sharedllm", tuple(SHAREDLLM))):
        run_dir = out / name
        if args.skip_train or (name == "concat" and (run_dir / "checkpoints").is_dir()):
            done = (lm or {}).get(name) or {}
            losses, secs = [done["final_loss"]] if done.get("final_loss") is not None else [], 0.0
        else:
            run_dir, losses, secs = _train_lm("concat", args.steps, out, args.config, args.threads, args.prepared,
                                              name, ("--data.seq_len=512", *extra))
        lengths = [512, 2048, 8192]  # 1x, 4x, 16x the 512-token training windows
        rows[name] = {"train_seconds": round(secs, 1), "final_loss": losses[-1] if losses else None,
                      "passkey": _passkey_beyond(run_dir, lengths, args.passkey_trials)}
    print("\n| model | final train loss | passkey 512 / 2048 / 8192 | key NLL per token 512 / 2048 / 8192 |")
    print("|---|---|---|---|")
    for name, label in (("concat", "TNL (concat, 512)"), ("sharedllm", "SharedLLM-TNL (2x128 context + 256 text)")):
        r = rows[name]
        acc = " / ".join(f"{sum(row) / len(row):.2f}" for row in r["passkey"]["accuracy"])
        nll = " / ".join(f"{v:.2f}" for v in r["passkey"]["answer_nll"].values())
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        print(f"| {label} | {loss} | {acc} | {nll} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=150, help="training steps of each LM (equal tokens: same steps)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens for perplexity")
    p.add_argument("--lengths", default="64,128,256,512,1024,2048,4096", help="perplexity context lengths")
    p.add_argument("--mqar-steps", type=int, default=800, help="training steps of each MQAR model (equal steps)")
    p.add_argument("--mqar-seconds", type=float, default=240.0, help="safety cap on each MQAR model's training time")
    # one thread: on a shared, loaded 2-core machine two threads per tiny op oversubscribe (measured 20x slower)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench-quality")
    p.add_argument("--prepared", default=None, help="prepared corpus folder (default: the config's)")
    p.add_argument("--skip-train", action="store_true", help="evaluate the LM runs already in --out")
    p.add_argument("--parts", default="lm,sharedllm,mqar", help="which parts to run (comma-separated)")
    p.add_argument("--passkey-trials", type=int, default=2, help="keys per (length, depth) in part 2")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_start": os.getloadavg()}, "args": vars(args)}

    parts = set(args.parts.split(","))
    unknown = parts - {"lm", "sharedllm", "mqar"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose among lm, sharedllm, mqar")
    if "lm" in parts:
        lengths = [int(x) for x in args.lengths.split(",")]
        lm = {}
        for loader in ("dd", "concat"):
            if args.skip_train:
                run_dir, losses, secs = out / loader, [], 0.0
            else:
                run_dir, losses, secs = _train_lm(loader, args.steps, out, args.config, args.threads,
                                                    args.prepared)
            lm[loader] = {"train_seconds": round(secs, 1), "final_loss": losses[-1] if losses else None,
                          **_eval_lm(run_dir, args.ppl_tokens, lengths, progress=True)}
        results["lm"] = lm
        print("\n| context | TNL + DD (grow_p2) ppl | TNL + concat ppl | DD / concat |")
        print("|---|---|---|---|")
        for a, b in zip(lm["dd"]["curve"], lm["concat"]["curve"]):
            print(f"| {a['length']} | {a['ppl']:.2f} | {b['ppl']:.2f} | {a['ppl'] / b['ppl']:.3f} |")
        for loader in ("dd", "concat"):
            r = lm[loader]
            print(f"{loader}: train {r['train_seconds']}s, final loss {r['final_loss']}, passkey overall "
                  f"{r['passkey']['overall']:.2f} at lengths {r['passkey']['lengths']}")
        from evaluation.plots import plot_perplexity

        plot_perplexity({"TNL + DD (grow_p2)": lm["dd"]["curve"], "TNL + concat": lm["concat"]["curve"]},
                        out / "perplexity.png", 512, "held-out perplexity, equal training tokens")

    if "sharedllm" in parts:
        results["sharedllm"] = _sharedllm_part(args, out, results.get("lm"))
    if "mqar" in parts:
        rows, spec = _mqar_rows(args.mqar_steps, args.mqar_seconds, args.threads)
        results["mqar"] = {"spec": spec, "rows": rows}
        print("\n| MQAR model | steps | train s | final loss | accuracy | chance |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "note" in r:
                print(f"| {r['model']} | - | - | - | {r['note']} | - |")
            else:
                print(f"| {r['model']} | {r['steps']} | {r['seconds']} | {r['final_loss']} | {r['accuracy']:.3f} | "
                      f"{r['chance']:.3f} |")
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n[quality] total {results['seconds']}s; load average {results['machine']['load_avg_start']} -> "
          f"{results['machine']['load_avg_end']}; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
