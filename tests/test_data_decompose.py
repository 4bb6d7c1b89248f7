"""Dataset decomposition and the curriculum, as pure functions (no files)."""

import numpy as np
import pytest

from data_pipeline import curriculum_odds, decompose_lengths, epoch_schedule


def _random_docs(n=500, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(0, np.log(70_000), n)).astype(np.int64) + 1  # 1 .. 70K, log-uniform
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts, lengths


@pytest.mark.parametrize("lo,hi", [(8, 13), (4, 6), (0, 3), (5, 17)])
def test_pieces_are_powers_of_two_and_rebuild_each_document(lo, hi):
    starts, lengths = _random_docs()
    buckets = decompose_lengths(starts, lengths, lo, hi)
    assert sorted(buckets) == list(range(lo, hi + 1))
    # every piece: (start, 2^i) with i in range
    pieces = np.concatenate([np.stack([idx, np.full(len(idx), 1 << i)], 1) for i, idx in buckets.items()])
    pieces = pieces[np.argsort(pieces[:, 0])]
    assert all(((1 << lo) <= p <= (1 << hi)) and (p & (p - 1)) == 0 for p in pieces[:, 1])
    doc_of = np.searchsorted(starts, pieces[:, 0], side="right") - 1
    for d in range(len(lengths)):
        mine = pieces[doc_of == d]
        kept = lengths[d] - lengths[d] % (1 << lo)
        # in offset order the pieces tile [start, start + kept): they rebuild the document minus its dropped tail
        expected_starts = starts[d] + np.concatenate([[0], np.cumsum(mine[:, 1])[:-1]]) if len(mine) else []
        np.testing.assert_array_equal(mine[:, 0], expected_starts)
        assert mine[:, 1].sum() == kept
        # no piece crosses the document's end; pieces are in decreasing size order (binary expansion)
        assert all(mine[:, 0] + mine[:, 1] <= starts[d] + lengths[d])
        assert list(mine[:, 1]) == sorted(mine[:, 1], reverse=True)


def test_binary_expansion_example():
    b = decompose_lengths(np.array([0]), np.array([200]), 3, 7)
    assert {i: list(v) for i, v in b.items()} == {3: [192], 4: [], 5: [], 6: [128], 7: [0]}
    b = decompose_lengths(np.array([0]), np.array([1000]), 8, 8)  # 1000 = 3 x 256 + 232 (dropped)
    assert list(b[8]) == [0, 256, 512]


def test_odds():
    np.testing.assert_array_equal(curriculum_odds("grow_p2", 6), [32, 16, 8, 4, 2, 1])
    np.testing.assert_array_equal(curriculum_odds("grow_linear", 6), [6, 5, 4, 3, 2, 1])
    np.testing.assert_array_equal(curriculum_odds("uniform", 3), [1, 1, 1])
    with pytest.raises(ValueError, match="unknown curriculum"):
        curriculum_odds("grow_p3", 2)


@pytest.mark.parametrize("curriculum", ["uniform", "grow_p2", "grow_linear"])
def test_schedule_spends_each_quota_per_cycle(curriculum):
    quotas, cycles = [17, 40, 3, 0, 25, 80], 8
    s = epoch_schedule(quotas, curriculum, cycles, seed=1, epoch=0)
    np.testing.assert_array_equal(np.bincount(s, minlength=6), quotas)
    per_cycle = [q // cycles + (np.arange(cycles) < q % cycles) for q in quotas]
    bounds = np.concatenate([[0], np.cumsum(np.sum(per_cycle, axis=0))])
    for k in range(cycles):  # cycle k holds exactly its share of each bucket
        np.testing.assert_array_equal(np.bincount(s[bounds[k]:bounds[k + 1]], minlength=6),
                                      [pc[k] for pc in per_cycle])
    # same seed and epoch: same schedule (every rank computes it alone); another epoch: another order
    np.testing.assert_array_equal(s, epoch_schedule(quotas, curriculum, cycles, seed=1, epoch=0))
    assert not np.array_equal(s, epoch_schedule(quotas, curriculum, cycles, seed=1, epoch=1))


def test_grow_p2_draws_short_buckets_first_within_a_cycle():
    quotas, cycles = [64] * 6, 8  # 8 batches per bucket per cycle: 48-step cycles
    first, second = [], []
    for seed in range(20):
        s = epoch_schedule(quotas, "grow_p2", cycles, seed=seed, epoch=0).reshape(cycles, 48)
        first.append(s[:, :24].mean())
        second.append(s[:, 24:].mean())
    assert np.mean(first) + 1.0 < np.mean(second), (np.mean(first), np.mean(second))
    # uniform odds show no such order
    u = np.stack([epoch_schedule(quotas, "uniform", cycles, seed=s, epoch=0).reshape(cycles, 48)
                  for s in range(20)])
    assert abs(u[..., :24].mean() - u[..., 24:].mean()) < 0.5
