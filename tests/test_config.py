"""The config schema: YAML + dotted overrides, clear errors, --dry-run."""
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_yaml_and_overrides():
    cfg = load_config(TINY, ["--train.lr=1e-4", "--model.layers", "2", "--model.lrpe_layers=[0,1]",
                             "--log.tensorboard=false"])
    assert cfg.train.lr == 1e-4 and cfg.model.layers == 2 and cfg.model.lrpe_layers == [0, 1]
    assert cfg.log.tensorboard is False
    assert cfg.model.dim == 128  # from the YAML


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, words", [
    (["--train.lrr=1"], ["unknown config key 'train.lrr'", "'lr'"]),
    (["--nosection=1"], ["name the section"]),
    (["--train.steps=ten"], ["train.steps", "expected int", "'ten'"]),
    (["--model.heads=5"], ["model.heads (5)", "model.dim (128)"]),
    (["--data.curriculum=fast"], ["data.curriculum", "grow_p2", "'fast'"]),
    (["--parallel.tp=8"], ["model.heads (4) not divisible by parallel.tp (8)"]),
    (["--data.tokens_per_step=1000"], ["data.tokens_per_step (1000)", "512"]),
    (["--train.lr"], ["has no value"]),
    (["--parallel.pp=4", "--parallel.pp_schedule=interleaved"], ["model.layers (4) must be at least 2 x parallel.pp (8)"]),
])
def test_errors_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    for w in words:
        assert w in str(err.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError, match="model.dimm"):
        load_config(bad)


def test_dry_run_7b_param_count_and_memory_estimate():
    layout = ["--parallel.dp=16", "--parallel.pp=2", "--parallel.tp=2", "--parallel.microbatches=8"]
    out = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/tnl-7b.yaml"), "--dry-run",
                          *layout], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("parameters:"))
    n = int(line.split()[1].replace(",", ""))
    assert abs(n - 6.84e9) / 6.84e9 < 0.01
    assert "FLOPs per token" in out
    assert "per-rank memory estimate for dp=16 pp=2 cp=1 tp=2" in out and "-> fits" in out
    # the whole 2M-token step on one H100 does not fit: refused with the numbers and the ways out
    bad = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/tnl-7b.yaml"),
                          "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "DOES NOT FIT" in bad.stderr and "activations" in bad.stderr
    assert "lightspan plan" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_bad_config_exits_nonzero():
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", "--config", str(TINY), "--model.heads=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "model.heads (3)" in res.stderr
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "fly"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "unknown verb 'fly'" in res.stderr


@pytest.mark.parametrize("override, words", [
    (["--train.grad_clip=0"], ["train.grad_clip must be > 0", "--train.grad_clip=inf"]),
    (["--train.beta1=1"], ["train.beta1 must be in [0, 1)", "got 1.0"]),
    (["--train.min_lr_ratio=-0.5"], ["train.min_lr_ratio must be in [0, 1]"]),
    (["--train.eps=nan"], ["train.eps must be > 0", "nan"]),
    (["--model.init_std=-0.02"], ["model.init_std must be a finite number > 0", "-0.02"]),
    (["--data.tokens_per_step=.inf"], ["data.tokens_per_step: expected int"]),
    (["--parallel.pp=4", "--parallel.microbatches=3"], ["parallel.microbatches (3) must be >= parallel.pp (4)",
                                                        "--parallel.microbatches=4"]),
])
def test_ranges_name_field_range_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    for w in words:
        assert w in str(err.value)


def test_range_edges_that_are_allowed():
    cfg = load_config(TINY, ["--train.grad_clip=inf", "--train.min_lr_ratio=0", "--train.beta1=0",
                             "--train.weight_decay=0", "--train.max_skipped_steps=0", "--checkpoint.keep_last=1",
                             "--parallel.pp=2", "--parallel.microbatches=2"])
    assert cfg.train.grad_clip == float("inf") and cfg.train.max_skipped_steps == 0


def test_string_numbers_in_a_saved_config_name_the_field():
    from model.config import ModelConfig
    from pretrain.config import from_dict

    with pytest.raises(ConfigError, match=r"model.vocab_size: expected int, got '512'"):
        from_dict({"model": {"vocab_size": "512"}})
    with pytest.raises(ValueError, match=r"model.vocab_size must be an integer >= 1, got '512' \(str\)"):
        ModelConfig(vocab_size="512").validate()  # what a checkpoint's config.json builds directly


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\n  layers: [2\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line \d+"):
        load_config(bad)


def test_vocab_padding_and_holdout_conflict():
    from pretrain.data import padded_model_vocab

    cfg = load_config(None, ["--model.vocab_size=300", "--model.vocab_size_multiple_of=128", "--parallel.tp=1"])
    assert padded_model_vocab(cfg, 300) == 384  # the smallest multiple of 128 x tp holding 300 ids
    with pytest.raises(ConfigError, match="data.holdout .* and data.holdout_docs .* are both set"):
        load_config(None, ["--data.holdout=0.01", "--data.holdout_docs=5"])
    with pytest.raises(ConfigError, match="model.vocab_size_multiple_of"):
        load_config(None, ["--model.vocab_size_multiple_of=-1"])
