"""The memory/throughput planner: does a layout fit, and which layouts are fastest.

    lightspan plan --config C --gpus N --device h100-80gb [--seq-len L] [--efficiency 0.4] [--top 10]
    lightspan train --config C --dry-run [--plan-device h100-80gb]     (the configured layout's estimate)

Per-rank memory (bytes), for a layout (dp, pp, cp, tp), AC mode and pipeline micro-batches m:
    weights, grads   4 bytes x P_rank / (dp x cp) each          P_rank = parameters of this stage / tp (fp32
                                                                 masters, FSDP2 shards over dp x cp)
    optimizer        8 bytes x P_rank / (dp x cp)               AdamW's two moments
    gathered blocks  2 x 4 bytes x P_block / tp                 FSDP2 unshards a block (+ the next, prefetched)
    activations      (w_layer[AC] x layers/pp x in_flight + w_step[AC]) x tokens_mb x dim x a / tp
                     w_layer: words each block keeps per token per dim; w_step: the once-per-step peak (the block
                     being recomputed / backpropagated, the loss), both MEASURED by bench/memory.py (stored in
                     pretrain/plan_constants.json); a = 4 (fp32) or 2 (bf16); tokens_mb = the tokens of one
                     micro-batch on this rank (sequence / cp); in_flight = min(pp, m) under 1F1B (stage 0)
    loss chunk       3 x loss_chunk x vocab/tp x 4               logits, exp and their gradient, one chunk
    LASP / ring      2 x cp x B x H/tp x hd^2 x 4 (LASP-2 gathers the fp32 states of one layer); ring attention
                     2 x 2 x B x T/cp x H/tp x hd x a (two K/V blocks in flight) per softmax layer
Step time (s): FLOPs / (world x peak x efficiency) x recompute (full AC 4/3, selective 1.1) x pipeline bubble
(1 + (pp-1)/m) + exposed communication: FSDP (3 x params / (dp x cp) all-gather + reduce-scatter), TP (4
activation all-reduces per layer) over their links (NVLink inside a node, the network across nodes). Every
constant is printed and overridable; these are estimates to rank layouts, not promises.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

CONSTANTS = Path(__file__).resolve().parent / "plan_constants.json"

# bytes of memory, dense bf16 peak FLOP/s, NVLink per-GPU bandwidth, network per-GPU bandwidth (bytes/s)
DEVICES = {
    "h100-80gb": {"memory": 80e9, "peak": 989e12, "intra_bw": 450e9, "inter_bw": 50e9, "per_node": 8},
    "h200-141gb": {"memory": 141e9, "peak": 989e12, "intra_bw": 450e9, "inter_bw": 50e9, "per_node": 8},
    "a100-80gb": {"memory": 80e9, "peak": 312e12, "intra_bw": 300e9, "inter_bw": 25e9, "per_node": 8},
    "a100-40gb": {"memory": 40e9, "peak": 312e12, "intra_bw": 300e9, "inter_bw": 25e9, "per_node": 8},
    "cpu": {"memory": 24e9, "peak": 130e9, "intra_bw": 5e9, "inter_bw": 1e9, "per_node": 1},
}
USABLE = 0.9  # of device memory: the allocator's fragmentation and the CUDA context
RECOMPUTE = {"none": 1.0, "selective": 1.1, "full": 4.0 / 3.0}


def activation_words() -> dict:
    """{mode: (words per token per dim per layer, words per token per dim once per step)} (bench/memory.py)."""
    data = json.loads(CONSTANTS.read_text())
    return {m: (data["per_layer"][m], data["once_per_step"][m]) for m in data["per_layer"]}


@dataclasses.dataclass
class Layout:
    dp: int
    pp: int
    cp: int
    tp: int
    ac: str
    microbatches: int

    def __str__(self) -> str:
        return f"dp={self.dp} pp={self.pp} cp={self.cp} tp={self.tp} ac={self.ac} mb={self.microbatches}"


def _params(cfg) -> tuple[int, int, int]:
    """(total, one block, embedding) parameter counts, from a meta-device build."""
    import torch

    from parallel.specs import spec_for

    with torch.device("meta"):
        model = spec_for(cfg.model).build(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    layers = getattr(model, "layers", None) or model.decoder.layers
    block = max(sum(p.numel() for p in b.parameters()) for b in layers.values())
    return total, block, cfg.model.vocab_size * cfg.model.dim


def estimate(cfg, layout: Layout, seq_len: int, tokens_per_step: int, device: str, efficiency: float = 0.4,
             words: dict | None = None) -> dict:
    """Per-rank memory components (bytes), total, predicted step time (s) for one layout."""
    from model.flops import flops_per_token

    m, d = cfg.model, DEVICES[device]
    words = words or activation_words()
    dp, pp, cp, tp = layout.dp, layout.pp, layout.cp, layout.tp
    world = dp * pp * cp * tp
    act_bytes = 2 if cfg.train.precision == "bf16" else 4
    total, block, embed = _params(cfg)
    p_rank = (total - embed) / pp / tp + embed / tp  # the embedding table on the first and last stage
    shard = dp * cp
    rows = tokens_per_step // seq_len  # sequences per step
    mb = max(layout.microbatches, 1) if pp > 1 else max(cfg.train.grad_accum, 1)
    rows_mb = max(rows // dp // mb, 1)
    tokens_mb = rows_mb * seq_len / cp
    in_flight = min(pp, mb) if pp > 1 else 1
    hd = m.dim // m.heads
    mem = {
        "weights": 4 * p_rank / shard,
        "grads": 4 * p_rank / shard,
        "optimizer": 8 * p_rank / shard,
        "gathered blocks": 2 * 4 * block / tp if shard > 1 else 0.0,
        "activations": (words[layout.ac][0] * (m.layers / pp) * in_flight + words[layout.ac][1])
        * tokens_mb * m.dim * act_bytes / tp,
        "loss chunk": 3 * min(cfg.train.loss_chunk or tokens_mb, tokens_mb) * m.vocab_size / tp * 4,
        "sequence-parallel buffers": (2 * cp * rows_mb * (m.heads / tp) * hd * hd * 4 if cp > 1 else 0.0)
        + (4 * rows_mb * tokens_mb * (m.heads / tp) * hd * act_bytes if cp > 1 and "S" in m.attention_pattern else 0.0),
    }
    used = sum(mem.values())
    flops = flops_per_token(m, seq_len) * tokens_per_step
    compute = flops / (world * d["peak"] * efficiency) * RECOMPUTE[layout.ac] * (1 + (pp - 1) / mb)
    nodes_span = world > d["per_node"]
    fsdp_bw = d["inter_bw"] if nodes_span and shard > 1 else d["intra_bw"]
    fsdp = 3 * 4 * p_rank * (shard - 1) / shard / fsdp_bw if shard > 1 else 0.0
    tp_comm = (4 * (m.layers / pp) * 2 * (tp - 1) / tp * rows // dp * seq_len / cp * m.dim * act_bytes
               / d["intra_bw"]) if tp > 1 else 0.0
    return {"layout": layout, "memory": mem, "used": used, "capacity": d["memory"] * USABLE,
            "fits": used <= d["memory"] * USABLE, "time": compute + fsdp + tp_comm,
            "time_parts": {"compute": compute, "fsdp": fsdp, "tp": tp_comm}}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search(cfg, gpus: int, device: str, seq_len: int, tokens_per_step: int, efficiency: float = 0.4) -> list[dict]:
    """Every valid layout of `gpus` ranks (tp within a node, pp dividing the layers, cp dividing the sequence,
    dp dividing the step's sequences), each AC mode, micro-batches pp/2pp/4pp; fitting ones first by time."""
    m = cfg.model
    rows = tokens_per_step // seq_len
    out = []
    words = activation_words()
    for tp, pp, cp in itertools.product(_divisors(gpus), repeat=3):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        if (tp > DEVICES[device]["per_node"] or m.heads % tp or m.glu_dim % tp or m.vocab_size % tp
                or m.layers % pp or seq_len % cp or rows % dp or (cp > 1 and (seq_len // cp) % 64)):
            continue
        for ac in ("none", "selective", "full"):
            for mb in ([pp, 2 * pp, 4 * pp] if pp > 1 else [1]):
                if pp > 1 and (rows // dp) % mb:
                    continue
                out.append(estimate(cfg, Layout(dp, pp, cp, tp, ac, mb), seq_len, tokens_per_step, device,
                                    efficiency, words))
    return sorted(out, key=lambda e: (not e["fits"], e["time"]))


def _gib(x: float) -> str:
    return f"{x / 2**30:,.1f}"


def report(e: dict, device: str) -> str:
    lines = [f"per-rank memory estimate for {e['layout']} on {device} "
             f"({_gib(e['capacity'])} GiB usable of {_gib(DEVICES[device]['memory'])} GiB):"]
    for k, v in e["memory"].items():
        lines.append(f"  {k:<26} {_gib(v):>9} GiB")
    verdict = "fits" if e["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<26} {_gib(e['used']):>9} GiB  -> {verdict}; predicted step {e['time']:.2f} s "
                 f"(compute {e['time_parts']['compute']:.2f}, FSDP {e['time_parts']['fsdp']:.2f}, "
                 f"TP {e['time_parts']['tp']:.2f})")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(prog="lightspan plan", description="Layouts that fit a model on N devices, "
                                "ranked by predicted step time (see pretrain/plan.py for the model).")
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, required=True, help="number of devices (ranks)")
    p.add_argument("--device", default="h100-80gb", choices=sorted(DEVICES))
    p.add_argument("--seq-len", type=int, default=0, help="sequence length (default: the config's longest)")
    p.add_argument("--tokens-per-step", type=int, default=0, help="default: the config's, at least one sequence")
    p.add_argument("--efficiency", type=float, default=0.4, help="achieved fraction of peak FLOP/s (default 0.4)")
    p.add_argument("--memory-gb", type=float, default=0.0, help="override the device memory (GB)")
    p.add_argument("--top", type=int, default=10)
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    from pretrain.config import load_config

    args, overrides = parse(argv)
    if args.gpus < 1 or args.efficiency <= 0 or args.efficiency > 1:
        raise ValueError("--gpus must be >= 1 and --efficiency in (0, 1]")
    cfg = load_config(args.config, overrides)
    d = cfg.data
    seq = args.seq_len or (d.seq_len if d.loader == "concat" else 2 ** d.max_log2)
    tokens = max(args.tokens_per_step or d.tokens_per_step, seq)
    if args.memory_gb:
        DEVICES[args.device] = dict(DEVICES[args.device], memory=args.memory_gb * 1e9)
    dev = DEVICES[args.device]
    print(f"{cfg.model.arch} {cfg.model.layers}L x {cfg.model.dim}, {args.gpus} x {args.device} "
          f"({dev['memory'] / 1e9:.0f} GB, {dev['peak'] / 1e12:.0f} TFLOP/s peak, efficiency {args.efficiency}, "
          f"NVLink {dev['intra_bw'] / 1e9:.0f} GB/s, network {dev['inter_bw'] / 1e9:.0f} GB/s), sequence {seq:,}, "
          f"{tokens:,} tokens per step, {cfg.train.precision}; activation words per token per layer per dim "
          f"{activation_words()} (bench/memory.py)")
    found = search(cfg, args.gpus, args.device, seq, tokens, args.efficiency)
    fitting = [e for e in found if e["fits"]]
    if not fitting:
        best = min(found, key=lambda e: e["used"]) if found else None
        msg = f"no layout of {args.gpus} x {args.device} fits {seq:,}-token sequences"
        if best is not None:
            msg += f"; the smallest needs {_gib(best['used'])} GiB per rank ({best['layout']}): add devices"
        raise ValueError(msg)
    print(f"{len(fitting)} of {len(found)} layouts fit; fastest first:")
    print(f"{'layout':<44} {'GiB/rank':>9} {'step s':>8} {'tokens/s':>12}")
    for e in fitting[:args.top]:
        print(f"{str(e['layout']):<44} {_gib(e['used']):>9} {e['time']:>8.2f} {tokens / e['time']:>12,.0f}")
    print()
    print(report(fitting[0], args.device))
    return 0


def check_fits(cfg, device: str) -> str:
    """The configured layout's estimate (for --dry-run); raises ValueError with the numbers when it does not fit."""
    d = cfg.data
    seq = d.seq_len if d.loader == "concat" else 2 ** d.max_log2
    p = cfg.parallel
    layout = Layout(p.dp, p.pp, p.cp, p.tp, cfg.train.activation_checkpointing, p.microbatches)
    e = estimate(cfg, layout, seq, max(d.tokens_per_step, seq), device)
    text = report(e, device)
    if not e["fits"]:
        raise ValueError(text.replace("\n", " | ") + " | lower the sequence length, raise parallel.cp/tp/pp, set "
                         "train.activation_checkpointing=full, or see `lightspan plan`")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
