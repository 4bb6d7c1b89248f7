"""Softmax attention: the local op (SDPA on CPU) and its varlen form vs a float64 loop; the hybrid's
softmax mixer vs a direct re-computation; config validation of attention_pattern."""
import math

import pytest
import torch

from model import ModelConfig
from model.softmax_attention import SoftmaxMixer, softmax_attention, softmax_attention_varlen


def reference_attention(q, k, v, causal):
    """Row by row in float64. q: (B, H, Tq, D); k, v: (B, H, Tk, D)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for t in range(q.shape[2]):
        keys = t + 1 if causal else k.shape[2]
        s = (q[:, :, t:t + 1] @ k[:, :, :keys].transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out[:, :, t] = (torch.softmax(s, dim=-1) @ v[:, :, :keys])[:, :, 0]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_attention_matches_float64(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(softmax_attention(q, k, v, causal).double(), reference_attention(q, k, v, causal),
                               atol=1e-5, rtol=1e-5)


def test_cross_attention_shapes_and_causal_refusal():
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    torch.testing.assert_close(softmax_attention(q, kv, kv, causal=False).double(),
                               reference_attention(q, kv, kv, False), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="as many queries as keys"):
        softmax_attention(q, kv, kv, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_per_segment(causal):
    g = torch.Generator().manual_seed(1)
    lens = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 2, 4, generator=g) for _ in range(3))
    out = softmax_attention_varlen(q, k, v, cu, cu, causal=causal)
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        ref = reference_attention(*(x[s].transpose(0, 1).unsqueeze(0) for x in (q, k, v)), causal)
        torch.testing.assert_close(out[s].double(), ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_softmax_mixer_matches_direct_recomputation():
    """RoPE (HF Llama rotate-half convention) at global positions offset.., causal softmax, o_proj."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, dim=8, layers=2, heads=2, glu_dim=8, attention_pattern="LS")
    mixer = SoftmaxMixer(cfg, 1).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    offset = 3
    got = mixer(x, position_offset=offset)
    hd = 4
    q, k, v = (x[0] @ p.weight.T for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))

    def rope(vec, pos):  # vec: (hd,)
        out = vec.clone()
        for i in range(hd // 2):
            a = pos * cfg.rope_theta ** (-2 * i / hd)
            out[i] = vec[i] * math.cos(a) - vec[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = vec[i + hd // 2] * math.cos(a) + vec[i] * math.sin(a)
        return out

    o = torch.zeros(5, 8, dtype=torch.float64)
    for h in range(2):
        sl = slice(h * hd, (h + 1) * hd)
        for t in range(5):
            scores = torch.stack([rope(q[t, sl], offset + t) @ rope(k[s, sl], offset + s) / math.sqrt(hd)
                                  for s in range(t + 1)])
            o[t, sl] = torch.softmax(scores, 0) @ v[: t + 1, sl]
    torch.testing.assert_close(got[0], o @ mixer.o_proj.weight.T)
    y, (k_cache, v_cache) = mixer(x, position_offset=offset, return_state=True)  # the key/value cache
    torch.testing.assert_close(y, got)
    assert k_cache.shape == v_cache.shape == (1, mixer.heads, 5, hd)

    class Sharded:  # any non-local strategy (a distributed one): a cache makes no sense there
        def __call__(self, *a, **k):
            raise AssertionError("not called")

    mixer.attn_op = Sharded()
    with pytest.raises(NotImplementedError, match="not under sequence parallelism"):
        mixer(x[:, -1:], position_offset=offset + 5, state=(k_cache, v_cache))


def test_attention_pattern_validation():
    ModelConfig(layers=4, attention_pattern="LLLS").validate()
    with pytest.raises(ValueError, match="letters L .* S"):
        ModelConfig(attention_pattern="LLX").validate()
    cfg = ModelConfig(layers=5, attention_pattern="LS")
    assert [cfg.layer_kind(i) for i in range(5)] == list("LSLSL")
    with pytest.raises(ValueError, match=r"sharedllm_layers \(7\) must be between 1 and model.layers \(4\)"):
        ModelConfig(arch="sharedllm", layers=4, sharedllm_layers=7).validate()
    with pytest.raises(ValueError, match="multiple of 2\\^sharedllm_depth"):
        ModelConfig(arch="sharedllm", layers=4, sharedllm_layers=2, sharedllm_chunk=100).validate()
    with pytest.raises(ValueError, match="lower tower"):
        ModelConfig(arch="sharedllm", layers=4, sharedllm_layers=2, attention_pattern="LS").validate()
