"""Data-parallel evaluation (examples shared out over gloo ranks, scores gathered) equals one process."""
import numpy as np
import pytest
import torch

from parallel.harness import run_distributed

pytestmark = pytest.mark.distributed


def _evaluate_all():
    from evaluation import mqar, passkey
    from evaluation.model_io import ModelRunner
    from evaluation.perplexity import perplexity_curve
    from evaluation.reference_models import CharTokenizer
    from model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, dim=32, layers=2, heads=2, glu_dim=64)).eval()
    runner = ModelRunner(model, chunk_size=64)
    tokens = np.random.default_rng(0).integers(0, 128, 400)
    curve = perplexity_curve(runner, tokens, [32, 100], stride_frac=0.5, tokens_per_batch=64)
    keys = passkey.evaluate(runner, CharTokenizer(128), [250, 300], [0.0, 0.5, 1.0], trials=1, seed=0,
                            tokens_per_batch=600)
    recall = mqar.evaluate(runner, mqar.MQARSpec(seq_len=32, num_kv_pairs=4, vocab_size=128), 10, batch_size=3)
    return curve, keys, recall


def _worker(rank, world):
    return _evaluate_all()


def test_two_ranks_equal_one():
    torch.set_num_threads(1)
    curve1, keys1, recall1 = _evaluate_all()
    results = run_distributed(_worker, world_size=2, timeout_s=120)
    for curve2, keys2, recall2 in results:  # every rank ends with the whole result
        assert [(p["length"], p["tokens"], p["windows"]) for p in curve2] == \
            [(p["length"], p["tokens"], p["windows"]) for p in curve1]
        for a, b in zip(curve1, curve2):
            assert b["nll"] == pytest.approx(a["nll"], rel=1e-6)
        assert keys2["records"] == keys1["records"] and keys2["accuracy"] == keys1["accuracy"]
        assert recall2 == recall1 and recall1["queries"] == 40
