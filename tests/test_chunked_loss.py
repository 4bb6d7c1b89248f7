"""The fused chunked head + cross-entropy equals F.cross_entropy on full logits: the loss and every gradient,
with uneven chunks and ignored labels, through a tied-embedding model, and vocab-parallel under tp=2."""
import pytest
import torch
import torch.nn.functional as F

from parallel.harness import run_distributed
from parallel.loss import chunked_linear_cross_entropy, install_fused_head, loss_targets


def _data(n=37, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 37, 4096])
def test_chunked_equals_full_logits(chunk):
    hidden, weight, labels = _data()
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-5, atol=1e-6)


def test_a_tied_model_with_the_fused_head_has_the_same_loss_and_gradients():
    from model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=96, dim=32, layers=2, heads=4, glu_dim=64, attn_backend="naive")
    torch.manual_seed(0)
    plain, fused = build_model(cfg), build_model(cfg)
    install_fused_head(fused.lm_head, chunk=10)
    ids = torch.randint(0, 96, (3, 20))
    labels = torch.randint(0, 96, (3, 20))
    labels[0, :4] = -100
    ref = F.cross_entropy(plain(ids).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    with loss_targets(labels):
        got = fused(ids)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():  # the tied table: embedding + head contributions
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fused(ids), plain(ids))  # outside loss_targets: the logits, as before


def _tp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, labels = _data(n=41, v=64, seed=3)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = None
    mesh = init_device_mesh("cpu", (world,))
    sharded = torch.nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]))
    got = chunked_linear_cross_entropy(hidden, sharded, labels, chunk=9)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharded.grad.full_tensor(), ref_w, rtol=1e-5, atol=1e-6)
    return float(got)


@pytest.mark.distributed
def test_vocab_parallel_chunked_loss_matches_full_logits():
    a, b = run_distributed(_tp_worker, world_size=2, timeout_s=120)
    assert a == b
