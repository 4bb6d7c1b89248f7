"""Pipeline parity: pp ranks running PipelineRunner vs the unsharded model in one process, same seed and batch.

Loss to 1e-5 and every parameter's gradient to 1e-4 on consecutive steps of different sequence lengths
(one cached schedule per shape), some labels ignored (token-weighted mean), then AdamW steps give the same
losses to 1e-4.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig, build_model
from parallel.harness import run_distributed
from parallel.pipeline import PipelineRunner, split_layers

VOCAB = 64


def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=VOCAB, dim=32, layers=4, heads=2, glu_dim=48, lrpe_layers=[0, 3],  # LRPE on the last stage too: position_offset reaches every stage

                                   attn_backend="chunked"))


def batch(step, B, T):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[0, : T // 2] = -100  # uneven valid counts across micro-batches
    return ids, labels


def _check_schedule(rank, world, schedule, lengths, opt_steps, B=4):
    model = tiny_model()
    ref = copy.deepcopy(model)
    runner = PipelineRunner(model, dist.group.WORLD, SimpleNamespace(pp_schedule=schedule, microbatches=2))
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    names = [n for n, _ in runner.named_parameters()]
    assert all(n in ref_params for n in names), names
    opt = torch.optim.AdamW(runner.module.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    losses = []
    for step, T in enumerate(lengths[:opt_steps]):
        ids, labels = batch(step, B, T)
        offset = 8 * step  # as a cp rank's chunk start would be
        loss = runner.step(ids, labels, position_offset=offset)
        loss_ref = F.cross_entropy(ref(ids, position_offset=offset).flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
        if step < 2:  # full gradient parity on the first two (different) lengths
            for name, p in runner.named_parameters():
                torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{schedule} step {step} {name}: {m}")
        opt.step(), opt.zero_grad(), opt_ref.step(), opt_ref.zero_grad()
        losses.append((float(loss), float(loss_ref)))
    assert len(runner._schedules) == len(set(lengths[:opt_steps]))
    return losses


def _pp_parity(rank, world, schedules, lengths, opt_steps):
    return {s: _check_schedule(rank, world, s, lengths, opt_steps) for s in schedules}


@pytest.mark.parametrize("schedules", [("1f1b", "gpipe"), ("interleaved",)], ids=["1f1b+gpipe", "interleaved"])
def test_pp2_parity(schedules):
    """pp=2: loss, grads and 6 AdamW steps over lengths 32, 16, 32, 24, 16, 32 vs the unsharded model."""
    lengths = [32, 16, 32, 24, 16, 32]
    results = run_distributed(_pp_parity, 2, (schedules, lengths, 6))
    for s in schedules:
        assert results[0][s] == results[1][s]  # the loss is broadcast from the last stage
        for got, want in results[0][s]:
            assert abs(got - want) < 1e-4


def test_split_layers_is_contiguous_and_even():
    names = [str(i) for i in range(7)]
    assert split_layers(names, 3) == [["0", "1", "2"], ["3", "4"], ["5", "6"]]
    with pytest.raises(ValueError, match="fewer than"):
        split_layers(names[:2], 4)


def _pp_cp_parity(rank, world, T=32, B=4):
    """Mesh (pp=2, cp=2), rank = 2*pp + cp: stage modules with LASP-2 on their cp group."""
    from parallel.lasp import apply_lasp, cp_position_offset

    pp_rank, cp_rank = divmod(rank, 2)
    cp_groups = [dist.new_group([2 * p, 2 * p + 1]) for p in range(2)]
    pp_groups = [dist.new_group([c, 2 + c]) for c in range(2)]
    model = tiny_model()
    ref = copy.deepcopy(model)
    apply_lasp(model, cp_groups[pp_rank], "lasp2")
    runner = PipelineRunner(model, pp_groups[cp_rank], SimpleNamespace(pp_schedule="1f1b", microbatches=2))
    ids, labels = batch(0, B, T)
    C = T // 2
    sl = slice(cp_rank * C, (cp_rank + 1) * C)
    n_valid = int((labels != -100).sum())
    loss = runner.step(ids[:, sl], labels[:, sl], position_offset=cp_position_offset(cp_rank, C), num_tokens=n_valid)
    dist.all_reduce(loss, group=cp_groups[pp_rank])
    loss_ref = F.cross_entropy(ref(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for name, p in runner.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp_groups[pp_rank])
        torch.testing.assert_close(grad, ref_params[name].grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    return float(loss)


def test_pp2_cp2_lasp_parity():
    """PipelineRunner over LASP-2 stage modules (pp=2 x cp=2): loss and cp-summed grads vs unsharded."""
    losses = run_distributed(_pp_cp_parity, 4)
    assert max(losses) == min(losses)
