"""The planner: its activation estimate against a measured step (fresh processes, peak RSS), for every AC mode;
`lightspan plan` lists fitting layouts for TNL-7B on 64 H100s; an impossible request is refused with numbers."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.memory import measure
from pretrain.config import load_config
from pretrain.plan import Layout, estimate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_estimate_within_25_percent_of_the_measured_growth(mode):
    """Another shape than bench/memory.py measured its constants on (6 layers, T 1024 -> 3072)."""
    args = SimpleNamespace(layers=6, dim=256, heads=4, glu=704, threads=2)
    t1, t2 = 1024, 3072
    measured = measure(args, mode, t2, 2048, 1024) - measure(args, mode, t1, 2048, 1024)
    cfg = load_config(None, ["--model.layers=6", "--model.dim=256", "--model.heads=4", "--model.glu_dim=704",
                             "--model.vocab_size=2048", f"--train.activation_checkpointing={mode}"])

    def act(t):
        return estimate(cfg, Layout(1, 1, 1, 1, mode, 1), t, t, "cpu")["memory"]["activations"]

    predicted = act(t2) - act(t1)
    assert abs(predicted - measured) / measured < 0.25, (mode, predicted / 2**20, measured / 2**20)


def test_plan_lists_fitting_layouts_for_7b_on_64_h100():
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "plan", "--config", "configs/tnl-7b.yaml", "--gpus",
                          "64", "--device", "h100-80gb", "--seq-len", "32768", "--top", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layouts fit; fastest first" in out.stdout and "-> fits; predicted step" in out.stdout
    rows = [x for x in out.stdout.splitlines() if x.startswith("dp=")]
    assert len(rows) == 3 and all("ac=" in r for r in rows)
    bad = subprocess.run([sys.executable, "-m", "pretrain.cli", "plan", "--config", "configs/tnl-7b.yaml", "--gpus",
                          "1", "--seq-len", "1048576"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no layout of 1 x h100-80gb fits 1,048,576-token sequences" in bad.stderr
    assert "Traceback" not in bad.stderr
