"""Data parallelism (FSDP2; DeepSpeed ZeRO-1/2/3) against the unsharded model, with gradient accumulation."""
import importlib.util

import pytest

from parallel.harness import run_distributed
from parallel_parity import parity_worker

pytestmark = pytest.mark.distributed


def _fsdp_worker(rank, world):
    return parity_worker(rank, world, {"dp": 2}, steps=10, grad_accum=2)


def test_fsdp2_dp2_matches_unsharded():
    results = run_distributed(_fsdp_worker, world_size=2, timeout_s=120)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)


def _deepspeed_worker(rank, world, stage):
    return parity_worker(rank, world, {"dp": 2, "dp_engine": "deepspeed", "zero_stage": stage}, steps=10,
                         grad_accum=2)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_dp2_matches_unsharded(stage):
    results = run_distributed(_deepspeed_worker, world_size=2, args=(stage,), timeout_s=180)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], abs=1e-6)


def _deepspeed_trainer_worker(rank, world, corpus, out):
    from parallel_parity import trainer_args

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    def cfg(*extra):
        return load_config(None, [*trainer_args(corpus, out), "--parallel.dp=2", "--parallel.dp_engine=deepspeed",
                                  "--parallel.zero_stage=2", *extra])

    first = Trainer(cfg()).train(stop_after=2)
    rest = Trainer(cfg()).train()  # resumes the step-2 checkpoint: weights exact, AdamW moments restarted
    return {"first": first, "rest": rest}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_trainer_saves_weights_any_layout_resumes(corpus, tmp_path, capsys):
    """dp_engine=deepspeed writes the same DCP checkpoint (gathered weights, no optimizer state): a DeepSpeed run
    resumes from it (weights exact, moments restarted, said so), and so does a single FSDP2-path process."""
    from parallel_parity import trainer_args

    from pretrain import checkpoint
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    runs = run_distributed(_deepspeed_trainer_worker, world_size=2, args=(corpus, tmp_path / "ds"), timeout_s=300)
    assert len(runs[0]["first"]) == 2 and len(runs[0]["rest"]) == 2
    assert runs[0]["rest"] == runs[1]["rest"]
    saved = checkpoint.tensor_metadata(checkpoint.list_complete(tmp_path / "ds")[-1])
    assert any(k.startswith("model.") for k in saved) and not any(k.startswith("optim.") for k in saved)
    single = Trainer(load_config(None, [*trainer_args(corpus, tmp_path / "ds"), "--train.steps=5"]))
    single.maybe_resume()
    assert single.step == 4
    assert "resumed without optimizer state" in capsys.readouterr().out
