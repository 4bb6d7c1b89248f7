"""Composed layouts. 2x2 meshes (4 gloo ranks): tp x dp (FSDP2 over tensor-parallel DTensors), tp x cp
(LASP-2 inside tensor-parallel heads), cp x dp (LASP-2 under FSDP2 over the flattened dp x cp group),
pp x tp and pp x dp; the 1024-rank dry-run mesh; the trainer's torchrun path against the single-process trainer."""
import pytest

from parallel.harness import run_distributed
from parallel_parity import SHAREDLLM, parity_worker, trainer_args

pytestmark = pytest.mark.distributed


def _worker(rank, world, parallel, grad_accum):
    return parity_worker(rank, world, parallel, steps=10, grad_accum=grad_accum)


@pytest.mark.parametrize("parallel,grad_accum", [
    ({"dp": 2, "tp": 2}, 2),
    ({"cp": 2, "tp": 2}, 1),
    ({"dp": 2, "cp": 2}, 1),
], ids=["tp2xdp2", "tp2xcp2", "cp2xdp2"])
def test_2x2_mesh_matches_unsharded(parallel, grad_accum):
    results = run_distributed(_worker, world_size=4, args=(parallel, grad_accum), timeout_s=180)
    for r in results[1:]:
        assert r["losses"] == pytest.approx(results[0]["losses"], abs=1e-6)


def _hybrid_worker(rank, world, parallel):
    return parity_worker(rank, world, parallel, steps=3, model_kw={"attention_pattern": "LS"})


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_hybrid_cp2_through_parallelize_matches_unsharded(impl):
    """parallelize() installs LASP on lightning layers and distributed MHA on softmax layers in one model."""
    results = run_distributed(_hybrid_worker, world_size=2, args=({"cp": 2, "attn_cp_impl": impl},), timeout_s=180)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)


def _model_worker(rank, world, parallel, model_kw):
    return parity_worker(rank, world, parallel, steps=3, model_kw=model_kw)


HYBRID = {"attention_pattern": "LS"}
LLAMA = {"arch": "llama"}
PP2 = {"pp": 2, "microbatches": 2}
CROSS_ONLY = {**SHAREDLLM, "sharedllm_trainable": "cross"}  # frozen decoder: stage 1 has nothing to train


@pytest.mark.parametrize("parallel,model_kw", [
    ({"tp": 2}, HYBRID), (PP2, HYBRID),  # hybrid cp=2: test_hybrid_cp2_through_parallelize_matches_unsharded
    ({"tp": 2}, SHAREDLLM), ({"cp": 2}, SHAREDLLM), (PP2, SHAREDLLM), ({"tp": 2}, CROSS_ONLY), (PP2, CROSS_ONLY),
], ids=["hybrid-tp2", "hybrid-pp2", "sharedllm-tp2", "sharedllm-cp2", "sharedllm-pp2", "sharedllm-cross-only-tp2",
        "sharedllm-cross-only-pp2"])
def test_hybrid_and_sharedllm_match_unsharded(parallel, model_kw):
    """Hybrid TNL and SharedLLM-TNL through parallelize + TrainStep: logits, loss, every gradient, 3 steps.
    SharedLLM: cross-attention by heads under tp; chunks spread over cp with ring cross-attention (inside
    FSDP2 over cp); its compressor on pipeline stage 0."""
    results = run_distributed(_model_worker, world_size=2, args=(parallel, model_kw), timeout_s=180)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)


@pytest.mark.parametrize("parallel", [
    {"pp": 2, "tp": 2, "microbatches": 2},
    {"pp": 2, "dp": 2, "microbatches": 2},
], ids=["pp2xtp2", "pp2xdp2"])
def test_pipeline_2x2_matches_unsharded(parallel):
    """Pipeline stages (parallel.pipeline) composed with tp / FSDP2: loss, every stage's full gradients, steps."""
    results = run_distributed(_worker, world_size=4, args=(parallel, 1), timeout_s=180)
    for r in results[1:]:
        assert r["losses"] == pytest.approx(results[0]["losses"], abs=1e-6)


def test_dry_run_builds_the_1024_rank_mesh_on_the_fake_backend():
    """`--dry-run` checks the 175B layout (dp8 pp8 cp2 tp8) and builds its mesh without any peer process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tnl-175b.yaml", "--dry-run",
                          "--parallel.dp=8", "--parallel.pp=8", "--parallel.cp=2", "--parallel.tp=8"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world_size=1024" in out.stdout
    assert "mesh: ('dp', 'pp', 'cp', 'tp') shape (8, 8, 2, 8)" in out.stdout
    assert "tp: size 8, rank 0's group [0, 1, 2, 3, 4, 5, 6, 7]" in out.stdout
    assert "cp: size 2, rank 0's group [0, 8]" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/tnl-175b.yaml", "--dry-run",
                          "--parallel.dp=8", "--parallel.pp=8", "--parallel.cp=2", "--parallel.tp=8",
                          "--model.vocab_size=64001"], capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "model.vocab_size (64001) not divisible by parallel.tp (8)" in bad.stderr


# -- the trainer's distributed path (what `torchrun -m pretrain` runs), against the single-process trainer ----


def _trainer_cfg(corpus, out, *extra):
    from pretrain.config import load_config

    return load_config(None, [*trainer_args(corpus, out), *extra])


def _trainer_worker(rank, world, corpus, out):
    from pretrain.trainer import Trainer

    import torch

    runs = {}
    for layout in ("tp", "dp", "cp"):
        trainer = Trainer(_trainer_cfg(corpus, out / layout, f"--parallel.{layout}=2"))
        runs[layout] = trainer.train()
        if layout == "tp":  # the trained tp=2 model's logits, for the cross-layout load in the caller
            with torch.no_grad():
                logits = trainer.model(torch.arange(48).reshape(2, 24) % 500)
            runs["tp_logits"] = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    # interrupted after 2 steps and resumed (the data-loader state is per layout; the weights are not)
    Trainer(_trainer_cfg(corpus, out / "resume", "--parallel.tp=2")).train(stop_after=2)
    runs["resumed"] = Trainer(_trainer_cfg(corpus, out / "resume", "--parallel.tp=2")).train()
    # the same with asynchronous checkpoint writes (dcp.async_save), at dp=2
    Trainer(_trainer_cfg(corpus, out / "async", "--parallel.dp=2", "--checkpoint.async_save=true")).train(stop_after=2)
    runs["async_resumed"] = Trainer(_trainer_cfg(corpus, out / "async", "--parallel.dp=2",
                                                 "--checkpoint.async_save=true")).train()
    return runs


def test_trainer_tp_dp_cp_and_resume_match_single_process(corpus, tmp_path):
    from pretrain.trainer import Trainer

    single = Trainer(_trainer_cfg(corpus, tmp_path / "single")).train()  # also prepares the data, once
    runs = run_distributed(_trainer_worker, world_size=2, args=(corpus, tmp_path), timeout_s=180)
    for layout in ("tp", "dp", "cp"):
        assert runs[0][layout] == pytest.approx(single, abs=1e-4), layout
        assert runs[1][layout] == pytest.approx(single, abs=1e-4), layout
    assert runs[0]["resumed"] == pytest.approx(single[2:], abs=1e-4)
    assert runs[0]["async_resumed"] == pytest.approx(single[2:], abs=1e-4)
    assert (tmp_path / "tp" / "metrics.jsonl").is_file()
    # checkpoints keep the unsharded names: a tp=2 (sharded DCP) one loads into a plain model in one process
    import torch

    from model import build_model
    from pretrain.convert import load_model_weights

    cfg = _trainer_cfg(corpus, tmp_path / "single")
    final = {}
    for run in ("single", "tp"):
        model = build_model(cfg.model)
        model.load_state_dict(load_model_weights(tmp_path / run)[1])
        final[run] = model.state_dict()
    for name, value in final["single"].items():
        torch.testing.assert_close(final["tp"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # cross-layout: the tp=2 checkpoint in one plain process gives the tp=2 model's logits
    plain = build_model(cfg.model)
    plain.load_state_dict(final["tp"])
    with torch.no_grad():
        logits = plain(torch.arange(48).reshape(2, 24) % 500)
    torch.testing.assert_close(logits, runs[0]["tp_logits"], rtol=1e-5, atol=1e-5)


def _trainer_pp_worker(rank, world, corpus, out):
    from pretrain.trainer import Trainer

    straight = Trainer(_trainer_cfg(corpus, out / "pp", "--parallel.pp=2", "--parallel.microbatches=2")).train()
    Trainer(_trainer_cfg(corpus, out / "pp-resume", "--parallel.pp=2", "--parallel.microbatches=2")).train(stop_after=2)
    resumed = Trainer(_trainer_cfg(corpus, out / "pp-resume", "--parallel.pp=2", "--parallel.microbatches=2")).train()
    return {"straight": straight, "resumed": resumed}


def test_trainer_pp2_and_resume_match_single_process(corpus, tmp_path):
    """`torchrun -m pretrain --parallel.pp=2`: 1F1B stages in the trainer, sharded checkpoints with global names."""
    from pretrain.convert import load_model_weights
    from pretrain.trainer import Trainer

    single = Trainer(_trainer_cfg(corpus, tmp_path / "single")).train()
    runs = run_distributed(_trainer_pp_worker, world_size=2, args=(corpus, tmp_path), timeout_s=180)
    for r in runs:
        assert r["straight"] == pytest.approx(single, abs=1e-4)
        assert r["resumed"] == pytest.approx(single[2:], abs=1e-4)
    import torch

    from model import build_model

    cfg = _trainer_cfg(corpus, tmp_path / "single")
    merged = build_model(cfg.model)  # both stages' shards merge into one plain model
    merged.load_state_dict(load_model_weights(tmp_path / "pp")[1])
    reference = build_model(cfg.model)
    reference.load_state_dict(load_model_weights(tmp_path / "single")[1])
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _trainer_interleaved_worker(rank, world, corpus, out):
    from pretrain.trainer import Trainer

    args = ("--model.layers=4", "--parallel.pp=2", "--parallel.pp_schedule=interleaved", "--parallel.microbatches=2")
    straight = Trainer(_trainer_cfg(corpus, out / "il", *args)).train()
    Trainer(_trainer_cfg(corpus, out / "il-resume", *args)).train(stop_after=2)
    resumed = Trainer(_trainer_cfg(corpus, out / "il-resume", *args)).train()
    return {"straight": straight, "resumed": resumed}


def test_trainer_interleaved_pp2_and_resume_match_single_process(corpus, tmp_path):
    """Interleaved 1F1B in the trainer: 4 stages over 2 ranks (rank r holds stages r and r+2); the optimizer
    and the sharded checkpoint see one view of the rank's layers under their global names."""
    from pretrain.convert import load_model_weights
    from pretrain.trainer import Trainer

    single = Trainer(_trainer_cfg(corpus, tmp_path / "single", "--model.layers=4")).train()
    runs = run_distributed(_trainer_interleaved_worker, world_size=2, args=(corpus, tmp_path), timeout_s=180)
    for r in runs:
        assert r["straight"] == pytest.approx(single, abs=1e-4)
        assert r["resumed"] == pytest.approx(single[2:], abs=1e-4)
    import torch

    from model import build_model

    cfg = _trainer_cfg(corpus, tmp_path / "single", "--model.layers=4")
    merged, reference = build_model(cfg.model), build_model(cfg.model)
    merged.load_state_dict(load_model_weights(tmp_path / "il")[1])
    reference.load_state_dict(load_model_weights(tmp_path / "single")[1])
    # every tensor of both ranks' stages is in the checkpoint under its global name; 4 Adam steps amplify the
    # fp32 summation-order noise of 2 micro-batches x 4 stages (measured up to 1.4e-5) past the 1F1B test's 1e-5
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=1e-4, atol=5e-5, msg=name)


def test_world_of_one_matches_the_plain_loop():
    """The single-process trainer path is the same TrainStep on a (1, 1, 1, 1) mesh over a group of one."""
    run_distributed(_worker, world_size=1, args=({}, 2), timeout_s=180)
    run_distributed(_model_worker, world_size=1, args=({}, SHAREDLLM), timeout_s=180)
    run_distributed(_model_worker, world_size=1, args=({}, LLAMA), timeout_s=180)


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_llama_cp2_matches_unsharded(impl):
    """The softmax baseline under cp: its SoftmaxMixer gets ring/Ulysses attention like every S layer
    (logits and loss 1e-5, every gradient 1e-4, 3 steps)."""
    results = run_distributed(_model_worker, world_size=2, args=({"cp": 2, "attn_cp_impl": impl}, LLAMA),
                              timeout_s=180)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)
