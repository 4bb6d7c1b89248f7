"""The house rules of docs/DESIGN.md that a grep can check: the trainer and the parallel code know no
architecture by name (only parallel/specs/ does), model code knows nothing of ranks, and no product module
imports the fault-injection hooks except the entry point that installs them."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _py(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def test_architecture_names_only_in_the_spec_registry():
    offenders = []
    for path in _py("pretrain") + _py("parallel"):
        if "specs" in path.relative_to(ROOT).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"arch ==|sharedllm", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_model_code_knows_nothing_of_ranks():
    offenders = [str(p.relative_to(ROOT)) for p in _py("model")
                 if re.search(r"^\s*(import|from) torch\.distributed", p.read_text(), re.M)]
    assert not offenders, offenders


def test_fault_injection_is_installed_only_by_the_entry_point():
    importers = [str(p.relative_to(ROOT)) for p in _py("pretrain") + _py("parallel") + _py("data_pipeline")
                 + _py("evaluation") if re.search(r"from pretrain import faults|import pretrain.faults|test_hooks",
                                                  p.read_text())]
    assert importers == ["pretrain/train.py"], importers
