"""Hostile and careless input at the command line (issue #17): every refusal is one line naming the field or file
and the fix, with a non-zero exit status and no traceback; `--debug` shows the traceback.

Each case is a real subprocess. `lightspan train --dry-run` stops at the config check, before torch is imported,
so those cases are cheap; the `lightspan eval` ones import torch (a few seconds each).
"""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def lightspan(*args, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if k != "LIGHTSPAN_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def assert_one_line_refusal(res, *words):
    assert res.returncode != 0, res.stdout[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert "error: " in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


# (override, words the one line must hold: the field, the allowed range, the value, the fix)
TRAIN_CASES = [
    ("--train.grad_clip=0", ["train.grad_clip", "> 0", "got 0.0", "--train.grad_clip=inf turns clipping off"]),
    ("--train.grad_clip=-1", ["train.grad_clip", "> 0", "got -1.0"]),
    ("--train.lr=nan", ["train.lr", "> 0", "nan", "set --train.lr"]),
    ("--train.lr=-3e-4", ["train.lr", "> 0", "-0.0003"]),
    ("--train.beta2=1.0", ["train.beta2", "in [0, 1)", "got 1.0"]),
    ("--train.beta1=-0.1", ["train.beta1", "in [0, 1)"]),
    ("--train.min_lr_ratio=1.5", ["train.min_lr_ratio", "in [0, 1]", "got 1.5"]),
    ("--train.eps=0", ["train.eps", "> 0"]),
    ("--train.weight_decay=inf", ["train.weight_decay", ">= 0", "inf"]),
    ("--train.warmup_steps=-1", ["train.warmup_steps", ">= 0", "got -1"]),
    ("--train.threads=-2", ["train.threads", ">= 0"]),
    ("--train.max_skipped_steps=-1", ["train.max_skipped_steps", ">= 0"]),
    ("--data.workers=-1", ["data.workers", ">= 0"]),
    ("--checkpoint.every=-5", ["checkpoint.every", ">= 0"]),
    ("--checkpoint.keep_last=0", ["checkpoint.keep_last", ">= 1"]),
    ("--model.init_std=0", ["model.init_std", "> 0"]),
    ("--model.norm_eps=.inf", ["model.norm_eps", "finite"]),
    ("--model.rope_theta=-1", ["model.rope_theta", "> 0"]),
    ('--model.vocab_size="512"', ["model.vocab_size", "expected int", "'512'", "without quotes"]),
    ("--model.lrpe_layers=[0,", ["--model.lrpe_layers", "'[0,'"]),
]


@pytest.mark.parametrize("override, words", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_dry_run_refuses_out_of_range_values(override, words):
    assert_one_line_refusal(lightspan("train", "--dry-run", "--config", TINY, override), *words)


def test_pipeline_microbatches_default_to_pp_and_fewer_are_refused():
    assert_one_line_refusal(lightspan("train", "--dry-run", "--config", TINY, "--parallel.pp=2",
                                      "--parallel.microbatches=1"),
                            "parallel.microbatches (1)", "parallel.pp (2)", "--parallel.microbatches=2")
    res = lightspan("train", "--dry-run", "--config", TINY, "--parallel.pp=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"microbatches": 2' in res.stdout


def test_grad_clip_inf_is_the_explicit_off_switch():
    res = lightspan("train", "--dry-run", "--config", TINY, "--train.grad_clip=inf", "--parallel.pp=2",
                    "--parallel.microbatches=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"grad_clip": Infinity' in res.stdout


BAD_FILES = {
    "indent.yaml": ("model:\n  dim: 64\n   layers: 2\n", ["indent.yaml", "not valid YAML", "line 3"]),
    "quote.yaml": ("train:\n  lr: 1e-3\n  out_dir: 'runs/x\n", ["quote.yaml", "not valid YAML", "line"]),
    "binary.yaml": (b"\xff\xfe\x00model", ["binary.yaml", "not UTF-8"]),
    "list.yaml": ("- model\n- train\n", ["list.yaml", "top level must be a mapping"]),
    "nan.yaml": ("train:\n  beta1: .nan\n", ["train.beta1", "in [0, 1)", "nan"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_config_file_names_the_file_and_line(tmp_path, name):
    body, words = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    assert_one_line_refusal(lightspan("train", "--dry-run", "--config", str(path)), *words)


def test_prepare_with_bad_yaml_is_one_line_and_debug_shows_the_traceback_once(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  source: [a, b\n")
    assert_one_line_refusal(lightspan("prepare", "--config", str(path)), "broken.yaml", "not valid YAML")
    for res in (lightspan("--debug", "prepare", "--config", str(path)),
                lightspan("prepare", "--config", str(path), env={"LIGHTSPAN_DEBUG": "1"})):
        assert res.returncode != 0
        assert res.stderr.count("Traceback (most recent call last)") == 1, res.stderr[-3000:]
        assert "ConfigError" in res.stderr and "broken.yaml" in res.stderr


EVAL_CASES = [
    (["--max-length", "-5"], ["--max-length", ">= 1", "-5"]),
    (["--stride-frac", "1.5"], ["--stride-frac", "(0, 1]", "1.5"]),
    (["--lengths", "1024,0"], ["--lengths", ">= 1", "got 0"]),
    (["--tokens-per-batch", "0"], ["--tokens-per-batch", ">= 1"]),
    (["--device", "gpu"], ["--device", "'gpu'", "cpu or cuda"]),
]


@pytest.mark.parametrize("extra, words", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_eval_refuses_bad_arguments(tmp_path, extra, words):
    res = lightspan("eval", str(tmp_path), "--out", str(tmp_path / "out"), *extra)
    assert_one_line_refusal(res, *words)
    assert not (tmp_path / "out").exists()


def test_eval_of_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-run"
    assert_one_line_refusal(lightspan("eval", str(missing), "--out", str(tmp_path / "out")),
                            str(missing), "no such run folder")


def test_eval_on_cuda_without_a_gpu(tmp_path):
    res = lightspan("eval", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cuda",
                    env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_refusal(res, "--device cuda", "no CUDA GPU is visible", "--device cpu")


# -- the boundary itself, in process -------------------------------------------------------------------------------


def _raiser(exc):
    def fn(argv):
        raise exc
    return fn


@pytest.mark.parametrize("exc, status, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/ckpt.pt"), 2,
     ["No space left on device: /data/run/ckpt.pt", "free some space"]),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), 2, ["Permission denied: /runs/x"]),
    (FloatingPointError("loss nan at step 7; lower train.lr"), 1, ["loss nan at step 7"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
    (ValueError("two\nlines"), 2, ["two lines"]),
])
def test_known_errors_are_one_line_with_their_status(capsys, exc, status, words):
    assert run_cli(_raiser(exc), ["x"]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for w in words:
        assert w in err


def test_bugs_propagate_and_debug_is_stripped_from_argv(monkeypatch):
    monkeypatch.delenv("LIGHTSPAN_DEBUG", raising=False)
    with pytest.raises(TypeError):
        run_cli(_raiser(TypeError("a bug")), [])
    with pytest.raises(ValueError):
        run_cli(_raiser(ValueError("known, but --debug")), ["--debug"])
    seen = []
    assert run_cli(lambda argv: seen.append(argv), ["a", "--debug", "b"]) == 0
    assert seen == [["a", "b"]]
