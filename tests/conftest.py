"""Test-session setup.

Triton's interpreter must be switched on before any kernel is defined, so this runs before the
tests import `model`. With a CUDA device present the real kernels run instead.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200 real documents of spread-out lengths (slices of stdlib sources) as a local jsonl source; tests
    prepare it into `corpus / "prepared"` through the trainer's config."""
    import json
    import random

    from data_pipeline import stdlib_files

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for path in stdlib_files()[:200]:
            f.write(json.dumps({"text": path.read_text(errors="replace")[: rng.choice([300, 1000, 3000])]}) + "\n")
    return root
