"""The synthetic long-context source (data.source: synthetic:retrieval): deterministic from its seed, a held-out split
disjoint from training by content, the configured retrieval share, facts before their questions at the configured
distances, evaluation prompts of the same format, and `lightspan prepare --config` + training on it."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import load_tokenizer, prepare, retrieval_prompts, score_generation
from data_pipeline.synthetic import HOP_QUESTION, INGREDIENTS, KINDS, NEEDLE_INTRO, PASSKEY_INTRO, \
    SyntheticOptions, open_synthetic, split_of

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(documents=160, fraction=0.4, keys=4, min_distance=32, max_distance=300)
HOLDOUT = 16


def _prepare(out, **kw):
    kw.setdefault("vocab_size", 512)
    return prepare("synthetic:retrieval", out, num_workers=1, progress=False, holdout_docs=HOLDOUT, **kw)


def _docs(folder):
    """(training document token arrays, held-out ones) of a prepared folder, EOS included."""
    tokens = np.fromfile(folder / "tokens_00000.bin", dtype=np.uint16)
    return [[tokens[s:s + n] for s, n in np.load(folder / name)] for name in ("documents.npy", "heldout.npy")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    _prepare(root / "a", synthetic=dict(OPTS, seed=0))
    _prepare(root / "b", synthetic=dict(OPTS, seed=0))  # a second preparation from scratch, tokenizer included
    _prepare(root / "c", synthetic=dict(OPTS, seed=1), tokenizer=root / "a" / "tokenizer.model")
    return root


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / "a")


@pytest.fixture(scope="module")
def records(tok):
    """The documents of folder a regenerated: (body, record) each, in order."""
    src = open_synthetic("synthetic:retrieval", dict(OPTS, seed=0)).with_holdout({"documents": HOLDOUT})
    return list(src.documents(tok))


def test_same_seed_gives_byte_identical_shards_and_another_seed_differs(prepared):
    a, b, c = prepared / "a", prepared / "b", prepared / "c"
    for name in ("tokens_00000.bin", "documents.npy", "heldout.npy", "tokenizer.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert ma["source"]["options"]["seed"] == 0 and ma["source"]["kind"] == "synthetic"
    # seed 1, same tokenizer: other documents (and other facts in them)
    assert (a / "tokens_00000.bin").read_bytes() != (c / "tokens_00000.bin").read_bytes()
    tok = load_tokenizer(a)
    texts_a = {tok.decode(d.tolist()) for d in _docs(a)[0]}
    texts_c = {tok.decode(d.tolist()) for d in _docs(c)[0]}
    assert not texts_a & texts_c
    # re-running on the same folder is a no-op; other options are another preparation, named in the refusal
    _prepare(a, synthetic=dict(OPTS, seed=0))
    with pytest.raises(FileExistsError, match="data.synthetic_fraction 0.4 there, 0.5 asked for"):
        _prepare(a, synthetic=dict(OPTS, seed=0, fraction=0.5))


def test_prepared_documents_are_the_generated_ones(prepared, tok, records):
    train, held = _docs(prepared / "a")
    assert len(train) + len(held) == OPTS["documents"] and len(held) == HOLDOUT
    gen_train = [b for b, r in records if r["split"] == "train"]
    gen_held = [b for b, r in records if r["split"] == "heldout"]
    assert len(gen_held) == HOLDOUT
    for stored, body in zip(train + held, gen_train + gen_held):
        assert stored[-1] == tok.eos_id and np.array_equal(stored[:-1], body)


def test_heldout_split_is_disjoint_from_training(prepared, tok, records):
    train, held = _docs(prepared / "a")
    train_text = "\n".join(tok.decode(d[:-1].tolist()) for d in train)
    held_records = [r for _, r in records if r["split"] == "heldout"]
    train_records = [r for _, r in records if r["split"] == "train"]
    held_facts = [f for r in held_records for f in r["facts"]]
    assert len(held_facts) >= 5  # the held-out split does hold retrieval documents
    held_text = "\n".join(tok.decode(d[:-1].tolist()) for d in held)
    train_values = {v for r in train_records for v in r["answers"]}
    for r in held_records:
        for fact in r["facts"]:
            assert fact in held_text  # where the record says it is ...
            assert fact not in train_text  # ... and in no training document
        for value in r["answers"]:
            if value.isdigit():  # a key (a needle's ingredient is one of 16: its whole triple is the fact)
                assert value not in train_values
                assert not re.search(rf"(pass key|holds)[^\n]*\b{value}\b", train_text)
    # the plain text too: held-out documents read other corpus files than training documents
    assert not {f for r in held_records for f in r["files"]} & {f for r in train_records for f in r["files"]}
    for r in held_records:
        assert all(split_of("file/" + f) == "heldout" for f in r["files"])


def test_retrieval_share_matches_the_config():
    for fraction in (0.3, 0.75):
        src = open_synthetic("synthetic:retrieval", dict(documents=1000, fraction=fraction, seed=3,
                                                         min_distance=32, max_distance=300))
        kinds = [text.startswith((PASSKEY_INTRO, NEEDLE_INTRO)) for text, _ in src.documents(None)]
        assert abs(sum(kinds) / len(kinds) - fraction) <= 0.01


def test_retrieval_token_share_and_kinds(records):
    retrieval = sum(r["length"] for _, r in records if r["kind"] != "plain")
    share = retrieval / sum(r["length"] for _, r in records)
    assert abs(share - OPTS["fraction"]) < 0.06, share  # 160 documents: plain and retrieval lengths drawn alike
    assert {r["kind"] for _, r in records} == {"plain", *KINDS}


def test_questions_follow_their_facts_at_the_configured_distances(tok, records):
    lo, hi = OPTS["min_distance"], OPTS["max_distance"]
    for body, r in records:
        assert r["length"] == len(body) + 1 and r["length"] & (r["length"] - 1) == 0  # 2^k with its EOS
        assert all(lo <= d <= hi for d in r["distances"]), r
        if r["kind"] == "plain":
            continue
        text = tok.decode(body.tolist())
        assert text.startswith(NEEDLE_INTRO if r["kind"] == "needle" else PASSKEY_INTRO)
        if r["kind"] == "multikey":
            facts = {m.group(1): (m.group(2), m.start()) for m in
                     re.finditer(r"The pass key for (\w+ \w+) is (\d{5})\. Remember it\.\n", text)}
            questions = list(re.finditer(r"\nWhat is the pass key for (\w+ \w+)\? The pass key for \1 is (\d{5})\.\n",
                                         text))
            assert len(questions) == len(facts) == len(r["questions"]) >= 1
            for q in questions:
                value, at = facts[q.group(1)]
                assert q.group(2) == value and q.start() > at
        if r["kind"] == "multihop":
            for a, b in zip(r["questions"], r["answers"]):
                q = text.index(HOP_QUESTION.format(a=a))
                link = re.search(rf"{a} points to (\w+ \w+)\.\n", text)  # a fact may sit mid-line (no line
                value = re.search(rf"{link.group(1)} holds (\d{{5}})\.\n", text)  # start within TOL tokens)
                assert value.group(1) == b and max(link.start(), value.start()) < q
                assert f"{a} points to {link.group(1)}. {link.group(1)} holds {b}." in text[q:]


def test_evaluation_prompts(tok):
    from evaluation.retrieval import Example

    for kind in KINDS:
        prompts = retrieval_prompts(tok, [128, 512], [0.0, 0.5, 1.0], kind=kind, trials=2, seed=5)
        again = retrieval_prompts(tok, [128, 512], [0.0, 0.5, 1.0], kind=kind, trials=2, seed=5)
        assert [p.ids for p in prompts] == [p.ids for p in again]
        assert {p.length for p in prompts} >= {512}
        for p in prompts:
            assert len(p.ids) == p.length
            text = tok.decode(p.ids)
            assert text.startswith(NEEDLE_INTRO if kind == "needle" else PASSKEY_INTRO)
            last = text.rsplit("\n", 1)[1]  # the prompt ends with the question, where the answer starts
            assert last.startswith("What ") and last.endswith((" is", " points to")) and p.meta["question"] in last
            assert score_generation(p, tok.decode(p.answer_ids))  # the oracle is right ...
            assert not score_generation(p, " 00000 nothing")  # ... a wrong answer is not
            if p.answer.isdigit():
                assert p.answer in text and split_of(f"value/{p.answer}") == "heldout"  # never a training value
            else:
                assert p.answer in INGREDIENTS and p.answer in text
            Example(**dataclasses.asdict(p))  # the evaluation side's record
        by_depth = {p.depth: p.meta["distance"] for p in prompts if p.length == 512 and p.trial == 0}
        if kind != "multihop":  # depth places the asked fact: deeper = closer to the question
            assert by_depth[0.0] > by_depth[0.5] > by_depth[1.0]


def test_wording_matches_the_evaluation_tasks(tok):
    from evaluation import needle, passkey
    from data_pipeline import synthetic

    assert synthetic.PASSKEY_INTRO == passkey.INTRO and synthetic.NEEDLE_INTRO == needle.INTRO
    assert passkey.NEEDLE.format(key="12345").strip() == synthetic.PASSKEY_FACT.format(value="12345")
    assert passkey.QUESTION.strip() == synthetic.PASSKEY_QUESTION
    assert (synthetic.COLORS, synthetic.DISHES, synthetic.INGREDIENTS) == \
        (needle.COLORS, needle.DISHES, needle.INGREDIENTS)
    ex = needle.make_examples(tok, [256], [0.5])[0]
    color, dish = ex.meta["question"].split()
    text = " ".join(tok.decode(ex.ids).split())
    assert synthetic.NEEDLE_FACT.format(color=color, dish=dish, ingredient=ex.answer) in text
    assert text.endswith(synthetic.NEEDLE_QUESTION.format(color=color, dish=dish))


def test_bad_options_are_refused(tmp_path):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.synthetic_fraction"):
        load_config(None, ["--data.synthetic_fraction=1.5"])
    with pytest.raises(ValueError, match="data.synthetic_max_distance"):
        SyntheticOptions.from_dict({"min_distance": 100, "max_distance": 10})
    with pytest.raises(ValueError, match="data.synthetic_kinds"):
        SyntheticOptions.from_dict({"kinds": ["passkey", "riddle"]})
    with pytest.raises(ValueError, match="unknown synthetic source"):
        open_synthetic("synthetic:riddles")
    with pytest.raises(ValueError, match="without --shard"):
        prepare("synthetic:retrieval", tmp_path / "s", shard=0, num_shards=2, tokenizer=None)


def test_prepare_cli_then_train_three_steps(tmp_path):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    config = tmp_path / "synthetic.yaml"
    config.write_text(
        "model: {vocab_size: 512, dim: 32, layers: 2, heads: 2, glu_dim: 64, attn_backend: chunked}\n"
        f"data: {{prepared_dir: {tmp_path / 'prepared'}, min_log2: 5, max_log2: 9, tokens_per_step: 1024,"
        " cycles: 2, workers: 1, holdout_docs: 8, synthetic_documents: 120, synthetic_fraction: 0.5,"
        " synthetic_min_distance: 32, synthetic_max_distance: 300, synthetic_seed: 7}\n"
        f"train: {{lr: 1.0e-2, warmup_steps: 2, device: cpu, steps: 3, out_dir: {tmp_path / 'run'}}}\n"
        "log: {every: 1}\n")
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", "prepare", "--config", str(config),
                          "--data.source=synthetic:retrieval"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["source"]["options"]["documents"] == 120 and manifest["source"]["options"]["seed"] == 7
    assert manifest["num_documents"] == 112 and manifest["heldout"]["num_documents"] == 8
    created = manifest["created"]
    cfg = load_config(config, ["--data.source=synthetic:retrieval"])
    losses = Trainer(cfg).train()
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 5.0  # about ln(512) = 6.24 at init
    # training read the preparation made by `lightspan prepare` (nothing re-prepared)
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["created"] == created
