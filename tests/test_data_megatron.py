"""Megatron-LM ``.bin``/``.idx`` corpora both ways, through megatron-core (skipped when it is not installed)."""

import json

import numpy as np
import pytest

from data_pipeline import TokenStore, export_megatron, prepare, train_tokenizer

pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core not installed (lightspan[megatron])")


def test_round_trip_through_megatron(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abc def\nghij()"), int(rng.integers(3, 900)))) for _ in range(50)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(texts, tmp_path / "t.model", vocab_size=290)
    first = prepare(str(tmp_path / "docs.jsonl"), tmp_path / "a", tokenizer=tok, num_workers=1, progress=False)

    prefix = export_megatron(first, tmp_path / "mega" / "corpus")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    a = TokenStore(first)
    assert len(ds) == len(a.documents) == 50
    np.testing.assert_array_equal(ds[3], a.read(*np.asarray(a.documents)[3]))

    # and back: the Megatron corpus prepared again gives the same tokens and documents (EOS is already there)
    second = prepare(prefix + ".bin", tmp_path / "b", tokenizer=tok, progress=False)
    b = TokenStore(second)
    np.testing.assert_array_equal(np.asarray(b.documents), np.asarray(a.documents))
    np.testing.assert_array_equal(b.read(0, b.num_tokens), a.read(0, a.num_tokens))
    assert b.manifest["source"]["kind"] == "megatron" and b.manifest["dtype"] == "uint16"

    # without a tokenizer the ids are kept as they are, vocabulary = largest id + 1
    third = prepare("megatron:" + prefix, tmp_path / "c", progress=False)
    c = TokenStore(third)
    assert c.manifest["tokenizer"] is None
    np.testing.assert_array_equal(c.read(0, c.num_tokens), a.read(0, a.num_tokens))


def test_missing_megatron_files_are_named(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"x\.idx is missing"):
        prepare("megatron:" + str(tmp_path / "x"), tmp_path / "out", progress=False)
