"""Evaluation tasks: each generator is deterministic from its seed; each scorer gives 100% to an oracle that is
handed the answers and about chance to a random guesser (evaluation.reference_models)."""
import math

import torch

from evaluation import mqar, needle, passkey
from evaluation.model_io import IGNORE
from evaluation.reference_models import CharTokenizer, OracleModel, RandomModel
from evaluation.retrieval import assemble

TOK = CharTokenizer(256)
LENGTHS = [300, 600]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _oracle(examples):
    return OracleModel(TOK.vocab_size, {tuple(ex.ids): ex.answer_ids for ex in examples})


def test_assemble_places_the_needle_at_depth_and_exact_length():
    intro, question, needle_ids = [1] * 5, [2] * 4, [9, 9, 9]
    filler = list(range(100, 200))
    boundaries = list(range(0, 100, 10))
    for depth, expect in ((0.0, 0), (0.5, 40), (1.0, 81)):
        ids = assemble(intro, filler, boundaries, needle_ids, question, 93, depth)
        assert len(ids) == 93
        assert ids[5 + expect:5 + expect + 3] == needle_ids  # room = 81: boundaries 0..80 and 81 itself


def test_passkey_is_deterministic_and_exact_length():
    a = passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=2, seed=3)
    b = passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=2, seed=3)
    c = passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=2, seed=4)
    assert [(e.ids, e.answer) for e in a] == [(e.ids, e.answer) for e in b]
    assert [e.answer for e in a] != [e.answer for e in c]
    assert all(len(e.ids) == e.length for e in a)
    assert all(TOK.decode(e.ids).count(e.answer) == 2 for e in a)  # "The pass key is K ... K is the pass key"


def test_passkey_oracle_scores_100_random_scores_chance():
    examples = passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=4, seed=0)
    good = passkey.evaluate(_oracle(examples), TOK, LENGTHS, DEPTHS, trials=4, seed=0)
    assert good["overall"] == 1.0 and good["accuracy"] == [[1.0] * 5, [1.0] * 5]
    digits = TOK.encode("0123456789")
    bad = passkey.evaluate(RandomModel(TOK.vocab_size, digits, seed=1), TOK, LENGTHS, DEPTHS, trials=4, seed=0)
    assert bad["overall"] == 0.0  # chance is 1e-5 per key


def test_needle_is_deterministic_oracle_100_random_chance():
    a = needle.make_examples(TOK, LENGTHS, DEPTHS, seed=1)
    assert [e.ids for e in a] == [e.ids for e in needle.make_examples(TOK, LENGTHS, DEPTHS, seed=1)]
    assert [e.ids for e in a] != [e.ids for e in needle.make_examples(TOK, LENGTHS, DEPTHS, seed=2)]
    assert all(len(e.ids) == e.length and e.answer in TOK.decode(e.ids) for e in a)
    good = needle.evaluate(_oracle(a), TOK, LENGTHS, DEPTHS, seed=1)
    assert good["overall"] == 1.0
    bad = needle.evaluate(RandomModel(TOK.vocab_size, seed=0), TOK, LENGTHS, DEPTHS, seed=1)
    assert bad["overall"] <= needle.CHANCE


def test_mqar_generator_layout_and_determinism():
    x, y = mqar.make_mqar(8, 64, 8, 64, seed=5)
    x2, y2 = mqar.make_mqar(8, 64, 8, 64, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, mqar.make_mqar(8, 64, 8, 64, seed=6)[0])
    assert x.shape == y.shape == (8, 64)
    for row in range(8):
        keys, values = x[row, 0:16:2], x[row, 1:16:2]
        assert bool((keys >= 1).all() and (keys < 32).all() and (values >= 32).all())  # disjoint halves
        assert len(set(keys.tolist())) == 8 and len(set(values.tolist())) == 8
        asked = (y[row] != IGNORE).nonzero()[:, 0]
        assert len(asked) == 8 and bool((asked >= 16).all())
        table = dict(zip(keys.tolist(), values.tolist()))
        assert all(table[int(x[row, p])] == int(y[row, p]) for p in asked)  # query key -> its value


def test_mqar_gaps_follow_a_power_law():
    x, y = mqar.make_mqar(400, 256, 4, 64, seed=0)
    slot = ((y != IGNORE).nonzero()[:, 1] - 8) // 2
    short, long = int((slot < 10).sum()), int((slot >= 110).sum())
    assert short > 2 * long  # p(g) ~ g^(a-1): short gaps dominate


def test_mqar_oracle_100_random_chance():
    spec = mqar.MQARSpec(seq_len=64, num_kv_pairs=8, vocab_size=64)
    x, y = mqar.make_mqar(128, spec.seq_len, spec.num_kv_pairs, spec.vocab_size, seed=12345)
    oracle = OracleModel(64, {tuple(r.tolist()): t for r, t in zip(x, y)})
    assert mqar.evaluate(oracle, spec, 128, seed=12345, batch_size=32)["accuracy"] == 1.0
    res = mqar.evaluate(RandomModel(64, range(32, 64), seed=0), spec, 128, seed=12345, batch_size=32)
    chance, n = res["chance"], res["queries"]
    assert abs(res["accuracy"] - chance) < 4 * math.sqrt(chance * (1 - chance) / n)


def test_passkey_answer_nll_is_zero_for_an_oracle_and_log11_for_a_uniform_guesser():
    """answer_nll: teacher-forced NLL per key token; an oracle that puts its mass on the key scores ~0, a
    uniform guesser among the 11 tokens a key is made of (space + 10 digits) log(11)."""
    examples = passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=2, seed=0)
    answers = {}
    for ex in examples:
        full = ex.ids + ex.answer_ids
        answers[tuple(full[:-1])] = [-100] * (len(ex.ids) - 1) + ex.answer_ids
    nll = passkey.answer_nll(OracleModel(TOK.vocab_size, answers), examples)
    assert sorted(nll) == [str(n) for n in sorted(LENGTHS)] and max(nll.values()) < 1e-6

    class UniformDigits:
        vocab_size = TOK.vocab_size

        def logits_chunks(self, ids):
            out = torch.full((*ids.shape, self.vocab_size), -1e4)
            out[..., TOK.encode(" 0123456789")] = 0.0
            yield 0, out

    flat = passkey.answer_nll(UniformDigits(), examples)
    assert all(abs(v - math.log(11)) < 1e-9 for v in flat.values()), flat


class QueryOracle(OracleModel):
    """An oracle that selects by query (like a SharedLLM with sharedllm_select=query): it checks that every prompt
    comes with its own question as query_ids, and records the queries it was given."""

    selects_by_query = True

    def __init__(self, vocab_size, answers, questions):
        super().__init__(vocab_size, answers)
        self.questions, self.seen = questions, []

    def generate(self, ids, max_new_tokens, eos_id=None, query_ids=None):
        assert query_ids is not None and query_ids.shape[0] == ids.shape[0]
        for row, q in zip(ids.tolist(), query_ids.tolist()):
            assert self.questions[tuple(row)] == tuple(q)
            self.seen.append(tuple(q))
        return super().generate(ids, max_new_tokens, eos_id)


def test_passkey_and_needle_hand_the_question_to_a_query_aware_model():
    for task, examples, kw in (("passkey", passkey.make_examples(TOK, LENGTHS, DEPTHS, trials=2, seed=0),
                                {"trials": 2}),
                               ("needle", needle.make_examples(TOK, LENGTHS, DEPTHS, seed=0), {})):
        assert all(TOK.decode(e.ids).endswith(TOK.decode(e.query)) and e.query for e in examples)
        model = QueryOracle(TOK.vocab_size, {tuple(e.ids): e.answer_ids for e in examples},
                            {tuple(e.ids): tuple(e.query) for e in examples})
        out = (passkey if task == "passkey" else needle).evaluate(model, TOK, LENGTHS, DEPTHS, seed=0, **kw)
        assert out["overall"] == 1.0 and "query" in out, task
        assert sorted(model.seen) == sorted(tuple(e.query) for e in examples)
        assert out["cell_trials"] == [[kw.get("trials", 1)] * len(DEPTHS)] * len(LENGTHS)
    examples = passkey.make_examples(TOK, LENGTHS, DEPTHS, seed=0)
    plain = passkey.evaluate(_oracle(examples), TOK, LENGTHS, DEPTHS, seed=0)
    assert plain["overall"] == 1.0 and "query" not in plain  # a model without query selection gets none


def test_mqar_accuracy_by_length():
    spec = mqar.MQARSpec(seq_len=32, num_kv_pairs=4, vocab_size=64)
    res = mqar.evaluate(RandomModel(64, range(32, 64), seed=0), spec, 16, lengths=[64, 8, 128])
    assert [p["seq_len"] for p in res["by_length"]] == [32, 64, 128]  # 8 < 4 x pairs: left out
    assert res["by_length"][0]["accuracy"] == res["accuracy"]
    assert all(p["queries"] == 16 * 4 and p["examples"] == 16 for p in res["by_length"])
    assert "by_length" not in mqar.evaluate(RandomModel(64, seed=0), spec, 4)
