"""Sliding-window perplexity and the chunked TNL runner against plain full-sequence forwards."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.model_io import IGNORE, ModelRunner, token_nll
from evaluation.perplexity import perplexity_curve, sliding_window_nll, window_targets, windows
from model import ModelConfig, build_model


def _model(arch="tnl"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=97, dim=32, layers=2, heads=2, glu_dim=64, lrpe_layers=[0] if arch == "tnl" else [])
    return build_model(cfg).eval()


def _full_nll(model, tokens):
    with torch.no_grad():
        logits = model(tokens[None])[0]
    return F.cross_entropy(logits[:-1].double(), tokens[1:], reduction="sum").item()


@pytest.mark.parametrize("arch", ["tnl", "llama"])
def test_sliding_window_equals_full_sequence_when_the_window_covers_it(arch):
    model = _model(arch)
    tokens = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1))
    total, count = sliding_window_nll(ModelRunner(model, chunk_size=64), tokens.numpy(), length=150, stride=75)
    assert count == 149
    assert total == pytest.approx(_full_nll(model, tokens), rel=1e-5)
    longer, count2 = sliding_window_nll(ModelRunner(model), tokens.numpy(), length=1000, stride=500)
    assert count2 == 149 and longer == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("n,length,stride", [(100, 32, 16), (100, 32, 32), (101, 40, 7), (10, 32, 8), (64, 64, 1)])
def test_windows_score_every_token_once(n, length, stride):
    seen = []
    for b, e, first in windows(n, length, stride):
        assert e - b == min(length, n) and b + 1 <= first <= e
        ids, targets = window_targets(torch.arange(n), b, e, first)
        scored = targets[targets != IGNORE].tolist()
        seen += scored
        assert scored == list(range(first, e))
    assert seen == list(range(1, n))


def test_short_windows_score_with_at_least_length_minus_stride_context():
    spans = windows(200, 64, 16)
    for b, e, first in spans[1:]:
        assert first - b >= 64 - 16


def test_chunked_runner_matches_one_forward():
    model = _model("tnl")
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    chunks = list(ModelRunner(model, chunk_size=16).logits_chunks(ids))
    assert [s for s, _ in chunks] == [0, 16, 32, 48, 64]
    torch.testing.assert_close(torch.cat([c for _, c in chunks], dim=1), ref, rtol=1e-4, atol=1e-4)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = IGNORE
    nll, hit = token_nll(ModelRunner(model, chunk_size=16), ids, targets)
    ref_nll = F.cross_entropy(ref[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert nll.sum().item() == pytest.approx(ref_nll.item(), rel=1e-5)


def test_chunked_generate_matches_greedy_generate():
    from model.generate import greedy_generate

    model = _model("tnl")
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    ours = ModelRunner(model, chunk_size=16).generate(ids, 6)
    assert torch.equal(ours, greedy_generate(model, ids, 6)[:, 40:])


def test_perplexity_curve_points():
    model = _model("tnl")
    tokens = np.random.default_rng(0).integers(0, 97, 300)
    curve = perplexity_curve(ModelRunner(model), tokens, [32, 128], stride_frac=0.5)
    assert [p["length"] for p in curve] == [32, 128] and all(p["tokens"] == 299 for p in curve)
    assert all(math.isclose(p["ppl"], math.exp(p["nll"])) for p in curve)
    assert all(50 < p["ppl"] < 200 for p in curve)  # an untrained model: about the vocabulary size (97)


@pytest.mark.parametrize("arch,pattern", [("llama", "L"), ("tnl", "LS")])
def test_baseline_reruns_and_hybrid_decodes_with_states_alike(arch, pattern):
    """The softmax baseline has no cache (re-runs the sequence); a hybrid TNL carries lightning states and
    key/value caches: both generate what re-running the model on the whole sequence gives."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=97, dim=32, layers=2, heads=2, glu_dim=64,
                                    attention_pattern=pattern, lrpe_layers=[])).eval()
    runner = ModelRunner(model, chunk_size=8)
    assert runner.recurrent == (arch == "tnl")
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(runner.generate(ids, 5), seq[:, 20:])
    chunks = list(runner.logits_chunks(ids))
    assert [s for s, _ in chunks] == ([0] if arch == "llama" else [0, 8, 16])
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([x for _, x in chunks], dim=1), model(ids), atol=1e-5, rtol=1e-5)
