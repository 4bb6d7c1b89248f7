"""The dataset-decomposition and concat loaders on a small corpus this module prepares itself."""

import json

import numpy as np
import pytest
import torch

from data_pipeline import IGNORE_INDEX, TokenStore, build_loader, prepare, stats

TPS = 1024  # global tokens per step
LO, HI = 4, 8


def _write_corpus(path, n_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz():\n"))
    words = ["".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(2000)]
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(np.exp(rng.uniform(np.log(3), np.log(3000))))
            f.write(json.dumps({"text": " ".join(rng.choice(words, n))}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _write_corpus(root / "docs.jsonl")
    # small shards so reads cross the shard bookkeeping; a tiny tokenizer trained on the corpus
    return prepare(str(root / "docs.jsonl"), root / "prepared", vocab_size=384, num_workers=1,
                   shard_tokens=40_000, progress=False)


def _dd(corpus, **kw):
    args = dict(kind="dd", tokens_per_step=TPS, min_log2=LO, max_log2=HI, curriculum="grow_p2", cycles=4, seed=3)
    args.update(kw)
    return build_loader(corpus, **args)


def test_corpus_is_multi_shard(corpus):
    store = TokenStore(corpus)
    assert len(store.shards) > 2
    # a document never straddles two shards
    docs = np.asarray(store.documents)
    shard_of_first = np.searchsorted(store.shard_starts, docs[:, 0], side="right")
    shard_of_last = np.searchsorted(store.shard_starts, docs[:, 0] + docs[:, 1] - 1, side="right")
    np.testing.assert_array_equal(shard_of_first, shard_of_last)


def test_every_step_has_the_token_count_and_no_sequence_crosses_a_document(corpus):
    loader = _dd(corpus)
    store = TokenStore(corpus)
    docs = np.asarray(store.documents)
    seen = set()
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        T = b["seq_len"]
        assert T == 1 << b["bucket"] and LO <= b["bucket"] <= HI
        assert b["input_ids"].shape == (TPS // T, T) and b["input_ids"].dtype == torch.int64
        assert b["input_ids"].numel() == TPS
        for row, start in enumerate(b["starts"].tolist()):
            d = np.searchsorted(docs[:, 0], start, side="right") - 1
            assert start + T <= docs[d, 0] + docs[d, 1], "sequence crosses a document boundary"
            tokens = store.read(start, T)
            np.testing.assert_array_equal(b["input_ids"][row].numpy(), tokens)
            np.testing.assert_array_equal(b["labels"][row, :-1].numpy(), tokens[1:])
            assert b["labels"][row, -1] == IGNORE_INDEX
            assert (start, T) not in seen, "a piece repeated within one epoch"
            seen.add((start, T))
    assert b["epoch"] == 0 and next(loader)["epoch"] == 1


def test_dp_ranks_get_disjoint_slices_of_the_same_global_step(corpus):
    full = _dd(corpus)
    ranks = [_dd(corpus, dp_rank=r, dp_size=2) for r in range(2)]
    everything = [set(), set()]
    for _ in range(full.steps_per_epoch):
        g = next(full)
        parts = [next(r) for r in ranks]
        assert parts[0]["bucket"] == parts[1]["bucket"] == g["bucket"]  # the same bucket on every rank
        a, b = (set(p["starts"].tolist()) for p in parts)
        assert not a & b
        torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), g["input_ids"])
        everything[0] |= a
        everything[1] |= b
    assert not everything[0] & everything[1], "two dp ranks saw the same sequence in one epoch"


def test_cp_chunks_concatenate_to_the_full_sequence(corpus):
    full = _dd(corpus, dp_rank=1, dp_size=2)
    chunks = [_dd(corpus, dp_rank=1, dp_size=2, cp_rank=c, cp_size=4) for c in range(4)]
    for _ in range(12):
        g = next(full)
        parts = [next(c) for c in chunks]
        T = g["seq_len"]
        assert [p["position_offset"] for p in parts] == [c * T // 4 for c in range(4)]
        assert all(p["input_ids"].shape[1] == T // 4 for p in parts)
        torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts], 1), g["input_ids"])
        torch.testing.assert_close(torch.cat([p["labels"] for p in parts], 1), g["labels"])


@pytest.mark.parametrize("kind", ["dd", "concat"])
def test_resume_after_k_steps_yields_the_same_next_batches(corpus, kind, tmp_path):
    make = (lambda: _dd(corpus, dp_rank=1, dp_size=2)) if kind == "dd" else \
        (lambda: build_loader(corpus, kind="concat", tokens_per_step=TPS, seq_len=128, seed=5, dp_rank=1, dp_size=2))
    ref = make()
    k = ref.steps_per_epoch - 3  # the next batches cross an epoch boundary
    for _ in range(k):
        next(ref)
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    expected = [next(ref) for _ in range(6)]

    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for e in expected:
        got = next(resumed)
        assert (got["step"], got["epoch"], got["seq_len"]) == (e["step"], e["epoch"], e["seq_len"])
        torch.testing.assert_close(got["input_ids"], e["input_ids"])
        torch.testing.assert_close(got["labels"], e["labels"])


def test_state_resumes_on_another_layout_and_refuses_another_config(corpus):
    """The position is global: a dp=2 state resumes at dp=1 and dp=4 x cp=2 on the same global batches."""
    ranks = [_dd(corpus, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        for r in ranks:
            next(r)
    state = ranks[0].state_dict()
    expected = [next(r) for r in ranks]  # the global batch of step 5, as two dp halves
    whole = _dd(corpus)
    whole.load_state_dict(state)
    got = next(whole)
    torch.testing.assert_close(got["input_ids"], torch.cat([e["input_ids"] for e in expected]))
    torch.testing.assert_close(got["labels"], torch.cat([e["labels"] for e in expected]))
    quarters = []
    for d in range(4):
        chunks = []
        for c in range(2):
            part = _dd(corpus, dp_rank=d, dp_size=4, cp_rank=c, cp_size=2)
            part.load_state_dict(state)
            chunks.append(next(part)["input_ids"])
        quarters.append(torch.cat(chunks, 1))
    torch.testing.assert_close(torch.cat(quarters), got["input_ids"])
    with pytest.raises(ValueError, match=r"curriculum: saved 'grow_p2' vs now 'uniform'"):
        _dd(corpus, dp_size=2, curriculum="uniform").load_state_dict(state)
    with pytest.raises(ValueError, match="'dd' loader"):
        build_loader(corpus, kind="concat", tokens_per_step=TPS, seq_len=256, dp_size=2).load_state_dict(state)


def test_layouts_that_do_not_divide_are_refused_with_numbers(corpus):
    with pytest.raises(ValueError, match=r"tokens_per_step \(1000\).*2\^max_log2 \(256\) x dp_size \(1\)"):
        _dd(corpus, tokens_per_step=1000)
    with pytest.raises(ValueError, match=r"\(256\) x dp_size \(8\) = 2048"):
        _dd(corpus, dp_size=8)
    with pytest.raises(ValueError, match=r"2\^min_log2 \(16\) must be divisible by cp_size \(32\)"):
        _dd(corpus, cp_size=32)
    with pytest.raises(ValueError, match="too small"):
        _dd(corpus, tokens_per_step=1 << 22)
    with pytest.raises(ValueError, match="unknown loader kind"):
        build_loader(corpus, kind="packed", tokens_per_step=TPS)


def test_a_new_epoch_reshuffles(corpus):
    loader = _dd(corpus)
    n = loader.steps_per_epoch
    first = [next(loader) for _ in range(n)]
    second = [next(loader) for _ in range(n)]
    assert sorted(b["bucket"] for b in first) == sorted(b["bucket"] for b in second)  # same quotas
    assert [b["bucket"] for b in first] != [b["bucket"] for b in second] or not all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


def test_concat_loader_packs_across_documents(corpus):
    store = TokenStore(corpus)
    loader = build_loader(corpus, kind="concat", tokens_per_step=TPS, seq_len=256, seed=1)
    chunks = [build_loader(corpus, kind="concat", tokens_per_step=TPS, seq_len=256, seed=1, cp_rank=c, cp_size=2)
              for c in range(2)]
    halves = [build_loader(corpus, kind="concat", tokens_per_step=TPS, seq_len=256, seed=1, dp_rank=r, dp_size=2)
              for r in range(2)]
    assert loader.steps_per_epoch == (store.num_tokens - 1) // 256 // 4
    for _ in range(5):
        b = next(loader)
        assert b["input_ids"].shape == (4, 256) and b["seq_len"] == 256 and b["bucket"] == 8
        for row, start in enumerate(b["starts"].tolist()):
            tokens = store.read(start, 257)
            np.testing.assert_array_equal(b["input_ids"][row].numpy(), tokens[:-1])
            np.testing.assert_array_equal(b["labels"][row].numpy(), tokens[1:])
        parts = [next(c) for c in chunks]
        torch.testing.assert_close(torch.cat([p["labels"] for p in parts], 1), b["labels"])
        d = [next(h) for h in halves]
        assert not set(d[0]["starts"].tolist()) & set(d[1]["starts"].tolist())
        torch.testing.assert_close(torch.cat([x["input_ids"] for x in d]), b["input_ids"])


def test_stats_match_the_loader(corpus):
    s = stats(corpus, tokens_per_step=TPS, min_log2=LO, max_log2=HI)
    loader = _dd(corpus)
    assert s["steps_per_epoch"] == loader.steps_per_epoch
    assert {i: b["steps_per_epoch"] for i, b in s["buckets"].items()} == loader.bucket_steps()
    kept = sum(b["tokens"] for b in s["buckets"].values())
    assert kept + s["dropped_tokens"] == s["tokens"]
    # the per-bucket indexes were written next to the shards, keyed by (min, max)
    assert (corpus / f"dd_{LO}_{HI}" / "meta.json").is_file()
    stats(corpus, tokens_per_step=TPS, min_log2=3, max_log2=6)
    assert (corpus / "dd_3_6" / "bucket_06.npy").is_file() and (corpus / f"dd_{LO}_{HI}").is_dir()
