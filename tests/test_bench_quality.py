"""bench/quality.py part 4's scoring: the one-forward exact match equals greedy decoding token by token (TNL,
hybrid, softmax and a query-selecting SharedLLM), its intervals are Wilson's, and the held-out plain text it
measures perplexity on comes only from held-out files."""
import dataclasses

import pytest
import torch

from bench.quality import forced_exact_match, retrieval_summary, wilson
from data_pipeline import plain_heldout_tokens, retrieval_prompts
from data_pipeline.synthetic import _corpus, split_of
from evaluation.model_io import ModelRunner
from evaluation.reference_models import CharTokenizer
from model import ModelConfig, build_model

TOK = CharTokenizer(256)
ARCHS = {
    "tnl": dict(),
    "hybrid": dict(attention_pattern="LS", lrpe_layers=[]),
    "llama": dict(arch="llama"),
    "sharedllm": dict(arch="sharedllm", layers=3, lrpe_layers=[0], sharedllm_layers=2, sharedllm_chunk=32,
                      sharedllm_depth=2, sharedllm_node_positions=4, sharedllm_select="query"),
}


def test_wilson_interval_known_values():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forced_exact_match_equals_greedy_decoding(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=256, dim=32, layers=2, heads=2, glu_dim=64), **ARCHS[arch]})
    runner = ModelRunner(build_model(cfg).eval(), chunk_size=64)
    assert runner.selects_by_query == (arch == "sharedllm")
    # 200 tokens: a SharedLLM (text_len 64) compresses 4 chunks of 32; with an answer appended the input would
    # hold 5, so the scorer must split the context as generation does (at the prompt's length)
    prompts = retrieval_prompts(TOK, [200], [0.0, 0.5, 1.0], kind="multikey", trials=2, seed=1)
    greedy = []
    for pr in prompts:
        kw = {"query_ids": torch.tensor([pr.query])} if runner.selects_by_query else {}
        out = runner.generate(torch.tensor([pr.ids]), len(pr.answer_ids), **kw)
        greedy.append([int(t) for t in out[0]])
    own = [dataclasses.replace(pr, answer_ids=g) for pr, g in zip(prompts, greedy)]
    assert all(r["correct"] for r in forced_exact_match(runner, own, tokens_per_batch=400))
    # one token off, first or last: not an exact match
    first = [dataclasses.replace(pr, answer_ids=[(g[0] + 1) % 256, *g[1:]]) for pr, g in zip(prompts, greedy)]
    last = [dataclasses.replace(pr, answer_ids=[*g[:-1], (g[-1] + 1) % 256]) for pr, g in zip(prompts, greedy)]
    for off in (first, last):
        assert not any(r["correct"] for r in forced_exact_match(runner, off, tokens_per_batch=400))
    # the real answers: correct exactly where greedy decoding produced them
    real = forced_exact_match(runner, prompts, tokens_per_batch=200)
    assert [r["correct"] for r in real] == [g == list(pr.answer_ids) for pr, g in zip(prompts, greedy)]


def test_retrieval_summary_counts_and_intervals():
    records = [{"length": 64, "depth": d, "correct": c, "answer_nll": 1.0}
               for d, c in ((0.0, True), (0.0, False), (1.0, True), (1.0, True))]
    s = retrieval_summary(records)
    (row,) = s["per_length"]
    assert (row["correct"], row["trials"], row["accuracy"]) == (3, 4, 0.75)
    assert (row["lo"], row["hi"]) == wilson(3, 4)
    assert [(c["correct"], c["trials"]) for c in s["cells"][0]] == [(1, 2), (2, 2)]


def test_plain_heldout_text_comes_from_heldout_files_only():
    ids = plain_heldout_tokens(TOK, 3000, seed=0)
    assert len(ids) == 3000 and ids.dtype.kind == "i"
    assert (plain_heldout_tokens(TOK, 3000, seed=0) == ids).all()
    text = TOK.decode(ids.tolist())
    corpus = _corpus()
    held = [corpus.text(f) for f in corpus.pools["heldout"]]
    # the text is a run of held-out files: its first full line occurs in one of them ...
    line = next(x for x in text.split("\n")[1:] if len(x.strip()) > 30)
    assert any(line in t for t in held)
    assert all(split_of("file/" + corpus.rel[f]) == "heldout" for f in corpus.pools["heldout"])
    with pytest.raises(ValueError, match="n_tokens"):
        plain_heldout_tokens(TOK, 0)


def test_part4_runs_end_to_end_and_writes_tables_and_plots(tmp_path, capsys):
    """`python -m bench.quality --parts retrieval` on a tiny budget: every model trains on the synthetic mixture,
    every task is scored at every length with its interval, and the PNGs and results file are written."""
    import json

    import yaml

    from bench.quality import main

    cfg = yaml.safe_load(open("configs/retrieval-tiny.yaml"))
    cfg["data"].update(synthetic_documents=96, tokens_per_step=1024)
    cfg["model"].update(dim=32, glu_dim=64, heads=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["--parts", "retrieval", "--out", str(out), "--retrieval-config", str(path), "--retrieval-steps", "2",
                 "--retrieval-models", "tnl,sharedllm", "--retrieval-factors", "1,2", "--retrieval-trials", "1",
                 "--retrieval-trials-64x", "1"]) == 0
    res = json.loads((out / "results-retrieval.json").read_text())
    assert set(res["models"]) == {"tnl", "sharedllm"} and res["lengths"] == [512, 1024]
    for row in res["models"].values():
        assert row["params"] > 0 and row["final_loss"] is not None
        for kind in ("passkey", "multikey", "multihop"):
            pts = row["tasks"][kind]["per_length"]
            assert [p["length"] for p in pts] == [512, 1024] and all(p["trials"] == 5 for p in pts)
            assert all(0 <= p["lo"] <= p["accuracy"] <= p["hi"] <= 1 for p in pts)
        assert [p["length"] for p in row["ppl"]] == [128, 512, 1024]
    for name in ("retrieval-passkey.png", "retrieval-multikey.png", "retrieval-multihop.png",
                 "retrieval-perplexity.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| SharedLLM-TNL |" in printed and "multi-key needle" in printed
