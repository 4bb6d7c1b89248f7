"""pretrain.metrics: the operator's line and metrics.jsonl carry device memory; the optional wandb logger
(a stand-in module here: wandb is not a dependency) gets every numeric field, offline without an API key."""
import json
import sys
import types

import pytest
import torch

from pretrain.config import load_config
from pretrain.metrics import MetricsLogger, format_duration, format_line, memory_stats

REC = {"step": 10, "loss": 4.3, "loss_last": 4.2, "grad_norm": 0.4, "lr": 3e-4, "seq_len": 512, "tokens": 40960,
       "ms_per_step": 612.3, "eta_s": 3725.0, "tokens_per_s": 6690.2, "tokens_per_s_per_device": 3345.1,
       "flops_per_s": 5e10, "world_size": 2, "memory_bytes": 2**30, "data_wait": 0.004, "skipped_steps": 0}


def test_line_and_jsonl_carry_memory_eta_and_per_device_rate(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, tensorboard=False, peak_flops=1e12, device="cpu")
    logger.log(dict(REC), 200)
    logger.close()
    line = capsys.readouterr().out.strip()
    assert "612 ms/step" in line and "ETA 1h02m" in line and "(3,345/dev)" in line and "MFU 2.5%" in line  # job FLOP/s / (2 devices x peak)
    assert "rss " in line and "GiB peak " in line
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["rss_bytes"] > 0 and rec["rss_peak_bytes"] >= rec["rss_bytes"] // 2 and rec["mfu"] == 0.025


def test_gpu_memory_fields_format():
    rec = dict(REC, tflops=0.05, mfu=None, mem_allocated_bytes=3 * 2**30, mem_reserved_bytes=4 * 2**30,
               mem_peak_bytes=int(3.5 * 2**30))
    assert "mem alloc 3.00 / res 4.00 / peak 3.50 GiB" in format_line(rec, 100)
    if torch.cuda.is_available():
        stats = memory_stats(torch.device("cuda"))
        assert set(stats) == {"mem_allocated_bytes", "mem_reserved_bytes", "mem_peak_bytes"}


def test_durations():
    assert [format_duration(s) for s in (0, 59.4, 61, 3725, 90000, float("inf"))] == \
        ["0s", "59s", "1m01s", "1h02m", "1d01h", "n/a"]


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return runs


def test_wandb_logs_every_numeric_field_offline(tmp_path, fake_wandb, capsys):
    cfg = load_config(None, [f"--train.out_dir={tmp_path}"])
    cfg.log.wandb = True  # the switch the config schema needs (log.wandb); read with getattr until it exists
    logger = MetricsLogger.for_run(cfg, tmp_path, device="cpu", peak_flops=None)
    logger.log(dict(REC), 200)
    logger.close()
    (run,) = fake_wandb
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path)
    assert run.init["config"]["train"]["out_dir"] == str(tmp_path)
    step, data = run.logged[0]
    assert step == 10 and data["train/loss"] == 4.3 and "train/rss_bytes" in data and "train/mfu" not in data
    assert run.finished


def test_wandb_off_by_default_and_missing_wandb_is_a_note(tmp_path, monkeypatch, capsys):
    cfg = load_config(None, [])
    assert not getattr(cfg.log, "wandb", False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True)
    assert logger.wandb is None and "wandb is not installed" in capsys.readouterr().out
    logger.log(dict(REC), 200)
    logger.close()
