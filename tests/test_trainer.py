"""Single-process training end to end: loss falls, logs are written, resume reproduces the run exactly."""
import json
import random

import pytest

from data_pipeline import stdlib_files
from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~400 real documents of spread-out lengths (slices of stdlib sources) as a local jsonl source."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    files = stdlib_files()[:400]
    with open(root / "docs.jsonl", "w") as f:
        for path in files:
            text = path.read_text(errors="replace")
            f.write(json.dumps({"text": text[: rng.choice([300, 1000, 3000, 8000])]}) + "\n")
    return root


def make_cfg(corpus, out, *extra):
    return load_config(None, [
        f"--data.source={corpus / 'docs.jsonl'}", f"--data.prepared_dir={corpus / 'prepared'}",
        "--data.min_log2=5", "--data.max_log2=7", "--data.tokens_per_step=1024", "--data.cycles=2",
        "--model.vocab_size=512", "--model.dim=32", "--model.layers=2", "--model.heads=2", "--model.glu_dim=64",
        "--model.attn_backend=chunked", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.device=cpu",
        f"--train.out_dir={out}", "--log.every=1", "--checkpoint.keep_last=5", *extra,
    ])


def test_train_logs_and_loss_falls(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path / "run", "--train.steps=30", "--checkpoint.every=10", "--log.every=5")
    losses = Trainer(cfg).train()
    assert losses[0] > 5.5  # about ln(512) = 6.24 at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for key in ("step", "loss", "lr", "grad_norm", "seq_len", "tokens", "tokens_per_s"):
        assert key in records[-1]
    assert records[-1]["tokens"] == 30 * 1024
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000010", "step_00000020", "step_00000030"]


def test_resume_reproduces_uninterrupted_run(corpus, tmp_path):
    straight = Trainer(make_cfg(corpus, tmp_path / "a", "--train.steps=8")).train()
    Trainer(make_cfg(corpus, tmp_path / "b", "--train.steps=8")).train(stop_after=4)  # as if stopped at step 4
    resumed = Trainer(make_cfg(corpus, tmp_path / "b", "--train.steps=8"))
    rest = resumed.train()
    assert resumed.step == 8
    assert rest == straight[4:]  # bitwise: same batches, same RNG, same optimizer state


def test_grad_accumulation_does_not_change_the_step(corpus, tmp_path):
    one = Trainer(make_cfg(corpus, tmp_path / "a", "--train.steps=3")).train()
    four = Trainer(make_cfg(corpus, tmp_path / "b", "--train.steps=3", "--train.grad_accum=4")).train()
    assert four == pytest.approx(one, rel=1e-5)


def test_corrupt_checkpoint_is_refused(corpus, tmp_path):
    Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=2")).train()
    ckpt = checkpoint.list_complete(tmp_path / "run")[-1]
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt: __0_0.distcp"):
        checkpoint.verify(ckpt)


def test_wrong_shape_checkpoint_is_refused(corpus, tmp_path):
    Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=1")).train()
    other = Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=2", "--model.glu_dim=48"))
    with pytest.raises(ValueError, match="channel_mixer.l1.weight"):
        other.train()


def test_resume_with_a_new_lr_applies_it_and_says_so(corpus, tmp_path, capsys):
    from pretrain.optim import lr_factor

    Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=6")).train(stop_after=3)
    resumed = Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=6", "--train.lr=2e-3"))
    resumed.maybe_resume()
    assert resumed.step == 3
    assert "config changed on resume, applied from this step: train.lr 0.01 -> 0.002" in capsys.readouterr().out
    expected = 2e-3 * lr_factor(3, 2, 6, resumed.cfg.train.min_lr_ratio)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([expected] * 2)
    resumed.train()
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["train"]["lr"] == 2e-3  # the config on record is the one in effect
    meta = json.loads((checkpoint.list_complete(tmp_path / "run")[-1] / "meta.json").read_text())
    assert meta["config"]["train"]["lr"] == 2e-3


def test_skipped_updates_are_capped(corpus, tmp_path, monkeypatch):
    from pretrain import faults

    monkeypatch.setenv("LIGHTSPAN_FAULT_NAN_AT_STEP", "2")
    cfg = make_cfg(corpus, tmp_path / "run", "--train.steps=4", "--train.on_nan=skip", "--train.max_skipped_steps=0")
    with pytest.raises(FloatingPointError, match="more than train.max_skipped_steps=0"):
        Trainer(cfg, callbacks=faults.from_environment()).train()


def test_a_multi_rank_layout_without_torchrun_is_refused(corpus, tmp_path, monkeypatch):
    from parallel.mesh import LayoutError

    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LayoutError, match=r"needs 2 processes.*torchrun --nproc_per_node=2"):
        Trainer(make_cfg(corpus, tmp_path / "run", "--parallel.tp=2"))


def test_a_finished_run_says_so_and_trains_nothing(corpus, tmp_path, capsys):
    Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=2")).train()
    before = sorted(p.name for p in checkpoint.list_complete(tmp_path / "run"))
    assert Trainer(make_cfg(corpus, tmp_path / "run", "--train.steps=2")).train() == []
    assert "the run is already complete at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoint.list_complete(tmp_path / "run")) == before


def test_validation_loss_on_the_held_out_split_and_profiler_traces(corpus, tmp_path):
    """log.val_every scores held-out documents (prepared with data.holdout_docs) with the training model: the value
    equals the model's own mean cross-entropy on those sequences; profile.steps writes a trace of the step."""
    import torch.nn.functional as F

    from data_pipeline import TokenStore

    prepared = tmp_path / "prepared-holdout"
    cfg = make_cfg(corpus, tmp_path / "run", "--train.steps=4", "--log.val_every=2", "--log.val_tokens=512",
                   f"--data.prepared_dir={prepared}", "--data.holdout_docs=20", "--profile.steps=[3]")
    trainer = Trainer(cfg)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and val[0]["val_tokens"] == 512
    store = TokenStore(prepared)
    import numpy as np
    import torch

    stream = np.concatenate([store.read(int(s), int(n)) for s, n in store.heldout])[:513].astype(np.int64)
    xy = torch.from_numpy(stream)
    ids, labels = xy[:-1].view(4, 128), xy[1:].view(4, 128)
    with torch.no_grad():
        expected = F.cross_entropy(trainer.model(ids).flatten(0, 1), labels.flatten())
    assert val[-1]["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    trace = tmp_path / "run" / "profile" / "rank0_step3.json"
    assert trace.is_file() and json.loads(trace.read_text())["traceEvents"]
