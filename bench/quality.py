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


# ------------------------------------------------------------------------------------------------------------
# part 4: retrieval-trained models beyond the training length
# ------------------------------------------------------------------------------------------------------------
RETRIEVAL_CONFIG = "configs/retrieval-tiny.yaml"
# (key, label, overrides of configs/retrieval-tiny.yaml): the same width, depth, data, steps and tokens; glu_dim
# evens out the parameter counts (TNL 1,179,776; the others within 0.4% of it)
RETRIEVAL_MODELS = (
    ("tnl", "TNL", ()),
    ("hybrid", "hybrid TNL (LLLS)", ("--model.attention_pattern=LLLS", "--model.glu_dim=392")),
    ("llama", "softmax (llama)", ("--model.arch=llama", "--model.glu_dim=424")),
    ("sharedllm", "SharedLLM-TNL", ("--model.arch=sharedllm", "--model.glu_dim=344", "--model.sharedllm_layers=2",
                                    "--model.sharedllm_chunk=128", "--model.sharedllm_context_chunks=2",
                                    "--model.sharedllm_depth=2", "--model.sharedllm_node_positions=8",
                                    "--model.sharedllm_split_jitter=0.25")),
)
RETRIEVAL_TASKS = (("passkey", "passkey"), ("multikey", "multi-key needle"), ("multihop", "multi-hop"))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n trials ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((phat * (1 - phat) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def forced_exact_match(runner, prompts: list, tokens_per_batch: int = 32768) -> list[dict]:
    """Greedy exact match of every prompt's answer tokens, in one forward per batch: the prompt followed by its
    answer, scored where each answer token is predicted. Greedy decoding reproduces the answer exactly iff every
    answer token is the argmax given the correct prefix, so this equals generating and comparing token by token
    (and yields the answer's NLL; SharedLLM, which has no cache, would re-run its running text per new token).
    Returns one record per prompt: correct, the answer's NLL per token, and the prompt's meta."""
    import torch

    from evaluation.model_io import IGNORE, token_nll

    by_query = bool(getattr(runner, "selects_by_query", False))
    groups: dict[tuple, list[int]] = {}
    for i, pr in enumerate(prompts):
        groups.setdefault((pr.length, len(pr.query) if by_query else 0), []).append(i)
    out = [None] * len(prompts)
    for (length, _), idx in sorted(groups.items()):
        size = max(1, tokens_per_batch // length)
        for j in range(0, len(idx), size):
            batch = [prompts[i] for i in idx[j:j + size]]
            width = length + max(len(pr.answer_ids) for pr in batch) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for row, pr in enumerate(batch):
                seq = list(pr.ids) + list(pr.answer_ids[:-1])
                ids[row, :len(seq)] = torch.tensor(seq)
                targets[row, length - 1:length - 1 + len(pr.answer_ids)] = torch.tensor(pr.answer_ids)
            query = torch.tensor([pr.query for pr in batch]) if by_query else None
            nll, hit = token_nll(runner, ids, targets, query, prompt_len=length)
            mask = targets != IGNORE
            for row, i in enumerate(idx[j:j + size]):
                pr = prompts[i]
                m = mask[row]
                out[i] = {"length": pr.length, "depth": pr.depth, "trial": pr.trial,
                          "correct": bool(hit[row][m].all()), "answer_nll": float(nll[row][m].mean()), **pr.meta}
    return out


def retrieval_summary(records: list[dict]) -> dict:
    """Per length: accuracy over all depths with its 95% interval; per (length, depth) cell: accuracy, n, interval."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    per_length, cells = [], []
    for length in lengths:
        rs = [r for r in records if r["length"] == length]
        k = sum(r["correct"] for r in rs)
        lo, hi = wilson(k, len(rs))
        per_length.append({"length": length, "correct": k, "trials": len(rs), "accuracy": k / len(rs), "lo": lo,
                           "hi": hi, "answer_nll": sum(r["answer_nll"] for r in rs) / len(rs)})
        row = []
        for d in depths:
            c = [r["correct"] for r in rs if r["depth"] == d]
            lo, hi = wilson(sum(c), len(c))
            row.append({"depth": d, "correct": sum(c), "trials": len(c), "lo": lo, "hi": hi})
        cells.append(row)
    return {"lengths": lengths, "depths": depths, "per_length": per_length, "cells": cells}


def retrieval_report(res: dict, out: Path) -> None:
    """Part 4's tables (printed, markdown) and PNGs (one per task, plus perplexity) from its results dict."""
    from evaluation.plots import plot_accuracy, plot_perplexity

    train_len, lengths = res["train_len"], res["lengths"]
    factors = [length // train_len for length in lengths]
    ppl_lengths = [q["length"] for q in next(iter(res["models"].values()))["ppl"]]
    xs = " / ".join(f"{f}x" for f in factors)
    for kind, name in RETRIEVAL_TASKS:
        print(f"\n{name}: greedy exact match at {xs} the training length (95% Wilson interval; trials)")
        print("| model | " + " | ".join(f"{length} ({f}x)" for length, f in zip(lengths, factors)) + " |")
        print("|---|" + "---|" * len(lengths))
        curves = {}
        for key, row in res["models"].items():
            pts = row["tasks"][kind]["per_length"]
            print(f"| {row['label']} | " + " | ".join(
                f"{q['accuracy']:.2f} [{q['lo']:.2f}, {q['hi']:.2f}] ({q['trials']})" for q in pts) + " |")
            curves[row["label"]] = [{"seq_len": q["length"], "accuracy": q["accuracy"], "trials": q["trials"],
                                     "lo": q["lo"], "hi": q["hi"]} for q in pts]
        plot_accuracy(curves, out / f"retrieval-{kind}.png",
                      f"{name}: greedy exact match (shaded: 95% interval)", train_len,
                      model=f"{res['steps']} steps each", count_key="trials",
                      x_label="context length (tokens, log2 scale)", y_label="exact match")
    print("\nheld-out plain-text perplexity vs context length")
    print("| model | " + " | ".join(str(length) for length in ppl_lengths) + " |")
    print("|---|" + "---|" * len(ppl_lengths))
    for key, row in res["models"].items():
        print(f"| {row['label']} | " + " | ".join(f"{q['ppl']:.2f}" for q in row["ppl"]) + " |")
    plot_perplexity({row["label"]: row["ppl"] for row in res["models"].values()}, out / "retrieval-perplexity.png",
                    train_len, "held-out plain text (files no training document reads)",
                    model=f"{res['steps']} steps each")


def _retrieval_part(args, out: Path) -> dict:
    """Part 4: TNL, hybrid, softmax and SharedLLM-TNL trained alike on the synthetic retrieval mixture at 512
    tokens, then passkey / multi-key needle / multi-hop at 1x..64x and held-out plain-text perplexity vs length."""
    import torch

    from data_pipeline import load_tokenizer, plain_heldout_tokens, retrieval_prompts
    from evaluation import perplexity
    from evaluation.model_io import load_for_eval
    from pretrain.cli import main as lightspan

    config = args.retrieval_config
    prepared = out / "retrieval-data"
    if not (prepared / "meta.json").is_file():
        if lightspan(["prepare", "--config", config, f"--data.prepared_dir={prepared}"]) != 0:
            raise SystemExit("[quality] part 4: preparing the synthetic retrieval data failed")
    train_len = 512
    factors = [int(x) for x in args.retrieval_factors.split(",")]
    lengths = [train_len * f for f in factors]
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    models = [m for m in RETRIEVAL_MODELS if m[0] in args.retrieval_models.split(",")]
    res = {"config": config, "steps": args.retrieval_steps, "train_len": train_len, "lengths": lengths,
           "depths": depths, "models": {}}
    tok = load_tokenizer(prepared)
    plain = plain_heldout_tokens(tok, 2 * max(lengths))
    ppl_lengths = sorted({128, *lengths})
    for key, label, extra in models:
        run_dir = out / f"retrieval-{key}"
        t0 = time.perf_counter()
        if args.skip_train and (run_dir / "checkpoints").is_dir():
            losses, secs = [], None
        else:
            run_dir, losses, secs = _train_lm("concat", args.retrieval_steps, out, config, args.threads, str(prepared),
                                              f"retrieval-{key}", (*extra, f"--train.device={args.device}"))
        row = {"label": label, "overrides": list(extra), "train_seconds": None if secs is None else round(secs, 1),
               "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None, "tasks": {}}
        # SharedLLM reads each question as its query (the paper's query-aware expansion), at every length
        loaded = load_for_eval(run_dir, device=args.device, sharedllm_select="query" if key == "sharedllm" else None)
        row["params"] = sum(p.numel() for p in loaded.runner.model.parameters())
        t1 = time.perf_counter()
        for kind, _ in RETRIEVAL_TASKS:
            prompts = []
            for length, factor in zip(lengths, factors):
                trials = args.retrieval_trials if factor < 64 else args.retrieval_trials_64x
                prompts += retrieval_prompts(tok, [length], depths, kind=kind, trials=trials, seed=args.seed)
            row["tasks"][kind] = retrieval_summary(forced_exact_match(loaded.runner, prompts))
        row["eval_seconds"] = round(time.perf_counter() - t1, 1)
        with torch.no_grad():
            row["ppl"] = perplexity.perplexity_curve(loaded.runner, plain, ppl_lengths, 0.5, 32768)
        row["ppl_seconds"] = round(time.perf_counter() - t1 - row["eval_seconds"], 1)
        res["models"][key] = row
        accs = "; ".join(f"{kind} " + " / ".join(f"{q['accuracy']:.2f}" for q in row["tasks"][kind]["per_length"])
                         for kind, _ in RETRIEVAL_TASKS)
        print(f"[quality] part 4 {label}: {row['params']:,} params, train {row['train_seconds']}s, final loss "
              f"{row['final_loss']}, eval {row['eval_seconds']}s + ppl {row['ppl_seconds']}s; {accs} "
              f"(total {time.perf_counter() - t0:.0f}s)", flush=True)
        (out / "results-retrieval.json").write_text(json.dumps(res, indent=2))

    retrieval_report(res, out)
    return res


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
    p.add_argument("--retrieval-config", default=RETRIEVAL_CONFIG, help="part 4: the config every model starts from")
    p.add_argument("--retrieval-steps", type=int, default=1500, help="part 4: training steps of each model")
    p.add_argument("--retrieval-models", default="tnl,hybrid,llama,sharedllm", help="part 4: which models")
    p.add_argument("--retrieval-factors", default="1,4,16,64", help="part 4: lengths as multiples of 512")
    p.add_argument("--retrieval-trials", type=int, default=4, help="part 4: prompts per (length, depth) cell")
    p.add_argument("--retrieval-trials-64x", type=int, default=2, help="part 4: prompts per cell at 64x and more")
    p.add_argument("--seed", type=int, default=0, help="part 4: the evaluation prompts' seed")
    p.add_argument("--device", default="cpu", help="part 4: where the models train and are evaluated (cpu, cuda)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_start": os.getloadavg()}, "args": vars(args)}

    parts = set(args.parts.split(","))
    unknown = parts - {"lm", "sharedllm", "mqar", "retrieval"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose among lm, sharedllm, mqar, retrieval")
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
    if "retrieval" in parts:
        results["retrieval"] = _retrieval_part(args, out)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n[quality] total {results['seconds']}s; load average {results['machine']['load_avg_start']} -> "
          f"{results['machine']['load_avg_end']}; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
