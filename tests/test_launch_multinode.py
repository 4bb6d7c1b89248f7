"""The multi-node path on one machine: two torchrun agents (--nnodes=2, c10d rendezvous on localhost) train
and log the same losses as one agent with two local workers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.harness import free_port
from parallel_parity import trainer_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def train_args(corpus, out):
    return [*trainer_args(corpus, out), "--parallel.dp=2"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_agents_on_localhost_match_one_agent(corpus, tmp_path):
    from pretrain.config import load_config
    from pretrain.data import ensure_prepared

    ensure_prepared(load_config(None, train_args(corpus, tmp_path / "x")))  # tokenize once, before both jobs
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run([*run, "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "pretrain",
                          *train_args(corpus, tmp_path / "one")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    port = free_port()
    agent = [*run, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=lightspan-two-node", "-m", "pretrain", *train_args(corpus, tmp_path / "two")]
    agents = [subprocess.Popen(agent, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out[-3000:]
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    assert len(losses(tmp_path / "two")) == 4


def test_elastic_restart_resumes_and_sees_every_batch_once(corpus, tmp_path):
    """Rank 1 dies before step 6 on the first attempt; torchrun (--max-restarts=1) restarts both workers, which
    resume from the step-4 checkpoint. metrics.jsonl then holds step 5 twice (the uncheckpointed first try is
    replayed); keeping the last record of each step must give exactly steps 1..8 with the uninterrupted losses,
    and the token count of exactly 8 steps: no batch skipped, none trained twice."""
    from pretrain.config import load_config
    from pretrain.data import ensure_prepared

    args = lambda out: [*train_args(corpus, out), "--train.steps=8", "--checkpoint.every=2"]  # noqa: E731
    ensure_prepared(load_config(None, args(tmp_path / "x")))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "pretrain"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run([*run, *args(tmp_path / "straight")], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = subprocess.run([*run, *args(tmp_path / "elastic")], env=dict(env, LIGHTSPAN_FAULT_CRASH_AT_STEP="6"),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "crashes before step 6" in crashed.stdout and "resumed from" in crashed.stdout

    records = [json.loads(x) for x in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    last = {r["step"]: r for r in records}
    assert sorted(last) == list(range(1, 9))
    assert [last[s]["loss"] for s in range(1, 9)] == losses(tmp_path / "straight")
    assert last[8]["tokens"] == 8 * 512
