"""Any layout resumes any checkpoint, data included: a run killed after its step-10 checkpoint continues on
another (dp, cp, tp) layout and reproduces the uninterrupted single-process run.

Checked two ways: every step's loss equals the straight run's (1e-5 relative, fp32), and from the data itself:
each rank records per step (log.batches) the global start of every row it read, the column offset of its cp
chunk and the sha256 of the token ids; every record is checked against the prepared token shards, and each
step's set of sequences equals the straight run's (no batch seen twice, skipped or cut differently).
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint_resilience import _args, _cmd, _kill_when, _run, _start, corpus  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ARGS = ("--train.steps=20", "--checkpoint.every=10", "--log.batches=true")


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss_last"]
    return out


def sequences(run: Path, corpus: Path) -> dict[int, list[int]]:
    """step -> sorted global starts of the step's sequences, after checking every recorded chunk against the
    token shards (the last record of a step wins: a killed run may have read past its checkpoint)."""
    from data_pipeline import TokenStore

    store = TokenStore(corpus / "prepared")
    per_step: dict[int, dict[tuple, dict]] = {}
    for path in sorted((run / "batches").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            chunks = per_step.setdefault(rec["step"], {})
            key = (rec["dp"], rec["cp"], rec["tp"], rec["pp"])
            chunks[key] = rec
    out = {}
    for step, recs in per_step.items():
        starts = {}
        for rec in recs.values():
            for row in rec["rows"]:
                n = None
                for length in (16, 32, 64, 128):  # chunk lengths of this config (2^5..2^7, halved under cp)
                    ids = store.read(row["start"] + rec["position_offset"], length).astype(np.int64)
                    if hashlib.sha256(ids.tobytes()).hexdigest() == row["sha256"]:
                        n = length
                        break
                assert n is not None, f"step {step}: a recorded chunk of row {row['start']} is not the corpus' tokens"
                starts.setdefault(row["start"], set()).add(rec["position_offset"])
        out[step] = sorted(starts)
    return out


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("straight") / "run"
    _run(_cmd(1, *_args(corpus, run, *ARGS)))
    return run


def _killed_then_resumed(corpus, run, before: tuple, nproc_before: int, after: tuple, nproc_after: int):  # noqa: F811
    proc = _start(_cmd(nproc_before, *_args(corpus, run, *ARGS, *before)), LIGHTSPAN_FAULT_PAUSE_AFTER_SAVE=60)
    _kill_when(proc, run / "checkpoints" / "step_00000010" / "meta.json", timeout=240)
    out = _run(_cmd(nproc_after, *_args(corpus, run, *ARGS, *after)), timeout=300)
    assert "resumed from" in out.stdout and "at step 10" in out.stdout


@pytest.mark.parametrize("before,nb,after,na", [
    ((), 1, ("--parallel.dp=2",), 2),
    ((), 1, ("--parallel.cp=2",), 2),
    (("--parallel.dp=2",), 2, ("--parallel.tp=2", "--parallel.dp=2"), 4),
    ((), 1, ("--parallel.pp=2",), 2),
], ids=["dp1-to-dp2", "dp1-to-cp2", "dp2-to-tp2xdp2", "dp1-to-pp2"])
def test_resume_on_another_layout_continues_the_same_run(corpus, straight, tmp_path, before, nb, after, na):  # noqa: F811
    run = tmp_path / "run"
    _killed_then_resumed(corpus, run, before, nb, after, na)
    ref, got = losses(straight), losses(run)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}"
    assert sequences(run, corpus) == sequences(straight, corpus)
