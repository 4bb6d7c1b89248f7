"""LASP parity: the sequence-sharded op and model over gloo ranks vs the same computation in one process.

Every rank builds the same inputs from one seed, runs the unsharded reference itself and its own chunk
sharded, and compares; grads of replicated parameters are summed over the cp group first.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from model import ModelConfig, build_model
from model.ops import lightning_attn
from parallel.harness import run_distributed
from parallel.lasp import LaspAttention, apply_lasp
from parallel_parity import cp_share_parity


def _op_case(rank, world, impl, backend, dtype, T=32, B=2, H=3, Dk=8, Dv=6):
    g = torch.Generator().manual_seed(1234)
    q, k = (torch.rand(B, H, T, Dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    slope = torch.tensor([0.9, 0.05, 1e-4])[:H]  # fast, slow and almost no decay
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    do = torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    dfinal = torch.randn(s0.shape, generator=g, dtype=s0.dtype)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    o_ref, final_ref = lightning_attn(*leaves[:3], slope, leaves[3], True, backend=backend)
    ((o_ref * do).sum() + (final_ref * dfinal).sum()).backward()
    dq_ref, dk_ref, dv_ref, ds0_ref = (x.grad for x in leaves)

    C = T // world
    sl = slice(rank * C, (rank + 1) * C)
    local = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
    s0_local = s0.clone().requires_grad_()
    op = LaspAttention(dist.group.WORLD, impl, backend)
    o, final = op(*local, slope, initial_state=s0_local, output_final_state=True)
    loss = (o * do[:, :, sl]).sum()
    if rank == world - 1:  # the sequence's final state lives on the last rank
        loss = loss + (final * dfinal).sum()
    loss.backward()
    ds0 = s0_local.grad.clone()
    dist.all_reduce(ds0)  # each rank holds its share of d(initial_state)

    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, o_ref[:, :, sl], **tol)
    for name, got, want in zip("qkv", (x.grad for x in local), (dq_ref, dk_ref, dv_ref)):
        torch.testing.assert_close(got, want[:, :, sl], **tol, msg=lambda m: f"{backend} d{name}: {m}")
    torch.testing.assert_close(ds0, ds0_ref, **tol, msg=lambda m: f"{backend} d(initial_state): {m}")
    if rank == world - 1:
        torch.testing.assert_close(final, final_ref, **tol)


def tiny_cfg(backend):
    return ModelConfig(vocab_size=96, dim=32, layers=3, heads=2, glu_dim=48, lrpe_layers=[0], attn_backend=backend)


def _model_parity(rank, world, impl, backend, T=32, B=2):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(backend))
    sharded = apply_lasp(copy.deepcopy(model), dist.group.WORLD, impl)
    return cp_share_parity(model, sharded, 96, rank, world, B, T, impl)


def _lasp1_matches_lasp2(rank, world, T=24):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.rand(1, 2, T, 4, generator=g) for _ in range(3))
    slope = torch.tensor([0.3, 0.01])
    C = T // world
    sl = slice(rank * C, (rank + 1) * C)
    outs = []
    for impl in ("lasp1", "lasp2"):
        leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
        o, _ = LaspAttention(dist.group.WORLD, impl, "chunked")(*leaves, slope)
        o.square().sum().backward()
        outs.append([o.detach()] + [x.grad for x in leaves])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    return True


def _parity(rank, world, impl, op_cases, model_backend, check_lasp1):
    """One spawn per layout: the op alone for each (backend, dtype), then the whole model, then LASP-1 vs 2."""
    for backend, dtype in op_cases:
        _op_case(rank, world, impl, backend, dtype)
    loss = _model_parity(rank, world, impl, model_backend)
    if check_lasp1:
        _lasp1_matches_lasp2(rank, world)
    return loss


@pytest.mark.parametrize("world,impl,model_backend", [(2, "lasp2", "chunked"), (4, "lasp2", "naive"),
                                                      (2, "lasp1", "chunked")])
def test_lasp_parity(world, impl, model_backend):
    """Op outputs and dq/dk/dv/d(initial_state) vs one process (fp64 to 1e-10, fp32 to 1e-5); then the tiny TNL
    (LRPE on layer 0): logits and loss to 1e-5, every parameter's cp-summed grad to 1e-4."""
    cases = [("naive", torch.float64), ("chunked", torch.float64), ("chunked", torch.float32)]
    if world == 2:
        cases.append(("recurrent", torch.float64))
    losses = run_distributed(_parity, world, (impl, cases, model_backend, world == 4))
    assert max(losses) == min(losses)


def test_apply_lasp_keeps_backend_and_rejects_unknown_impl():
    model = build_model(tiny_cfg("naive"))
    with pytest.raises(ValueError, match="lasp3"):
        apply_lasp(model, None, "lasp3")
    apply_lasp(model, None, "lasp1")
    ops = [layer.token_mixer.attn_op for layer in model.layers.values()]
    assert all(isinstance(op, LaspAttention) and op.backend == "naive" and op.impl == "lasp1" for op in ops)
