"""The TNL decoder against a direct, unvectorized re-computation of DESIGN section 2 (float64)."""
import math

import pytest
import torch

from model import ModelConfig, build_model
from model.tnl import Lrpe, TransnormerLM, tnl_decay_slopes


def tiny_cfg(**kw):
    base = dict(vocab_size=50, dim=16, layers=3, heads=2, glu_dim=24, lrpe_layers=[0], attn_backend="naive")
    base.update(kw)
    return ModelConfig(**base)


def srms(x, eps=1e-6):
    return x / math.sqrt(sum(float(v) ** 2 for v in x) / len(x) + eps)


def reference_block(block, x, layer, layers, heads, lrpe_theta=None):
    """One TNL block, token by token and head by head, from the weights. x: (T, D) float64."""
    T, D = x.shape
    hd = D // heads
    mixer = block.token_mixer
    W = mixer.qkvu_proj.weight.detach()
    out = torch.zeros_like(x)
    xn = torch.stack([srms(x[t]) for t in range(T)])
    proj = xn @ W.T
    q, k, v, u = proj[:, :D], proj[:, D:2 * D], proj[:, 2 * D:3 * D], proj[:, 3 * D:]
    q, k = q * torch.sigmoid(q), k * torch.sigmoid(k)
    # The buffer holds s_{h,l} rounded to fp32 (test_decay_slopes_formula checks it); use it exactly.
    slopes = mixer.slope.tolist()
    torch.testing.assert_close(mixer.slope.float(), tnl_decay_slopes(heads, layer, layers))
    attn = torch.zeros(T, D, dtype=x.dtype)
    for h in range(heads):
        lam = math.exp(-slopes[h])
        sl = slice(h * hd, (h + 1) * hd)
        for t in range(T):
            acc = torch.zeros(hd, dtype=x.dtype)
            for s in range(t + 1):
                qt, ks = q[t, sl], k[s, sl]
                if lrpe_theta is not None:
                    th = lrpe_theta[h, 0]
                    qt = torch.cat([qt * torch.cos(th * t), qt * torch.sin(th * t)])
                    ks = torch.cat([ks * torch.cos(th * s), ks * torch.sin(th * s)])
                acc = acc + lam ** (t - s) * float(qt @ ks) * v[s, sl]
            attn[t, sl] = acc
    for t in range(T):
        o = srms(attn[t]) * u[t]
        out[t] = x[t] + mixer.out_proj.weight.detach() @ o
    ch = block.channel_mixer
    final = torch.zeros_like(out)
    for t in range(T):
        y = srms(out[t])
        final[t] = out[t] + ch.l3.weight.detach() @ ((ch.l1.weight.detach() @ y) * (ch.l2.weight.detach() @ y))
    return final


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_block_matches_unvectorized_reference(layer):
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = build_model(cfg).double()
    # Larger weights than the 0.02 init so that every term matters numerically.
    for p in model.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.3)
    block = model.layers[str(layer)]
    x = torch.randn(1, 7, cfg.dim, dtype=torch.float64)
    theta = block.token_mixer.lrpe.theta.detach() if block.token_mixer.lrpe is not None else None
    assert (theta is not None) == (layer == 0)
    expected = reference_block(block, x[0], layer, cfg.layers, cfg.heads, theta)
    torch.testing.assert_close(block(x)[0], expected, rtol=1e-10, atol=1e-10)


def test_full_model_embedding_scale_and_tied_head():
    cfg = tiny_cfg()
    model = build_model(cfg).double()
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    x = model.embed_tokens(ids) * math.sqrt(cfg.dim)
    for layer in model.layers.values():
        x = layer(x)
    expected = model.final_norm(x) @ model.embed_tokens.weight.T
    torch.testing.assert_close(model(ids), expected)
    cfg2 = tiny_cfg(no_scale_embedding=True)
    assert build_model(cfg2).embed_scale == 1.0


@pytest.mark.parametrize("heads", [8, 16, 20, 32])
def test_decay_slopes_formula(heads):
    if heads == 20:  # non power of two: 16 from 2^(-8(i+1)/16), then every other slope of the 32-head set
        base = [2 ** (-8 * (i + 1) / 16) for i in range(16)] + [2 ** (-8 * (i + 1) / 32) for i in (0, 2, 4, 6)]
    else:
        base = [2 ** (-8 * (h + 1) / heads) for h in range(heads)]
    L = 24
    for layer in (0, 5, L - 1):
        got = tnl_decay_slopes(heads, layer, L)
        want = torch.tensor(base) * (1 - layer / (L - 1) + 1e-5)
        torch.testing.assert_close(got, want.float())
    torch.testing.assert_close(tnl_decay_slopes(heads, 0, 1), torch.tensor(base).float())  # one layer: factor 1


def test_slopes_are_buffers_not_state():
    model = build_model(tiny_cfg())
    assert not any("slope" in k for k in model.state_dict())
    assert "layers.0.token_mixer.lrpe.theta" in model.state_dict()
    assert "layers.1.token_mixer.lrpe.theta" not in model.state_dict()


def test_lrpe_init_and_offset_slice_equals_full():
    lrpe = Lrpe(heads=4, head_dim=8).double()
    d = 32
    torch.testing.assert_close(lrpe.theta.flatten().double(), 10000 ** (-2 / d * torch.arange(d, dtype=torch.float64)),
                               rtol=1e-6, atol=0)
    x = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    full = lrpe(x)
    t0 = 7
    torch.testing.assert_close(lrpe(x[:, :, t0:], offset=t0), full[:, :, t0:])


def test_model_offset_continuation_equals_full_sequence():
    """Two halves with the state and the position offset passed on equal the whole sequence."""
    cfg = tiny_cfg(attn_backend="naive")
    model = build_model(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(ids)
    first, states = model(ids[:, :5], return_states=True)
    second, _ = model(ids[:, 5:], position_offset=5, states=states, return_states=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_llama_baseline_is_causal():
    cfg = tiny_cfg(arch="llama")
    model = build_model(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    out = model(ids)
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(ids2)[:, :6], out[:, :6])
    assert not torch.allclose(model(ids2)[:, 6:], out[:, 6:])


def test_model_has_no_distributed_imports():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "model"
    pattern = re.compile(r"(import|from)\s+torch\.distributed|torch\.distributed\.\w+\(")
    offenders = [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_tnl_is_module_only():
    assert isinstance(build_model(tiny_cfg()), TransnormerLM)
