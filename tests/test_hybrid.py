"""Hybrid lightning/softmax TNL stacks: layer kinds and key names; cp=2 parity with LASP-2 on the lightning
layers and distributed MHA (ring, Ulysses) on the softmax layers vs one process."""
import copy

import torch
import torch.distributed as dist

from model import ModelConfig, build_model
from model.softmax_attention import SoftmaxMixer
from model.tnl import TokenMixer
from parallel.dist_attention import RingAttention, UlyssesAttention, apply_dist_attention
from parallel.harness import run_distributed
from parallel.lasp import LaspAttention, apply_lasp
from parallel_parity import cp_share_parity


def hybrid_cfg():
    return ModelConfig(vocab_size=64, dim=32, layers=4, heads=2, glu_dim=48, lrpe_layers=[0], attn_backend="chunked",
                       attention_pattern="LS")


def test_hybrid_layers_and_key_names():
    model = build_model(hybrid_cfg())
    kinds = [type(b.token_mixer) for b in model.layers.values()]
    assert kinds == [TokenMixer, SoftmaxMixer, TokenMixer, SoftmaxMixer]
    keys = set(model.state_dict())
    assert "layers.0.token_mixer.qkvu_proj.weight" in keys and "layers.2.token_mixer.out_proj.weight" in keys
    assert {f"layers.1.token_mixer.{p}_proj.weight" for p in "qkvo"} <= keys
    logits = model(torch.randint(0, 64, (2, 9)))
    assert logits.shape == (2, 9, 64) and torch.isfinite(logits).all()


def test_default_pattern_is_all_lightning():
    model = build_model(ModelConfig(vocab_size=16, dim=8, layers=3, heads=2, glu_dim=8))
    assert all(isinstance(b.token_mixer, TokenMixer) for b in model.layers.values())


def _hybrid_parity(rank, world, impl, T=16, B=2):
    torch.manual_seed(0)
    model = build_model(hybrid_cfg())
    sharded = apply_dist_attention(apply_lasp(copy.deepcopy(model), dist.group.WORLD, "lasp2"), dist.group.WORLD, impl)
    ops = [type(b.token_mixer.attn_op) for b in sharded.layers.values()]
    want = RingAttention if impl == "ring" else UlyssesAttention
    assert ops == [LaspAttention, want, LaspAttention, want], ops
    return cp_share_parity(model, sharded, 64, rank, world, B, T, impl)


def _both_impls(rank, world):
    return [_hybrid_parity(rank, world, impl) for impl in ("ring", "ulysses")]


def test_hybrid_cp2_parity():
    """Hybrid 'LS' x2 at cp=2 (LASP-2 + ring, then LASP-2 + Ulysses): logits/loss 1e-5, grads 1e-4."""
    a, b = run_distributed(_both_impls, 2, timeout_s=60)
    assert a == b


def test_hybrid_decodes_with_states_like_the_whole_sequence():
    """Softmax layers keep a key/value cache as their state: chunked prefill and token-by-token decoding give
    the logits of one forward over the whole sequence, and greedy_generate equals re-running the model."""
    from evaluation.model_io import ModelRunner
    from model.generate import greedy_generate

    torch.manual_seed(0)
    cfg = hybrid_cfg()
    cfg.init_std = 0.3  # sharper random logits: a greedy mismatch would show
    model = build_model(cfg).eval()
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        full = model(ids)
        a, states = model(ids[:, :10], return_states=True)
        assert isinstance(states[1], tuple) and states[1][0].shape == (2, 2, 10, 16)  # S layer: (k, v)
        b, states = model(ids[:, 10:22], position_offset=10, states=states, return_states=True)
        c, states = model(ids[:, 22:], position_offset=22, states=states, return_states=True)
        torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, atol=1e-5, rtol=1e-5)
        assert states[3][0].shape[2] == 23
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_generate(model, ids, 6), seq)
    runner = ModelRunner(model, chunk_size=8)
    assert runner.recurrent
    torch.testing.assert_close(torch.cat([x for _, x in runner.logits_chunks(ids)], dim=1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(runner.generate(ids, 6), seq[:, 23:])
