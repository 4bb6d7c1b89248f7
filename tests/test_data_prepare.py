"""Sources, tokenizer, and ``prepare``: content, no-op re-runs, clean restarts, and clear errors on damage."""

import json

import numpy as np
import pytest

from data_pipeline import CorruptCorpusError, TokenStore, build_loader, load_tokenizer, prepare, stdlib_files, \
    train_tokenizer, verify_prepared
from data_pipeline.cli import prepare_main, stats_main
from data_pipeline.sources import open_source


def _texts(n=120, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz \n    ():=é"))
    return ["".join(rng.choice(letters, int(rng.integers(5, 4000)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(_texts(), tmp_path_factory.mktemp("tok") / "tiny.model", vocab_size=320)


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "src" / "docs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in _texts()))
    return path


def _prep(src, out, tok, **kw):
    kw.setdefault("text_field", "body")
    return prepare(str(src), out, tokenizer=tok, num_workers=1, progress=False, **kw)


def test_tokenizer_round_trip_and_ids(tok, tmp_path):
    text = "def f(x):\n    return x  # é ü\n"
    assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback keep code exact
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.vocab_size == 320
    again = load_tokenizer(tok.path)
    assert again.sha256 == tok.sha256 and again.encode(text) == tok.encode(text)


def test_prepare_writes_documents_with_eos(tok, jsonl, tmp_path):
    out = _prep(jsonl, tmp_path / "p", tok, shard_tokens=10_000)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["num_documents"] == 120 and len(m["shards"]) > 1
    assert m["tokenizer"]["sha256"] == tok.sha256 and load_tokenizer(out).sha256 == tok.sha256
    store = TokenStore(out, verify="sha256")
    texts = _texts()
    for d, (start, length) in enumerate(np.asarray(store.documents)):
        ids = store.read(start, length)
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[:-1]) == texts[d]


def test_rerun_is_a_noop_and_other_input_is_refused(tok, jsonl, tmp_path, capsys):
    out = _prep(jsonl, tmp_path / "p", tok)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _prep(jsonl, out, tok)
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # a changed source is another preparation: refused without overwrite, rebuilt with it
    jsonl.write_text(json.dumps({"body": "just one document"}) + "\n")
    with pytest.raises(FileExistsError, match="overwrite"):
        _prep(jsonl, out, tok)
    _prep(jsonl, out, tok, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["num_documents"] == 1


def test_parallel_workers_write_identical_shards(tok, jsonl, tmp_path):
    one = _prep(jsonl, tmp_path / "one", tok)
    two = prepare(str(jsonl), tmp_path / "two", tokenizer=tok, text_field="body", num_workers=2, progress=False)
    sha = lambda d: [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]
    assert sha(one) == sha(two)


def test_an_interrupted_run_restarts_cleanly(tok, jsonl, tmp_path, monkeypatch):
    import data_pipeline.preparation as prep_module

    out = tmp_path / "p"
    real = prep_module.save_npy_atomic

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_module, "save_npy_atomic", crash)  # dies after the shards, before the manifest
    with pytest.raises(KeyboardInterrupt):
        _prep(jsonl, out, tok)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p.prepare.lock", "src"]  # the staging folder is gone
    # what a killed run leaves: its staging folder (and, from before staging, partial files in the folder)
    killed = tmp_path / ".p.prepare-otherhost-123"
    killed.mkdir()
    (killed / "tokens_00000.bin.tmp").write_bytes(b"partial")
    out.mkdir()
    (out / "tokens_00007.bin.tmp").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="prepare"):
        build_loader(out, tokens_per_step=1024, min_log2=4, max_log2=8)
    monkeypatch.setattr(prep_module, "save_npy_atomic", real)
    _prep(jsonl, out, tok)
    assert not list(out.glob("*.tmp")) and not killed.exists()
    verify_prepared(out)


def test_truncated_or_corrupt_shard_names_the_file_and_the_fix(tok, jsonl, tmp_path):
    out = _prep(jsonl, tmp_path / "p", tok, shard_tokens=10_000)
    shard = out / "tokens_00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCorpusError, match=r"tokens_00001\.bin is corrupt.*--overwrite"):
        verify_prepared(out)
    with pytest.raises(CorruptCorpusError, match=r"tokens_00001\.bin is corrupt"):
        build_loader(out, tokens_per_step=1024, min_log2=4, max_log2=8, verify="sha256")
    shard.write_bytes(bytes(data[:-6]))
    with pytest.raises(CorruptCorpusError, match=r"tokens_00001\.bin is truncated.*bytes, the manifest says"):
        build_loader(out, tokens_per_step=1024, min_log2=4, max_log2=8)
    # a re-run of prepare notices the damage instead of calling the folder current
    with pytest.raises(CorruptCorpusError):
        _prep(jsonl, out, tok, shard_tokens=10_000)


def test_tokenizer_mismatch_is_refused(tok, jsonl, tmp_path):
    out = _prep(jsonl, tmp_path / "p", tok)
    other = train_tokenizer(_texts(seed=1), tmp_path / "other.model", vocab_size=300)
    with pytest.raises(CorruptCorpusError, match="tokenizer mismatch.*prepared with tokenizer sha256"):
        build_loader(out, tokens_per_step=1024, min_log2=4, max_log2=8, tokenizer=other.path)
    with pytest.raises(FileExistsError, match="different preparation"):
        _prep(jsonl, out, other)
    other.save(out / "tokenizer.model")  # someone swapped the tokenizer file
    with pytest.raises(CorruptCorpusError, match=r"tokenizer mismatch: .*tokenizer\.model"):
        build_loader(out, tokens_per_step=1024, min_log2=4, max_log2=8)


def test_local_text_and_parquet_sources(tmp_path):
    import datasets

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document\nline two\n")
    (tmp_path / "a" / "two.txt").write_text("second")
    assert list(open_source(str(tmp_path / "a")).texts()) == ["first document\nline two\n", "second"]
    datasets.Dataset.from_dict({"content": ["x = 1", "y = 2"]}).to_parquet(str(tmp_path / "t.parquet"))
    assert list(open_source(str(tmp_path / "t.parquet"), text_field="content").texts()) == ["x = 1", "y = 2"]
    with pytest.raises(KeyError, match="--text-field"):
        list(open_source(str(tmp_path / "t.parquet")).texts())
    with pytest.raises(FileNotFoundError):
        open_source("./no/such/file.jsonl")


def test_stdlib_corpus(tok, tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
    out = prepare("stdlib", tmp_path / "std", tokenizer=tok, max_documents=30, num_workers=1, progress=False)
    store = TokenStore(out)
    start, length = np.asarray(store.documents)[7]
    assert tok.decode(store.read(start, length - 1)) == files[7].read_bytes().decode("utf-8", "replace")


def test_cli_prepare_and_stats(tok, jsonl, tmp_path, capsys):
    out = tmp_path / "cli"
    assert prepare_main(["--source", str(jsonl), "--out", str(out), "--tokenizer", tok.path,
                         "--text-field", "body", "--workers", "1", "--verify"]) == 0
    assert str(out) in capsys.readouterr().out
    assert stats_main([str(out), "--json", "--tokens-per-step", "1024", "--min-log2", "4", "--max-log2", "8"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["documents"] == 120 and sum(b["tokens"] for b in s["buckets"].values()) + s["dropped_tokens"] == s["tokens"]
    assert stats_main([str(out)]) == 0 and "steps per epoch" in capsys.readouterr().out
    assert prepare_main(["--source", str(tmp_path / "nothing.jsonl"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_megatron_missing_gives_the_install_hint(monkeypatch, tmp_path):
    import sys

    from data_pipeline import MegatronNotInstalled
    from data_pipeline.megatron_io import iter_megatron_documents

    monkeypatch.setitem(sys.modules, "megatron.core.datasets", None)  # as if megatron-core were absent
    with pytest.raises(MegatronNotInstalled, match=r"pip install 'lightspan\[megatron\]'"):
        next(iter_megatron_documents(str(tmp_path / "x")))


def test_concurrent_prepares_of_one_folder_take_turns(tok, jsonl, tmp_path, capsys):
    import threading

    errors = []

    def run():
        try:
            _prep(jsonl, tmp_path / "shared", tok)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    out = capsys.readouterr().out
    assert out.count("[prepare] wrote") == 1 and out.count("nothing to do") == 1
    verify_prepared(tmp_path / "shared")
