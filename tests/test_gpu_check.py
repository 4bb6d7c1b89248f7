"""bench/gpu_check.sh: shellcheck-clean; without a CUDA device it says so, exits 3 and touches nothing."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (make test-deps installs it)")
def test_gpu_check_passes_shellcheck():
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run for real")
def test_gpu_check_without_a_gpu_fails_clearly_and_touches_nothing():
    results = ROOT / "bench" / "RESULTS.md"
    before = hashlib.sha256(results.read_bytes()).hexdigest()
    import sys

    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 3
    assert "no CUDA device is visible" in out.stderr and "bench/RESULTS.md is unchanged" in out.stderr
    assert hashlib.sha256(results.read_bytes()).hexdigest() == before
