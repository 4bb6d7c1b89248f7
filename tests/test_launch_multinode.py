"""The multi-node path on one machine: two torchrun agents (--nnodes=2, c10d rendezvous on localhost) train
and log the same losses as one agent with two local workers."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.harness import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline import stdlib_files

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for path in stdlib_files()[:200]:
            f.write(json.dumps({"text": path.read_text(errors="replace")[: rng.choice([300, 1000, 3000])]}) + "\n")
    return root


def train_args(corpus, out):
    return [
        f"--data.source={corpus / 'docs.jsonl'}", f"--data.prepared_dir={corpus / 'prepared'}",
        "--data.min_log2=5", "--data.max_log2=7", "--data.tokens_per_step=512", "--data.cycles=2",
        "--model.vocab_size=512", "--model.dim=32", "--model.layers=2", "--model.heads=2", "--model.glu_dim=64",
        "--model.attn_backend=chunked", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.device=cpu",
        "--train.steps=4", f"--train.out_dir={out}", "--log.every=1", "--log.tensorboard=false",
        "--parallel.dp=2",
    ]


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
