"""Loader throughput, DD vs concat (and a mixture), against what a training step consumes; tokenization rate per
worker (sentencepiece vs Hugging Face tokenizers); and a DD vs concat epoch cost.

    lightspan bench loader [--prepared DIR] [--tokens-per-step N] [--steps N] [--model-steps N]
                           [--tokenize-mb MB] [--hf-tokenizer PATH] [--device auto|cpu|cuda]

0. Tokenization, one worker: the first ``--tokenize-mb`` MB of the stdlib corpus through exactly what a
   ``prepare`` worker runs (``_encode_batch``: encode, append EOS, to numpy), with the prepared folder's
   sentencepiece tokenizer and with a Hugging Face ``tokenizers`` byte-level BPE of the same vocabulary (trained
   here on the same text, or ``--hf-tokenizer``): tokens/s and MB/s per worker. ``--tokenize-mb 0`` skips it.
1. Prepares the stdlib corpus (once, into ``data/stdlib`` unless ``--prepared``) and iterates the DD, the concat
   and a two-source (0.8/0.2) mixture DD loader for ``--steps`` steps each: tokens/s of batch production.
2. Unless ``--model-steps 0``: times one training step (forward, backward, SGD) of a small softmax baseline
   (``model`` imported lazily; skipped with a message if it is unavailable) at every DD bucket length and at the
   concat length, then prices one epoch: sum over buckets of steps x step time, DD vs concat. This is the DD
   paper's cost argument (an 8K model at the price of a shorter one), measured on this machine. It also prints
   the loader's headroom: loader tokens/s over training tokens/s (goal: >= 20x, so the loader is never the
   bottleneck).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _loader_rate(loader, steps: int) -> tuple[float, float]:
    """(tokens/s, seconds) for ``steps`` batches, after 5 warm-up batches (a mixture's sources each get read, so
    the lazy first-read hash of their shards is not timed)."""
    for _ in range(5):
        next(loader)
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        tokens += next(loader)["input_ids"].numel()
    dt = time.perf_counter() - t0
    return tokens / dt, dt


def _tokenize_rate(tok, texts: list[str]) -> tuple[float, float, int]:
    """(tokens/s, MB/s, tokens) of one prepare worker's job on ``texts``: encode + EOS + numpy, batches of 64."""
    from data_pipeline import preparation

    preparation._worker_init(tok.payload())
    n_tokens, n_bytes = 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), preparation._BATCH_DOCS):
        tokens, lengths, nb = preparation._encode_batch(texts[i:i + preparation._BATCH_DOCS])
        n_tokens += len(tokens)
        n_bytes += nb
    dt = time.perf_counter() - t0
    return n_tokens / dt, n_bytes / dt / 1e6, n_tokens


def _tokenization(prepared: Path, mb: float, hf_path: str | None) -> None:
    import tempfile

    import data_pipeline as dp

    texts, size = [], 0
    for f in dp.stdlib_files():
        if size >= mb * 1e6:
            break
        texts.append(f.read_bytes().decode("utf-8", errors="replace"))
        size += len(texts[-1])
    sp = dp.load_tokenizer(prepared)
    print(f"[bench] tokenization, one worker (what a prepare worker runs), {len(texts)} stdlib documents, "
          f"{size / 1e6:.1f} MB:")
    rate, mbs, n = _tokenize_rate(sp, texts)
    print(f"  sentencepiece {sp.vocab_size:>6} ids  {rate / 1e6:6.2f} M tokens/s  {mbs:6.2f} MB/s  "
          f"({n / size:.3f} tokens/byte)")
    with tempfile.TemporaryDirectory() as tmp:
        if hf_path:
            hf = dp.load_tokenizer(hf_path)
            how = hf_path
        else:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tk = Tokenizer(models.BPE())
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            t0 = time.perf_counter()
            tk.train_from_iterator(texts, trainers.BpeTrainer(
                vocab_size=sp.vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
            how = f"byte-level BPE trained here in {time.perf_counter() - t0:.1f}s"
            tk.save(str(Path(tmp) / "tokenizer.json"))
            hf = dp.load_tokenizer(Path(tmp) / "tokenizer.json")
        rate_hf, mbs_hf, n_hf = _tokenize_rate(hf, texts)
    print(f"  HF tokenizers {hf.vocab_size:>6} ids  {rate_hf / 1e6:6.2f} M tokens/s  {mbs_hf:6.2f} MB/s  "
          f"({n_hf / size:.3f} tokens/byte; {how})")
    print(f"  HF / sentencepiece: {rate_hf / rate:.2f}x tokens/s, {mbs_hf / mbs:.2f}x bytes/s")


def _mixture_of(prepared: Path, root: Path) -> Path:
    """A two-source (0.8/0.2) mixture folder whose sources are both ``prepared`` (symlinks): the blending cost."""
    from data_pipeline.mixture import write_mixture

    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        link = root / name
        if not link.exists():
            link.symlink_to(prepared.resolve(), target_is_directory=True)
    write_mixture(root, [{"dir": "a", "path": str(prepared), "weight": 0.8},
                         {"dir": "b", "path": str(prepared), "weight": 0.2}], None)
    return root


def _step_timer(vocab_size: int, dim: int, layers: int, heads: int, device: str):
    """A function seq_len, batch -> seconds for one training step of a small softmax baseline; None if the model
    package is unavailable."""
    try:
        import torch

        from model import ModelConfig, build_model
    except ImportError as e:
        print(f"[bench] model package unavailable ({e}): skipping the training-step comparison")
        return None
    torch.manual_seed(0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, glu_dim=4 * dim)
    net = build_model(cfg).to(device)
    print(f"[bench] training steps on {device}")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step(batch) -> float:
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lightspan bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", default="data/stdlib", help="prepared corpus (prepared from stdlib if missing)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary when preparing")
    p.add_argument("--tokens-per-step", type=int, default=1 << 16)
    p.add_argument("--min-log2", type=int, default=8)
    p.add_argument("--max-log2", type=int, default=13)
    p.add_argument("--steps", type=int, default=100, help="loader steps timed per loader")
    p.add_argument("--model-steps", type=int, default=1, help="timed training steps per sequence length (0: skip)")
    p.add_argument("--device", default="auto", help="model comparison device: auto (cuda if present) | cpu | cuda")
    p.add_argument("--model-tokens-per-step", type=int, default=1 << 13,
                   help="tokens per training step in the model comparison (a CPU-sized step)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokenize-mb", type=float, default=4.0, help="MB of text timed per tokenizer (0: skip)")
    p.add_argument("--hf-tokenizer", default=None, help="a tokenizer.json (or folder) to time instead of one "
                                                          "trained here")
    args = p.parse_args(argv)

    import data_pipeline as dp

    prepared = Path(args.prepared)
    if not (prepared / "manifest.json").is_file():
        dp.prepare("stdlib", prepared, vocab_size=args.vocab_size, num_workers=2)
    if args.tokenize_mb > 0:
        _tokenization(prepared, args.tokenize_mb, args.hf_tokenizer)
    common = dict(tokens_per_step=args.tokens_per_step, min_log2=args.min_log2, max_log2=args.max_log2)
    seq = 1 << args.max_log2

    dd = dp.build_loader(prepared, kind="dd", **common)
    concat = dp.build_loader(prepared, kind="concat", seq_len=seq, **common)
    mixture = dp.build_loader(_mixture_of(prepared, prepared.parent / f".{prepared.name}-bench-mixture"), kind="dd",
                              **common)
    dd_rate, dd_s = _loader_rate(dd, args.steps)
    cc_rate, cc_s = _loader_rate(concat, args.steps)
    mx_rate, mx_s = _loader_rate(mixture, args.steps)
    print(f"[bench] loader, {args.tokens_per_step:,} tokens/step, {args.steps} steps each, corpus {prepared}")
    print(f"  dd      {dd_rate / 1e6:9.1f} M tokens/s  ({dd_s:.2f}s)")
    print(f"  concat  {cc_rate / 1e6:9.1f} M tokens/s  ({cc_s:.2f}s)   at seq_len {seq}")
    print(f"  mixture {mx_rate / 1e6:9.1f} M tokens/s  ({mx_s:.2f}s)   dd, two sources at 0.8/0.2")
    print(f"  ratio dd/concat {dd_rate / cc_rate:.2f}x")

    if args.model_steps <= 0:
        return 0
    vocab = dd.store.manifest["vocab_size"]
    step = _step_timer(vocab, args.dim, args.layers, args.heads, args.device)
    if step is None:
        return 0
    mtps = args.model_tokens_per_step
    small = dict(tokens_per_step=mtps, min_log2=args.min_log2, max_log2=args.max_log2)
    dd_small = dp.build_loader(prepared, kind="dd", **small)
    concat_small = dp.build_loader(prepared, kind="concat", seq_len=seq, **small)
    # one batch of each length, shaped as the training step would get it
    batches: dict[int, dict] = {}
    while len(batches) < len(dd_small.bucket_steps()):
        b = next(dd_small)
        batches.setdefault(b["seq_len"], b)
    step(batches[1 << args.min_log2])  # warm-up
    per_len = {}
    for T, b in sorted(batches.items()):
        per_len[T] = min(step(b) for _ in range(args.model_steps))
    concat_step = min(step(next(concat_small)) for _ in range(args.model_steps))

    dd_epoch = sum(n * per_len[1 << i] for i, n in dd_small.bucket_steps().items())
    dd_tokens = sum(dd_small.bucket_steps().values()) * mtps
    cc_epoch = concat_small.steps_per_epoch * concat_step
    cc_tokens = concat_small.steps_per_epoch * mtps
    print(f"[bench] softmax baseline (dim {args.dim}, {args.layers} layers), {mtps:,} tokens/step, train-step time:")
    for T, s in per_len.items():
        print(f"  dd T={T:<6} {s * 1e3:9.1f} ms  ({mtps / s / 1e3:8.1f} K tokens/s)")
    print(f"  concat T={seq:<2} {concat_step * 1e3:9.1f} ms  ({mtps / concat_step / 1e3:8.1f} K tokens/s)")
    print(f"  one epoch: dd {dd_epoch:.1f}s for {dd_tokens:,} tokens ({dd_tokens / dd_epoch / 1e3:.1f} K tok/s), "
          f"concat {cc_epoch:.1f}s for {cc_tokens:,} tokens ({cc_tokens / cc_epoch / 1e3:.1f} K tok/s)")
    print(f"  cost per token concat/dd {(cc_epoch / cc_tokens) / (dd_epoch / dd_tokens):.2f}x")
    train_rate = cc_tokens / cc_epoch
    fastest = max(mtps / s for s in [*per_len.values(), concat_step])
    print(f"  loader headroom: dd loader {dd_rate / train_rate:,.0f}x, concat loader {cc_rate / train_rate:,.0f}x, "
          f"mixture loader {mx_rate / train_rate:,.0f}x the training consumption at T={seq}")
    worst = min(dd_rate, cc_rate, mx_rate) / fastest
    print(f"  against the fastest training step timed ({fastest / 1e3:,.1f} K tokens/s): the slowest loader is "
          f"{worst:,.0f}x; goal >= 20x: {'met' if worst >= 20 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
