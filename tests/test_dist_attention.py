"""Distributed MHA parity: Ulysses and ring attention over gloo ranks vs single-process attention.

Every rank builds the same full q, k, v, dO from one seed, runs the unsharded reference itself, then its own
shard through the distributed op, and compares outputs and dq, dk, dv on its shard (fp32, 1e-5).
"""
import pytest
import torch
import torch.distributed as dist

from model.softmax_attention import softmax_attention
from parallel.dist_attention import (DeepSpeedUlyssesAttention, RingAttention, UlyssesAttention, zigzag_positions,
                                     zigzag_shard)
from parallel.harness import run_distributed

TOL = dict(atol=1e-5, rtol=1e-5)


def _shard(x, rank, world, layout):
    if layout == "zigzag":
        return zigzag_shard(x, rank, world, dim=2)
    return x.chunk(world, dim=2)[rank]


def _case(rank, world, op, causal, layout, B=2, H=4, Tq=16, Tk=16, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = (torch.randn(B, H, Tk, D, generator=g) for _ in range(2))
    do = torch.randn(B, H, Tq, D, generator=g)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = softmax_attention(*full, causal=causal)
    (o_ref * do).sum().backward()

    local = [_shard(x, rank, world, layout).clone().requires_grad_() for x in (q, k, v)]
    o = op(*local, causal=causal)
    (o * _shard(do, rank, world, layout)).sum().backward()
    what = f"{op!r} causal={causal}"
    torch.testing.assert_close(o, _shard(o_ref.detach(), rank, world, layout), **TOL, msg=lambda m: f"{what} o: {m}")
    for name, got, ref in zip("qkv", local, full):
        torch.testing.assert_close(got.grad, _shard(ref.grad, rank, world, layout), **TOL,
                                   msg=lambda m: f"{what} d{name}: {m}")


def _ulysses_ops(group):
    ops = [UlyssesAttention(group)]
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:  # installed by `make test`; optional elsewhere
        return ops
    return ops + [DeepSpeedUlyssesAttention(group)]


def _all_cases(rank, world, ulysses):
    group = dist.group.WORLD
    ops = _ulysses_ops(group) if ulysses else []
    for causal in (True, False):
        _case(rank, world, RingAttention(group, "contiguous"), causal, "contiguous")
        _case(rank, world, RingAttention(group, "zigzag"), causal, "zigzag")
        for op in ops:
            _case(rank, world, op, causal, "contiguous")
    # cross-attention shape: q from the text, k/v from a memory of another length, not causal
    _case(rank, world, RingAttention(group), False, "contiguous", Tq=8, Tk=24, seed=1)
    for op in ops:
        _case(rank, world, op, False, "contiguous", Tq=8, Tk=24, seed=1)
    if world == 4:
        for op in ops:
            with pytest.raises(ValueError, match=r"heads \(6\) not divisible by cp \(4\)"):
                op(*(torch.zeros(1, 6, 4, 8) for _ in range(3)))
    return [type(op).__name__ for op in ops]


@pytest.mark.parametrize("world", [2, 4])
def test_dist_attention_parity(world):
    """cp=2: ring (contiguous, zig-zag) and Ulysses (ours, and DeepSpeed's DistributedAttention when DeepSpeed
    is installed); cp=4: the same (H=4) plus the uneven-heads refusal."""
    results = run_distributed(_all_cases, world, args=(True,), timeout_s=90)
    assert results[0][0] == "UlyssesAttention" and all(r == results[0] for r in results)


def test_zigzag_layout():
    """Rank r holds chunks r and 2W-1-r of 2W: positions of a W=2, T=8 split."""
    x = torch.arange(8).view(1, 1, 8, 1)
    assert zigzag_shard(x, 0, 2, dim=2).flatten().tolist() == [0, 1, 6, 7]
    assert zigzag_shard(x, 1, 2, dim=2).flatten().tolist() == [2, 3, 4, 5]
    assert zigzag_positions(1, 2, 4).tolist() == [2, 3, 4, 5]
