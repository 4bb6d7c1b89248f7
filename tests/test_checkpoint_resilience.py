"""Checkpoints that survive crashes: SIGKILL after a save and during one, corrupt files, NaN steps, elastic
restarts. Runs are real subprocesses (`python -m pretrain`, torchrun) on a tiny model.

"Every step's batch seen exactly once" is checked on metrics.jsonl: a run killed after its step-k checkpoint
may have logged steps past k before dying; the resumed run logs them again. After keeping the last record of
each step, the steps are 1..N consecutive and every loss equals the uninterrupted run's (bitwise on CPU), so the
replayed steps trained on the same batches from the same state, and no batch was skipped or repeated.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline import stdlib_files
    from pretrain.config import load_config
    from pretrain.data import ensure_prepared

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for path in stdlib_files()[:200]:
            f.write(json.dumps({"text": path.read_text(errors="replace")[: rng.choice([300, 1000, 3000])]}) + "\n")
    ensure_prepared(load_config(None, _args(root, root / "unused")))
    return root


def _args(corpus, out, *extra):
    return [f"--data.source={corpus / 'docs.jsonl'}", f"--data.prepared_dir={corpus / 'prepared'}",
            "--data.min_log2=5", "--data.max_log2=7", "--data.tokens_per_step=512", "--data.cycles=2",
            "--model.vocab_size=512", "--model.dim=32", "--model.layers=2", "--model.heads=2", "--model.glu_dim=64",
            "--model.attn_backend=chunked", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.device=cpu",
            "--train.threads=1", f"--train.out_dir={out}", "--log.every=1", "--log.tensorboard=false", *extra]


def _cmd(nproc, *args, torchrun=()):
    if nproc == 1 and not torchrun:
        return [sys.executable, "-m", "pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", *(torchrun or ("--standalone",)), "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "pretrain", *args]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{k: str(v) for k, v in extra.items()})


def _run(cmd, timeout=120, **env):
    out = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _start(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: SIGKILL reaches torchrun's workers


def _kill_when(proc, path: Path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses_by_step(run: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps past its checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _replays_match(run: Path) -> None:
    seen = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert seen.setdefault(rec["step"], rec["loss"]) == rec["loss"], f"step {rec['step']} replayed differently"


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [(1, ()), (2, ("--parallel.dp=2",)), (2, ("--parallel.tp=2",))],
                         ids=["single", "dp2", "tp2"])
def test_sigkill_after_checkpoint_resumes_bitwise(corpus, tmp_path, nproc, layout):
    args = ("--train.steps=20", "--checkpoint.every=10", *layout)
    _run(_cmd(nproc, *_args(corpus, tmp_path / "straight", *args)))
    run = tmp_path / "killed"
    proc = _start(_cmd(nproc, *_args(corpus, run, *args)), LIGHTSPAN_FAULT_PAUSE_AFTER_SAVE=60)
    _kill_when(proc, run / "checkpoints" / "step_00000010" / "meta.json")
    _run(_cmd(nproc, *_args(corpus, run, *args)))
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(run)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == straight  # bitwise
    _replays_match(run)


def test_sigkill_during_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    _run(_cmd(1, *_args(corpus, run, "--train.steps=2")))
    proc = _start(_cmd(1, *_args(corpus, run, "--train.steps=4", "--checkpoint.every=2")),
                  LIGHTSPAN_FAULT_PAUSE_BEFORE_RENAME=60)
    deadline = time.time() + 60
    while not list((run / "checkpoints").glob(".tmp-step_00000004*/.metadata")):  # step 4 written, not renamed
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002"]  # the partial one is ignored
    checkpoint.verify(run / "checkpoints" / "step_00000002")
    out = _run(_cmd(1, *_args(corpus, run, "--train.steps=4", "--checkpoint.every=2")))
    assert "at step 2" in out.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next run cleaned it up
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002", "step_00000004"]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config(None, _args(corpus, run, "--train.steps=4", "--checkpoint.every=2"))).train()
    state = run / "checkpoints" / "step_00000004" / "__0_0.distcp"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    trainer = Trainer(load_config(None, _args(corpus, run, "--train.steps=4")))
    with pytest.warns(UserWarning, match="step_00000004 is corrupt: __0_0.distcp"):
        trainer.maybe_resume()
    assert trainer.step == 2


def test_on_nan_stop_raises_without_saving_and_skip_drops_the_update(corpus, tmp_path, monkeypatch):
    import math

    from pretrain import faults
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    monkeypatch.setenv("LIGHTSPAN_FAULT_NAN_AT_STEP", "3")
    stop = tmp_path / "stop"
    with pytest.raises(FloatingPointError, match="at step 3"):
        Trainer(load_config(None, _args(corpus, stop, "--train.steps=6", "--checkpoint.every=1")),
                callbacks=faults.from_environment()).train()
    assert [p.name for p in checkpoint.list_complete(stop)] == ["step_00000001", "step_00000002"]
    skip = tmp_path / "skip"
    trainer = Trainer(load_config(None, _args(corpus, skip, "--train.steps=6", "--train.on_nan=skip")),
                      callbacks=faults.from_environment())
    losses = trainer.train()
    assert math.isnan(losses[2]) and all(math.isfinite(x) for x in losses[:2] + losses[3:])
    assert all(bool(p.isfinite().all()) for p in trainer.model.parameters())
    records = [json.loads(x) for x in (skip / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
