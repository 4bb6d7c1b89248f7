"""Hostile and careless input to the data pipeline (issue #17, data side).

Every case feeds one bad input to the real CLI (a subprocess of ``python -m pretrain.cli``) or to the library and
checks three things: it is refused (non-zero exit or the exception), the message names the cause (the file, the
key, the sizes), and a good prepared folder next to it is byte-identical afterwards (every file hashed before and
after, the dataset-decomposition index included). CLI cases also check that stderr holds no traceback.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import CorruptCorpusError, SourceError, TokenStore, \
    build_loader, prepare, verify_prepared

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
LOADER = dict(tokens_per_step=1024, min_log2=4, max_log2=8)


def _docs(n, seed):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 9))) for _ in range(400)]
    docs = []
    for _ in range(n):
        picked = rng.choice(words, int(rng.integers(20, 600)))
        docs.append("\n".join(" ".join(picked[i:i + 12]) for i in range(0, len(picked), 12)))  # lines of 12 words
    return docs


def _write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good prepared folder (tokenizer of VOCAB ids, several shards, a DD index) and its source."""
    root = tmp_path_factory.mktemp("good")
    src = _write_jsonl(root / "src" / "docs.jsonl", _docs(80, 0))
    out = prepare(str(src), root / "prepared", vocab_size=VOCAB, shard_tokens=20_000, num_workers=1,
                  progress=False)
    build_loader(out, **LOADER)  # writes dd_4_8/
    assert (out / "dd_4_8" / "meta.json").is_file()
    return out


@pytest.fixture()
def prepared(good, tmp_path):
    """A private copy of the good folder (its manifest still names the module's source)."""
    return Path(shutil.copytree(good, tmp_path / "prepared"))


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _no_staging_left(folder):
    folder = Path(folder)
    return not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and p.is_dir()]


def _lightspan(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("LIGHTSPAN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def _refused(res, *words):
    """Non-zero exit, no traceback, and a last stderr line naming every word."""
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    for word in words:
        assert word in last, (word, last)
    return last


def _prepare_cli(source, out, *extra, cwd):
    return _lightspan("prepare", "--source", source, "--out", out, "--vocab-size", VOCAB, "--workers", 1, *extra,
                      cwd=cwd)


# --- sources that cannot be read ------------------------------------------------------------------------------

def test_empty_jsonl_is_named_and_the_old_preparation_survives_overwrite(prepared, tmp_path):
    before = _hashes(prepared)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    last = _refused(_prepare_cli(empty, prepared, "--overwrite", cwd=tmp_path), "empty.jsonl", "is empty")
    assert "StopIteration" not in last
    assert _hashes(prepared) == before and _no_staging_left(prepared)


def test_non_utf8_names_the_file_line_and_offset_and_the_old_preparation_survives(prepared, tmp_path):
    before = _hashes(prepared)
    bad = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in _docs(5, 1)]
    lines[3] = b'{"text": "caf\xe9 au lait"}\n'  # Latin-1, not UTF-8
    bad.write_bytes(b"".join(lines))
    offset = sum(len(x) for x in lines[:3]) + len(b'{"text": "caf')
    _refused(_prepare_cli(bad, prepared, "--overwrite", cwd=tmp_path), "latin1.jsonl", "not valid UTF-8",
             "line 4", f"byte offset {offset}", "0xe9")
    assert _hashes(prepared) == before and _no_staging_left(prepared)


def test_invalid_json_line_names_the_line(tmp_path):
    bad = _write_jsonl(tmp_path / "broken.jsonl", _docs(4, 2))
    bad.write_text(bad.read_text() + '{"text": unquoted}\n')
    with pytest.raises(SourceError, match=r"broken\.jsonl: line 5 is not valid JSON"):
        prepare(str(bad), tmp_path / "out", vocab_size=VOCAB, num_workers=1, progress=False)
    assert not (tmp_path / "out").exists() and _no_staging_left(tmp_path / "out")


def test_no_text_in_the_column_names_the_field(tmp_path):
    src = tmp_path / "blank.jsonl"
    src.write_text('{"text": ""}\n{"text": ""}\n')
    res = _prepare_cli(src, tmp_path / "out", cwd=tmp_path)
    _refused(res, "yielded no documents", "'text'", "--text-field")
    res = _prepare_cli(_write_jsonl(tmp_path / "ok.jsonl", _docs(3, 3)), tmp_path / "out", "--text-field", "body",
                       cwd=tmp_path)
    _refused(res, "ok.jsonl", "no column 'body'", "--text-field")


@pytest.mark.parametrize("spec", ["./data/mising.jsonl", "data/mising.jsonl", "mising.jsonl",
                                  "data/sub/mising", "corpus.parquet"])
def test_mistyped_local_path_says_no_such_file_not_hub(tmp_path, spec):
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "missing.jsonl", ["a real file next to the typo"])
    last = _refused(_prepare_cli(spec, tmp_path / "out", cwd=tmp_path), repr(spec), "no such file")
    assert "Hub" not in last and "ConnectionError" not in last
    if spec.endswith("mising.jsonl") and "/" in spec:
        assert "did you mean" in last and "missing.jsonl" in last
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_tokenizer_is_named(prepared, tmp_path, good):
    before = _hashes(prepared)
    fake = tmp_path / "tok.model"
    fake.write_bytes(b"not a sentencepiece model")
    src = good.parent / "src" / "docs.jsonl"
    res = _lightspan("prepare", "--source", src, "--out", prepared, "--tokenizer", fake, "--overwrite",
                     cwd=tmp_path)
    _refused(res, "tok.model", "not a sentencepiece model")
    assert _hashes(prepared) == before


# --- output folders -------------------------------------------------------------------------------------------

def test_output_folder_overlapping_the_source_is_refused(good, tmp_path):
    src_dir = tmp_path / "raw"
    src = _write_jsonl(src_dir / "docs.jsonl", _docs(3, 4))
    before = _hashes(tmp_path)
    _refused(_prepare_cli(src_dir, src_dir / "prepared", cwd=tmp_path), "inside the source folder")
    _refused(_prepare_cli(src, tmp_path, "--overwrite", cwd=tmp_path), "contains the source", "docs.jsonl")
    _refused(_prepare_cli(src_dir, src_dir, "--overwrite", cwd=tmp_path), "is the source")
    assert _hashes(tmp_path) == before and not (src_dir / "prepared").exists()


def test_output_folder_with_foreign_files_is_refused(prepared, good, tmp_path):
    (prepared / "NOTES.md").write_text("my notes")
    before = _hashes(prepared)
    src = _write_jsonl(tmp_path / "other.jsonl", _docs(5, 5))
    _refused(_prepare_cli(src, prepared, "--overwrite", cwd=tmp_path), "NOTES.md", "did not write")
    assert _hashes(prepared) == before


def test_failure_after_the_shards_are_written_leaves_the_old_folder(prepared, tmp_path, monkeypatch):
    import data_pipeline.preparation as prep_module

    before = _hashes(prepared)

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep_module, "save_npy_atomic", crash)  # after the tokenizer and shards, before the index
    src = _write_jsonl(tmp_path / "new.jsonl", _docs(30, 6))
    with pytest.raises(OSError, match="No space left"):
        prepare(str(src), prepared, vocab_size=VOCAB, num_workers=1, overwrite=True, progress=False)
    assert _hashes(prepared) == before and _no_staging_left(prepared)
    verify_prepared(prepared)


def test_overwrite_swaps_in_a_complete_preparation(prepared, tmp_path):
    src = _write_jsonl(tmp_path / "new.jsonl", _docs(7, 7))
    held = TokenStore(prepared)  # a reader of the old folder keeps its (now unlinked) files
    old_first = held.read(0, 50).copy()
    with pytest.raises(FileExistsError, match=r"different preparation: source .*new\.jsonl.* --overwrite"):
        prepare(str(src), prepared, vocab_size=VOCAB, num_workers=1, progress=False)
    prepare(str(src), prepared, vocab_size=VOCAB, num_workers=1, overwrite=True, progress=False)
    assert json.loads((prepared / "manifest.json").read_text())["num_documents"] == 7
    assert not (prepared / "dd_4_8").exists() and _no_staging_left(prepared)
    verify_prepared(prepared)
    np.testing.assert_array_equal(held.read(0, 50), old_first)


def test_a_swap_killed_between_its_two_renames_is_undone_by_the_next_run(prepared, good, tmp_path, monkeypatch):
    """Where the file system has no atomic exchange the swap is two renames; a run killed between them leaves
    the old preparation aside, and the next run puts it back."""
    import data_pipeline.preparation as prep_module

    before = _hashes(prepared)
    real_rename = os.rename
    calls = []

    def rename_then_die(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after moving the old folder aside
        real_rename(a, b)

    monkeypatch.setattr(prep_module, "_exchange", lambda a, b: False)
    monkeypatch.setattr(prep_module.os, "rename", rename_then_die)
    src = _write_jsonl(tmp_path / "new.jsonl", _docs(20, 8))
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), prepared, vocab_size=VOCAB, num_workers=1, overwrite=True, progress=False)
    monkeypatch.undo()
    assert not prepared.exists() and len([p for p in tmp_path.iterdir() if ".old-" in p.name]) == 1
    # the next run (here: the original preparation again) restores the old folder and finds it current
    prepare(str(good.parent / "src" / "docs.jsonl"), prepared, vocab_size=VOCAB, shard_tokens=20_000,
            num_workers=1, progress=False)
    assert _hashes(prepared) == before and _no_staging_left(prepared)


# --- manifests ------------------------------------------------------------------------------------------------

def test_manifest_not_json_names_it_and_says_prepare(prepared, tmp_path):
    (prepared / "manifest.json").write_text('{"format": "lightspan-tokens/1", "shards": [')
    before = _hashes(prepared)
    _refused(_lightspan("data", "stats", prepared, cwd=tmp_path), "manifest.json", "not valid JSON", "prepare")
    assert _hashes(prepared) == before


@pytest.mark.parametrize("drop", ["shards", "dtype", "documents"])
def test_manifest_missing_key_names_the_key(prepared, tmp_path, drop):
    manifest = json.loads((prepared / "manifest.json").read_text())
    del manifest[drop]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    before = _hashes(prepared)
    _refused(_lightspan("data", "stats", prepared, cwd=tmp_path), "manifest.json", f"no {drop!r} key",
             "prepare")
    assert _hashes(prepared) == before


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/tokens_00000.bin", ".."])
def test_manifest_file_names_must_stay_inside_the_folder(prepared, tmp_path, name, monkeypatch):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    opened = []
    real_memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda f, *a, **k: opened.append(f) or real_memmap(f, *a, **k))
    for call in (lambda: build_loader(prepared, **LOADER), lambda: verify_prepared(prepared)):
        with pytest.raises(CorruptCorpusError, match=f"file name {name!r}.*not a plain name"):
            call()
    assert not opened
    _refused(_lightspan("data", "stats", prepared, cwd=tmp_path), repr(name), "not a plain name")


# --- token data at train time ---------------------------------------------------------------------------------

def test_flipped_bytes_give_out_of_vocab_ids_and_are_refused(prepared):
    shard = prepared / "tokens_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10:12] = (0xBEEF).to_bytes(2, "little")  # id 48879, far beyond the 300-id tokenizer
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCorpusError, match=r"tokens_00001\.bin holds token id 48879.*vocabulary size is 300"):
        build_loader(prepared, vocab_size=VOCAB, verify="size", **LOADER)
    build_loader(prepared, verify="size", **LOADER)  # without the model's vocabulary nothing is checked


def test_model_vocab_smaller_than_the_tokenizer_is_refused_at_load(prepared):
    store = TokenStore(prepared)
    top = max(int(s.max()) for s in store.shards)
    build_loader(prepared, vocab_size=top + 1, **LOADER)  # every id fits
    with pytest.raises(CorruptCorpusError, match=rf"holds token id {top}, but the model's vocabulary size is "
                                                 rf"{top}.*raise model.vocab_size to at least {VOCAB}"):
        build_loader(prepared, vocab_size=top, **LOADER)


def test_corrupt_shard_is_caught_by_the_default_lazy_hash_on_first_read(prepared):
    shard = prepared / "tokens_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[[5, 6]] = tokens[[6, 5]] if tokens[5] != tokens[6] else (tokens[5], (tokens[6] + 1) % VOCAB)
    tokens.tofile(shard)  # same size, ids still in range: only the hash can tell
    loader = build_loader(prepared, vocab_size=VOCAB, **LOADER)  # opens: sizes and id range are fine
    with pytest.raises(CorruptCorpusError, match=r"tokens_00000\.bin is corrupt: its sha256 differs"):
        for _ in range(loader.steps_per_epoch):
            next(loader)


# --- the dataset-decomposition index ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["bucket", "meta"])
def test_damaged_dd_index_is_rebuilt_with_a_warning(prepared, good, damage):
    before = _hashes(prepared)
    if damage == "bucket":
        bucket = prepared / "dd_4_8" / "bucket_06.npy"
        data = bytearray(bucket.read_bytes())
        data[-8:] = (10 ** 9).to_bytes(8, "little")  # a piece start far past the stream
        bucket.write_bytes(bytes(data))
        match = r"bucket_06\.npy does not match the sha256"
    else:
        (prepared / "dd_4_8" / "meta.json").write_text("{broken")
        match = r"meta\.json is unreadable"
    with pytest.warns(RuntimeWarning, match=match):
        loader = build_loader(prepared, **LOADER)
    next(loader)
    assert _hashes(prepared) == before  # rebuilt byte-identical to the good index


# --- a changed model vocabulary -------------------------------------------------------------------------------

def test_smaller_model_vocab_names_both_sizes_and_both_fixes(prepared, good, tmp_path):
    before = _hashes(prepared)
    src = good.parent / "src" / "docs.jsonl"
    res = _lightspan("prepare", "--source", src, "--out", prepared, "--vocab-size", 290, "--workers", 1,
                     cwd=tmp_path)
    _refused(res, "vocabulary of 300", "vocabulary of 290", "data.prepared_dir", "--vocab-size 290 --overwrite")
    assert _hashes(prepared) == before


def test_larger_model_vocab_is_padding_not_another_preparation(prepared, good, capsys):
    before = _hashes(prepared)
    src = good.parent / "src" / "docs.jsonl"
    prepare(str(src), prepared, vocab_size=VOCAB + 20, shard_tokens=20_000, num_workers=1, progress=False)
    out = capsys.readouterr().out
    assert "padding" in out and "nothing to do" in out
    assert _hashes(prepared) == before
    build_loader(prepared, vocab_size=VOCAB + 20, **LOADER)
