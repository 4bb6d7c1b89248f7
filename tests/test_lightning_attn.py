"""Parity of every lightning-attention backend against the float64 naive oracle (outputs and gradients)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py does this too; kernels need it before import

import pytest  # noqa: E402
import torch  # noqa: E402

from model.ops import lightning_attn, lightning_attn_step  # noqa: E402
from model.ops.chunked import chunked_attn  # noqa: E402

# a large decay (first layers), moderate ones, and the last layer's near-zero slope (λ ≈ 1)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
SLOPES = torch.tensor([0.7, 0.1, 0.5e-5, 2.0**-8 * 1e-5])


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, H, T, Dk, Dv, dtype=torch.float32, device="cpu", slopes=SLOPES):
    g = torch.Generator().manual_seed(1000 * T + Dk)
    q, k = (torch.randn(B, H, T, Dk, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    s0 = torch.randn(B, H, Dk, Dv, generator=g)
    do = torch.randn(B, H, T, Dv, generator=g)
    dfinal = torch.randn(B, H, Dk, Dv, generator=g)
    cast = [x.to(device, dtype) for x in (q, k, v)]
    return cast, slopes[:H].to(device), s0.to(device), do.to(device), dfinal.to(device)


def run(fn, qkv, slope, s0, do, dfinal, dtype=None):
    """Outputs and gradients [o, final, dq, dk, dv, ds0] of fn, optionally computing in another dtype."""
    xs = [(x.to(dtype) if dtype else x.clone()).requires_grad_() for x in qkv]
    s = (s0.to(dtype) if dtype else s0.clone()).requires_grad_()
    sl = slope.to(dtype) if dtype else slope
    o, final = fn(*xs, sl, s, True)
    loss = (o.double() * do.double()).sum() + (final.double() * dfinal.double()).sum()
    loss.backward()
    return [o, final] + [x.grad for x in xs] + [s.grad]


def oracle(*args):
    return run(lambda *a: lightning_attn(*a, backend="naive"), *args, dtype=torch.float64)


def backend_fn(name, **kw):
    if name == "chunked" and kw:
        return lambda q, k, v, s, s0, out: chunked_attn(q, k, v, s, s0, out, **kw)
    return lambda q, k, v, s, s0, out: lightning_attn(q, k, v, s, s0, out, backend=name)


NAMES = ["o", "final", "dq", "dk", "dv", "ds0"]


def assert_parity(got, want, tol):
    errs = {n: rel(a, b) for n, a, b in zip(NAMES, got, want)}
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
def test_fp32_parity(backend, T):
    args = make_inputs(2, 4, T, 24, 40)
    got = run(backend_fn(backend), *args)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_parity(got, oracle(*args), 1e-6)


@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("T", [65, 300])
def test_chunked_block_sizes(block, T):
    args = make_inputs(1, 4, T, 16, 96)
    assert_parity(run(backend_fn("chunked", block=block), *args), oracle(*args), 1e-6)


@pytest.mark.parametrize("Dk,Dv", [(96, 192), (256, 16)])
def test_chunked_wide_heads(Dk, Dv):
    args = make_inputs(1, 2, 130, Dk, Dv)
    assert_parity(run(backend_fn("chunked"), *args), oracle(*args), 1e-6)


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_bf16_parity(backend):
    args = make_inputs(1, 4, 200, 32, 48, dtype=torch.bfloat16)
    got = run(backend_fn(backend), *args)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.bfloat16
    assert_parity(got, oracle(*args), 2e-2)


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_split_sequence_equals_whole(backend):
    """Run T1 tokens, feed the final state into the next T2 tokens: same outputs and gradients as one run."""
    (q, k, v), slope, s0, do, dfinal = make_inputs(1, 4, 150, 32, 24)
    fn = backend_fn(backend)
    whole = run(fn, (q, k, v), slope, s0, do, dfinal)

    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    s = s0.clone().requires_grad_()
    T1 = 67
    o1, mid = fn(*(x[:, :, :T1] for x in xs), slope, s, True)
    o2, final = fn(*(x[:, :, T1:] for x in xs), slope, mid, True)
    o = torch.cat([o1, o2], dim=2)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    split = [o, final] + [x.grad for x in xs] + [s.grad]
    assert_parity(split, whole, 1e-6)


def test_final_state_only_when_asked_and_auto_on_cpu():
    (q, k, v), slope, s0, _, _ = make_inputs(1, 2, 10, 16, 16)
    o, final = lightning_attn(q, k, v, slope)
    assert final is None and o.shape == v.shape
    o_auto, f_auto = lightning_attn(q, k, v, slope, s0, output_final_state=True)
    o_ch, f_ch = lightning_attn(q, k, v, slope, s0, output_final_state=True, backend="chunked")
    torch.testing.assert_close(o_auto, o_ch, rtol=0, atol=0)
    torch.testing.assert_close(f_auto, f_ch, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=pytest.mark.triton)])
def test_grads_through_final_state_only(backend):
    """The chunking/sequence-parallel use: only the final state feeds the loss (o's gradient is None)."""
    if backend == "triton":
        pytest.importorskip("triton")
    (q, k, v), slope, s0, _, dfinal = make_inputs(1, 2, 40, 16, 16, device=TRITON_DEVICE)
    xs = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    _, final = lightning_attn(*xs[:3], slope, xs[3], True, backend=backend)
    (final * dfinal).sum().backward()
    ys = [x.clone().double().requires_grad_() for x in (q, k, v, s0)]
    _, final_ref = lightning_attn(*ys[:3], slope.double(), ys[3], True, backend="naive")
    (final_ref * dfinal.double()).sum().backward()
    assert xs[0].grad.abs().max() == 0 and ys[0].grad is None
    assert_parity([final] + [x.grad for x in xs[1:]], [final_ref] + [y.grad for y in ys[1:]], 1e-6)


@pytest.mark.parametrize("unsqueezed", [False, True])
def test_step_matches_sequence(unsqueezed):
    (q, k, v), slope, s0, _, _ = make_inputs(2, 3, 6, 16, 24)
    want, want_final = lightning_attn(q, k, v, slope, s0, True, backend="naive")
    state = s0
    for t in range(6):
        qt, kt, vt = (x[:, :, t : t + 1] if unsqueezed else x[:, :, t] for x in (q, k, v))
        o, state = lightning_attn_step(qt, kt, vt, slope, state)
        assert o.shape == vt.shape and state.dtype == torch.float32
        torch.testing.assert_close(o.squeeze(2) if unsqueezed else o, want[:, :, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_final, rtol=1e-5, atol=1e-5)


def _bad_calls():
    q = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 4)
    s = torch.tensor([0.5, 0.1])
    good = dict(q=q, k=q, v=v, slope=s)
    return [
        (dict(good, k=torch.randn(1, 2, 5, 7)), "k must"),
        (dict(good, v=torch.randn(1, 2, 6, 4)), "v must"),
        (dict(good, q=torch.randn(2, 5, 8), k=torch.randn(2, 5, 8)), "q must"),
        (dict(good, slope=torch.tensor([0.5, 0.0])), "slope must"),
        (dict(good, slope=torch.tensor([0.5])), "slope must"),
        (dict(good, initial_state=torch.randn(1, 2, 4, 8)), "initial_state must"),
        (dict(good, q=q.long(), k=q.long(), v=v.long()), "floating"),
        (dict(good, k=q.double()), "share one dtype"),
        (dict(good, backend="cuda-magic"), "backend must"),
    ]


@pytest.mark.parametrize("kwargs,match", _bad_calls())
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lightning_attn(**kwargs)


def test_step_bad_input_raises():
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="state must"):
        lightning_attn_step(q, q, torch.randn(1, 2, 4), torch.tensor([0.5, 0.1]), torch.randn(1, 2, 8, 5))
    with pytest.raises(ValueError, match="one token"):
        lightning_attn_step(torch.randn(1, 2, 3, 8), q, q, torch.tensor([0.5, 0.1]), None)


# ---- triton: the exact kernel code, under the interpreter on CPU (fp32 only: interpreted bf16 is unreliable)


@pytest.mark.triton
# (40, 16, 80) spans two Dv slices (partial dQ/dK sums); (33, 160, 16) takes the wide-head config
@pytest.mark.parametrize(
    "T,Dk,Dv", [(1, 16, 32), (63, 16, 32), (65, 32, 24), (130, 48, 16), (40, 16, 80), (33, 160, 16)]
)
def test_triton_fp32_parity(T, Dk, Dv):
    pytest.importorskip("triton")
    args = make_inputs(1, 2, T, Dk, Dv, device=TRITON_DEVICE)
    assert_parity(run(backend_fn("triton"), *args), oracle(*args), 1e-6)


@pytest.mark.triton
def test_triton_without_states_and_split():
    """No initial state / no final-state gradient paths, and the split-sequence property."""
    pytest.importorskip("triton")
    (q, k, v), slope, _, do, _ = make_inputs(1, 2, 70, 16, 16, device=TRITON_DEVICE)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, final = lightning_attn(*xs, slope, backend="triton")
    assert final is None
    (o * do).sum().backward()
    ys = [x.clone().double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = lightning_attn(*ys, slope.double(), backend="naive")
    (o_ref * do.double()).sum().backward()
    assert_parity([o] + [x.grad for x in xs], [o_ref] + [y.grad for y in ys], 1e-6)

    o1, mid = lightning_attn(q[:, :, :33], k[:, :, :33], v[:, :, :33], slope, None, True, backend="triton")
    o2, _ = lightning_attn(q[:, :, 33:], k[:, :, 33:], v[:, :, 33:], slope, mid, True, backend="triton")
    assert rel(torch.cat([o1, o2], dim=2), o_ref) < 1e-6


@pytest.mark.triton
def test_triton_rejects_float64():
    pytest.importorskip("triton")
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="triton backend supports"):
        lightning_attn(q, q, q, torch.tensor([0.5], device=TRITON_DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Dk,Dv", [(64, 128), (96, 192), (256, 64)])
def test_triton_gpu_parity(dtype, tol, Dk, Dv):
    args = make_inputs(2, 4, 1000, Dk, Dv, dtype=dtype, device="cuda")
    got = run(backend_fn("triton"), *args)
    assert got[0].dtype == dtype
    assert_parity(got, oracle(*args), tol)
    auto = lightning_attn(*args[0], args[1], args[2], backend="auto")[0]
    torch.testing.assert_close(auto, got[0])
