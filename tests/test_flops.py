"""FLOP counts per token (model.flops) against hand counts for the TNL, a hybrid and SharedLLM."""
import dataclasses

import pytest

from model import ModelConfig, build_model
from model.flops import attention_flops_fwd, flops_per_token, matmul_params


def cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=1000, dim=64, layers=4, heads=4, glu_dim=128, lrpe_layers=[]), **kw})


def test_matmul_params_equal_the_models_matmul_weights():
    for c in (cfg(), cfg(attention_pattern="LS"), cfg(arch="llama")):
        model = build_model(c)
        weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
        tied_head = c.dim * c.vocab_size if c.tie_embeddings else 0  # listed once, as the embedding
        assert matmul_params(c) == weights + tied_head, (c.arch, c.attention_pattern)


def test_softmax_layers_grow_with_length_lightning_layers_do_not():
    tnl, hybrid = cfg(), cfg(attention_pattern="LLLS")
    assert attention_flops_fwd(tnl, 65536) == attention_flops_fwd(tnl, 1024)
    grow = attention_flops_fwd(hybrid, 65536) - attention_flops_fwd(hybrid, 1024)
    assert grow == pytest.approx(4 * 2 * 2 * 16 * (65536 - 1024) / 2)  # one S layer: H * 2 * 2 * hd * dT/2


def test_sharedllm_counts_context_through_the_lower_tower_only():
    s = cfg(arch="sharedllm", sharedllm_layers=2, sharedllm_chunk=256, sharedllm_depth=3, sharedllm_node_positions=8,
            sharedllm_context_chunks=4)
    plain = dataclasses.replace(s, arch="tnl")
    seq = 4 * 256 + 1024
    # the context costs ~2 of 4 layers and no head: a SharedLLM sequence is cheaper per token than the decoder's
    assert flops_per_token(s, seq) < flops_per_token(plain, seq)
    # with no context left the count is the decoder's plus the cross-attention projections
    text_only = flops_per_token(dataclasses.replace(s, sharedllm_context_chunks=0), 1024, training=False)
    extra = 2 * (2 * 2 * 64 * 64)  # M layers x (q_proj + o_proj), 2 FLOPs per weight, empty memory
    assert text_only == pytest.approx(flops_per_token(plain, 1024, training=False) + extra)
