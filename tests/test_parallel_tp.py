"""Tensor parallelism (tp=2, with and without Megatron sequence parallelism) against the unsharded model."""
import pytest
import torch

from parallel.harness import run_distributed
from parallel.mesh import LayoutError, check_layout
from parallel.tensor_parallel import check_tp
from parallel_parity import parity_worker, tiny_config

pytestmark = pytest.mark.distributed


def _tp_worker(rank, world):
    """tp=2 parity, then with sequence parallelism, then a hybrid (lightning + softmax layer), in one spawn
    (process start is the cost)."""
    plain = parity_worker(rank, world, {"tp": 2}, steps=10)
    sp = parity_worker(rank, world, {"tp": 2, "sequence_parallel": True}, steps=3)
    hybrid = parity_worker(rank, world, {"tp": 2, "sequence_parallel": True}, steps=3,
                           model_kw={"attention_pattern": "LS"})
    return plain, sp, hybrid


def test_tp2_matches_unsharded():
    (plain, sp, hybrid), _ = run_distributed(_tp_worker, world_size=2, timeout_s=120)
    assert max(plain["grad_err"], sp["grad_err"], hybrid["grad_err"]) < 1e-4
    assert len(plain["losses"]) == 10


def test_qkvu_shard_holds_whole_heads_of_each_block():
    """The local qkvu rows of tp rank r are [Q_r|K_r|V_r|U_r], never a contiguous half (Q and K)."""
    (r0, r1) = run_distributed(_qkvu_rows, world_size=2, timeout_s=60)
    hidden = 32
    for r, rows in enumerate((r0, r1)):
        expect = [blk * hidden + r * hidden // 2 + i for blk in range(4) for i in range(hidden // 2)]
        assert rows == expect


def _qkvu_rows(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from model import build_model
    from parallel.tensor_parallel import apply_tp

    cfg = tiny_config({}).model
    model = build_model(cfg)
    mixer = model.layers["0"].token_mixer
    with torch.no_grad():  # tag each row with its index
        mixer.qkvu_proj.weight.copy_(torch.arange(4 * cfg.dim, dtype=torch.float32)[:, None].expand(-1, cfg.dim))
    apply_tp(model, init_device_mesh("cpu", (world,)))
    assert mixer.slope.shape == (cfg.heads // world,)
    assert mixer.lrpe.theta.to_local().shape == (cfg.heads // world, 1, cfg.dim // cfg.heads)
    return mixer.qkvu_proj.weight.to_local()[:, 0].long().tolist()


def test_layout_that_does_not_divide_is_refused_with_numbers():
    cfg = tiny_config({"tp": 8})  # heads 4
    with pytest.raises(LayoutError, match=r"model.heads \(4\) not divisible by parallel.tp \(8\)"):
        check_layout(cfg.parallel, 8, cfg.model)
    with pytest.raises(ValueError, match=r"model.glu_dim \(64\) not divisible by parallel.tp \(3\)"):
        check_tp(type("M", (), {"cfg": tiny_config({}).model.__class__(heads=3, dim=33, glu_dim=64, vocab_size=66)})(), 3)
    with pytest.raises(LayoutError, match=r"dp\*pp\*cp\*tp = 2\*1\*1\*2 = 4 but the world size is 2"):
        cfg = tiny_config({"tp": 2, "dp": 2})
        check_layout(cfg.parallel, 2, cfg.model)
