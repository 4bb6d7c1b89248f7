"""Data at pretraining scale (issue #15): sharded preparation + merge, any tokenizer, mixtures, a held-out split.

- 3 shards + merge equal a one-process preparation (by file: the same documents in the same order, the same token
  stream; by document for one file: the same multiset of documents), the same DD bucket table from `data stats`;
- a shard SIGKILLed while it writes, run again, is byte-identical; merge refuses a missing, unfinished or corrupt
  shard, naming it; manifest paths may name shard_NNNNN/ files, never '..' or absolute paths;
- a Hugging Face tokenizer.json built here with `tokenizers` prepares, trains 3 steps, exports with
  `convert --to hf`, and AutoTokenizer from the export gives the same ids;
- a 0.8/0.2 mixture gives 80/20 tokens and resumes exactly mid-cycle, also on another dp size;
- a held-out split is never read by either loader and is what evaluation's perplexity reads;
- launch/slurm/prepare.sbatch passes shellcheck and, under stub sbatch/srun (array of 2 + merge), writes the same
  folder as the in-process shards.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import CorruptCorpusError, TokenStore, build_loader, merge_shards, prepare, prepare_mixture, \
    stdlib_files, stats, train_tokenizer
from data_pipeline.cli import prepare_main, stats_main
from data_pipeline.shards import check_file_name

REPO = Path(__file__).resolve().parents[1]
TPS, LO, HI = 1024, 4, 8
SHARD_TOKENS = 20_000  # several token files per shard


def _texts(n, skip=0, seed=0):
    rng = random.Random(seed)
    return [p.read_text(errors="replace")[: rng.choice([300, 1000, 3000])] for p in stdlib_files()[skip:skip + n]]


def _jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of 6 jsonl files (240 documents), a one-process preparation and a 3-shard one (+ merge)."""
    root = tmp_path_factory.mktemp("scale")
    texts = _texts(240)
    for k in range(6):
        _jsonl(root / "src" / f"part{k}.jsonl", texts[k * 40:(k + 1) * 40])
    tok = train_tokenizer(texts[:120], root / "tok.model", vocab_size=384)
    common = dict(tokenizer=str(root / "tok.model"), num_workers=1, progress=False, shard_tokens=SHARD_TOKENS)
    one = prepare(str(root / "src"), root / "one", **common)
    for i in (2, 0, 1):  # any order
        prepare(str(root / "src"), root / "three", shard=i, num_shards=3, **common)
    merge_shards(root / "three")
    return {"root": root, "src": root / "src", "tok": tok, "one": one, "three": root / "three", "common": common,
            "texts": texts}


def _stats_json(folder, capsys):
    capsys.readouterr()
    assert stats_main([str(folder), "--json", "--tokens-per-step", str(TPS), "--min-log2", str(LO),
                       "--max-log2", str(HI)]) == 0
    return json.loads(capsys.readouterr().out)


def _docs(store):
    return [tuple(store.read(int(s), int(n)).tolist()) for s, n in np.asarray(store.documents)]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".") and "dd_" not in p.as_posix()}


def test_three_shards_merged_equal_one_process(data, capsys):
    one, three = TokenStore(data["one"], verify="sha256"), TokenStore(data["three"], verify="sha256")
    # by file: shard order is source order, so documents, offsets and the whole stream are identical
    np.testing.assert_array_equal(np.asarray(three.documents), np.asarray(one.documents))
    np.testing.assert_array_equal(three.read(0, three.num_tokens), one.read(0, one.num_tokens))
    manifest = json.loads((data["three"] / "manifest.json").read_text())
    assert manifest["merged"]["num_shards"] == 3 and manifest["merged"]["slice_by"] == "file"
    assert all(s["file"].startswith("shard_0000") for s in manifest["shards"])  # listed, not copied
    assert not list(data["three"].glob("tokens_*.bin"))
    a, b = _stats_json(data["one"], capsys), _stats_json(data["three"], capsys)
    assert (a["documents"], a["tokens"], a["buckets"], a["dropped_tokens"]) == \
        (b["documents"], b["tokens"], b["buckets"], b["dropped_tokens"])
    assert b["merged_shards"] == 3
    # the loaders read the same batches from either
    x, y = (build_loader(d, tokens_per_step=TPS, min_log2=LO, max_log2=HI, seed=3) for d in (data["one"], data["three"]))
    for _ in range(5):
        torch.testing.assert_close(next(x)["input_ids"], next(y)["input_ids"])
    # the training path takes the merged folder as current for its source (no re-tokenizing)
    prepare(str(data["src"]), data["three"], vocab_size=512, num_workers=1, progress=False)
    assert "nothing to do" in capsys.readouterr().out


def test_one_file_is_sharded_by_document(data, tmp_path, capsys):
    src = _jsonl(tmp_path / "one.jsonl", data["texts"][:50])
    common = dict(data["common"])
    one = TokenStore(prepare(str(src), tmp_path / "one", **common))
    for i in range(3):
        prepare(str(src), tmp_path / "three", shard=i, num_shards=3, **common)
    assert prepare_main(["--merge", str(tmp_path / "three"), "--workers", "2"]) == 0
    three = TokenStore(tmp_path / "three", verify="sha256")
    assert Counter(_docs(three)) == Counter(_docs(one)) and three.num_tokens == one.num_tokens
    # the merged order is shard order: shard i holds documents i, i+3, i+6, ...
    order = [i + 3 * j for i in range(3) for j in range(len(range(i, 50, 3)))]
    assert _docs(three) == [_docs(one)[d] for d in order]
    a, b = _stats_json(tmp_path / "one", capsys), _stats_json(tmp_path / "three", capsys)
    assert (a["tokens"], a["buckets"]) == (b["tokens"], b["buckets"])


KILLER = """
import os, signal, sys
import data_pipeline.shards as shards
real, calls = shards.ShardWriter.add, [0]
def add(self, tokens, lengths):
    real(self, tokens, lengths)
    calls[0] += 1
    if calls[0] == 2:  # mid-way: some token files written, more to come
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.add = add
from data_pipeline.cli import prepare_main
sys.exit(prepare_main(sys.argv[1:]))
"""


def test_a_shard_killed_mid_way_reruns_byte_identical(data, tmp_path):
    out = tmp_path / "k"
    args = ["--source", str(data["src"]), "--out", str(out), "--tokenizer", str(data["root"] / "tok.model"),
            "--shard", "1", "--num-shards", "3", "--workers", "1", "--shard-tokens", str(SHARD_TOKENS)]
    res = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == -signal.SIGKILL, res.stderr
    staging = [p for p in out.iterdir() if p.name.startswith(".shard_00001.prepare-")]
    assert staging and list(staging[0].glob("tokens_*.bin*")), "killed before writing anything"
    assert not (out / "shard_00001").exists()  # nothing half-done where the merge looks
    assert prepare_main(args) == 0  # the rerun tidies the killed run's staging folder and redoes the shard
    assert not [p for p in out.iterdir() if p.name.startswith(".shard_00001.prepare-")]
    assert _files(out / "shard_00001") == _files(data["three"] / "shard_00001")  # manifest included
    assert prepare_main(args) == 0  # and a complete shard is a no-op


def test_merge_refuses_a_missing_unfinished_or_corrupt_shard(data, tmp_path, capsys):
    folder = Path(shutil.copytree(data["three"], tmp_path / "m"))
    (folder / "manifest.json").unlink()
    shutil.move(folder / "shard_00002", tmp_path / "aside")
    with pytest.raises(CorruptCorpusError, match=r"shard shard_00002 of 3 is missing.*--shard 2 --num-shards 3"):
        merge_shards(folder)
    assert prepare_main(["--merge", str(folder)]) == 1
    assert "shard_00002" in capsys.readouterr().err
    shutil.move(tmp_path / "aside", folder / "shard_00002")
    (folder / "shard_00002" / "manifest.json").unlink()
    with pytest.raises(CorruptCorpusError, match=r"shard shard_00002 of .* is not finished"):
        merge_shards(folder)
    shutil.copy(data["three"] / "shard_00002" / "manifest.json", folder / "shard_00002" / "manifest.json")
    shard = folder / "shard_00001" / "tokens_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptCorpusError, match=r"shard shard_00001 .*tokens_00000\.bin is corrupt.*--shard 1"):
        merge_shards(folder)
    assert not (folder / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard_NNNNN"):
        merge_shards(tmp_path / "empty")


@pytest.mark.parametrize("name,ok", [("shard_00000/tokens_00000.bin", True), ("tokens_00001.bin", True),
                                     ("shard_00000/../x.bin", False), ("../shard_00000/x.bin", False),
                                     ("/abs/tokens.bin", False), ("sub/tokens_00000.bin", False),
                                     ("shard_00000/sub/x.bin", False), ("shard_0000/x.bin", False)])
def test_manifest_paths_may_name_shard_files_only(name, ok, tmp_path):
    if ok:
        assert check_file_name(name, tmp_path / "manifest.json") == name
    else:
        with pytest.raises(CorruptCorpusError, match="not a plain name"):
            check_file_name(name, tmp_path / "manifest.json")


def test_sharding_needs_one_tokenizer_fixed_first(data, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-only"):
        prepare(str(data["src"]), tmp_path / "x", shard=0, num_shards=2, num_workers=1, progress=False)
    other = train_tokenizer(data["texts"][100:200], tmp_path / "other.model", vocab_size=400)
    prepare(str(data["src"]), tmp_path / "x", shard=0, num_shards=2, **data["common"])
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare(str(data["src"]), tmp_path / "x", shard=1, num_shards=2,
                **dict(data["common"], tokenizer=other.path))
    # --tokenizer-only trains it once; shards without --tokenizer use it
    assert prepare_main(["--source", str(data["src"]), "--out", str(tmp_path / "y"), "--tokenizer-only",
                         "--vocab-size", "400"]) == 0
    prepare(str(data["src"]), tmp_path / "y", shard=0, num_shards=1, num_workers=1, progress=False)
    assert merge_shards(tmp_path / "y") and TokenStore(tmp_path / "y").manifest["tokenizer"]["vocab_size"] == 400


# --- any tokenizer ----------------------------------------------------------------------------------------------

def _hf_tokenizer(texts, path, vocab=500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return tk


def _train_cfg(src, prepared, out, *extra):
    from pretrain.config import load_config

    return load_config(None, [
        f"--data.source={src}", f"--data.prepared_dir={prepared}", "--data.min_log2=5", "--data.max_log2=7",
        "--data.tokens_per_step=1024", "--data.cycles=2", "--model.vocab_size=512", "--model.dim=32",
        "--model.layers=2", "--model.heads=2", "--model.glu_dim=64", "--model.attn_backend=chunked",
        "--train.lr=1e-2", "--train.warmup_steps=2", "--train.device=cpu", f"--train.out_dir={out}",
        "--log.every=1", "--log.tensorboard=false", "--train.steps=3", *extra,
    ])


def test_hf_tokenizer_prepares_trains_and_exports(data, tmp_path):
    from transformers import AutoTokenizer

    from data_pipeline import load_tokenizer
    from pretrain.convert import main as convert_main
    from pretrain.trainer import Trainer

    texts = data["texts"]
    hf = _hf_tokenizer(texts, tmp_path / "hf" / "tokenizer.json")  # no tokenizer_config: EOS found by name
    src = _jsonl(tmp_path / "docs.jsonl", texts[:150])
    cfg = _train_cfg(src, tmp_path / "prepared", tmp_path / "run", f"--data.tokenizer={tmp_path / 'hf'}")
    losses = Trainer(cfg).train()
    assert len(losses) == 3 and all(np.isfinite(losses))
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["file"] == "tokenizer.json"
    assert (m["vocab_size"], m["tokenizer"]["eos_id"], m["tokenizer"]["bos_id"], m["tokenizer"]["pad_id"]) == \
        (500, 2, 1, 3)  # 500 ids under model.vocab_size 512: padding, nothing retrained
    store = TokenStore(tmp_path / "prepared")
    start, length = np.asarray(store.documents)[7]
    assert store.read(start, length - 1).tolist() == hf.encode(texts[7], add_special_tokens=False).ids

    assert convert_main(["--to", "hf", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    ours = load_tokenizer(tmp_path / "prepared")
    for text in texts[:20] + ["x = '</s>'  # a special token's text stays text\n"]:
        assert auto.encode(text, add_special_tokens=False) == ours.encode(text)
    assert auto.eos_token_id == 2 and json.loads((tmp_path / "export" / "config.json").read_text())["eos_token_id"] == 2

    # a tokenizer with more ids than the model is refused before anything is tokenized, naming both numbers
    from pretrain.data import ensure_prepared
    small = _train_cfg(src, tmp_path / "p2", tmp_path / "r2", f"--data.tokenizer={tmp_path / 'hf'}",
                       "--model.vocab_size=256")
    with pytest.raises(ValueError, match=r"has 500 ids but model.vocab_size is 256"):
        ensure_prepared(small)
    assert not (tmp_path / "p2").exists()


def test_padded_vocab_size():
    from data_pipeline import padded_vocab_size

    assert padded_vocab_size(500, 128) == 512 and padded_vocab_size(512, 128) == 512
    assert padded_vocab_size(50257, 128, tp=8) == 51200 and padded_vocab_size(500, 0) == 500


# --- mixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture(data):
    root = data["root"]
    a = _jsonl(root / "mix" / "a.jsonl", data["texts"][:120])
    b = _jsonl(root / "mix" / "b.jsonl", _texts(12, skip=300, seed=1))  # small: it runs through several epochs
    return prepare_mixture(root / "mixed", [{"path": str(a), "weight": 0.8}, {"path": str(b), "weight": 0.2}],
                           tokenizer=data["root"] / "tok.model", num_workers=1, progress=False)


@pytest.mark.parametrize("kind", ["dd", "concat"])
def test_mixture_80_20_and_exact_resume_on_another_dp(mixture, kind):
    args = dict(kind=kind, tokens_per_step=TPS, min_log2=LO, max_log2=HI, seq_len=128, seed=7)
    loader = build_loader(mixture, **args)
    assert loader.cycle == 5 and loader.quotas == [4, 1]
    stores = [c.store for c in loader.children]
    tokens = Counter()
    batches = []
    for _ in range(100):  # 20 cycles
        b = next(loader)
        batches.append(b)
        tokens[b["source"]] += b["input_ids"].numel()
        for row, start in enumerate(b["starts"].tolist()[:2]):  # rows come from the source the step names
            np.testing.assert_array_equal(b["input_ids"][row].numpy(), stores[b["source"]].read(start, b["seq_len"]))
    assert tokens[0] / sum(tokens.values()) == pytest.approx(0.8, abs=0.02)
    assert loader.children[1].steps_per_epoch < 10 and max(b["source_epoch"] for b in batches) >= 2

    fresh = build_loader(mixture, **args)
    for _ in range(53):  # mid-cycle: 53 = 10 cycles + 3 steps
        next(fresh)
    state = json.loads(json.dumps(fresh.state_dict()))  # as a checkpoint's state.json holds it
    ranks = [build_loader(mixture, **args, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for want in batches[53:]:  # source 1 crosses epochs on the way
        parts = [next(r) for r in ranks]
        assert {p["source"] for p in parts} == {want["source"]} and parts[0]["step"] == want["step"]
        torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), want["input_ids"])
        torch.testing.assert_close(torch.cat([p["labels"] for p in parts]), want["labels"])
    with pytest.raises(ValueError, match="another data config"):
        build_loader(mixture, **args, weights=[0.5, 0.5]).load_state_dict(state)


def test_mixture_stats_and_training_from_config(mixture, data, tmp_path, capsys):
    s = _stats_json(mixture, capsys)
    assert [r["share"] for r in s["sources"]] == [0.8, 0.2]
    for r in s["sources"]:
        assert r["effective_epochs"] == pytest.approx(r["share"] * s["tokens"] / r["tokens"])
    assert stats_main([str(mixture), "--tokens-per-step", str(TPS), "--min-log2", str(LO), "--max-log2", str(HI),
                       "--train-tokens", "1e6"]) == 0
    assert "effective epochs after 1,000,000 trained tokens" in capsys.readouterr().out

    from pretrain.trainer import Trainer

    mix = tmp_path / "mix"
    sources = json.dumps([{"path": str(data["root"] / "mix" / "a.jsonl"), "weight": 0.8},
                          {"path": str(data["root"] / "mix" / "b.jsonl"), "weight": 0.2, "dir": "b"}])
    trainer = Trainer(_train_cfg("unused", mix, tmp_path / "run", f"--data.sources={sources}",
                                 f"--data.tokenizer={data['root'] / 'tok.model'}", "--data.holdout_docs=3"))
    assert trainer.loader.quotas == [4, 1] and (mix / "b" / "heldout.npy").is_file()
    assert len(trainer.train()) == 3


# --- a held-out split -------------------------------------------------------------------------------------------

def test_heldout_documents_are_never_read_and_are_what_perplexity_reads(data, tmp_path):
    from evaluation.perplexity import heldout_tokens

    out = prepare(str(data["src"]), tmp_path / "h", holdout_docs=12, **data["common"])
    store = TokenStore(out, verify="sha256")
    held = np.asarray(store.heldout)
    assert len(held) == 12 and len(store.documents) == 228
    assert held[0, 0] < store.num_tokens // 10 and held[-1, 0] > store.num_tokens // 2  # spread, not the tail
    covered = np.zeros(store.num_tokens, bool)
    for kind in ("dd", "concat"):
        loader = build_loader(out, kind=kind, tokens_per_step=TPS, min_log2=LO, max_log2=HI, seq_len=128)
        if kind == "concat":  # a concat row may jump over a held-out document: map it back token by token
            stream = loader.stream
            physical = stream.to_physical(np.arange(stream.num_tokens))
            assert stream.num_tokens == store.num_tokens - held[:, 1].sum()
        for _ in range(loader.steps_per_epoch):
            b = next(loader)
            for row, start in enumerate(b["starts"].tolist()):
                if kind == "dd":
                    covered[start:start + b["seq_len"]] = True
                else:
                    v = int(np.searchsorted(physical, start))
                    covered[physical[v:v + b["seq_len"] + 1]] = True  # + the last label
                    np.testing.assert_array_equal(b["input_ids"][row].numpy(), stream.read(v, b["seq_len"]))
    for s, n in held:
        assert not covered[s:s + n].any(), "a loader read a held-out document"
    tokens, info = heldout_tokens(out, 4000)
    assert info["unseen"] and len(tokens) == 4000
    first = int(held[0, 1])
    np.testing.assert_array_equal(tokens[:first], store.read(held[0, 0], first))
    np.testing.assert_array_equal(tokens[first:], store.read(held[1, 0], 4000 - first))
    s = stats(out, TPS, LO, HI)
    assert s["heldout"] == {"documents": 12, "tokens": int(held[:, 1].sum())}
    assert s["tokens"] + s["heldout"]["tokens"] == store.num_tokens


# --- launch/slurm/prepare.sbatch: a job array + a dependent merge, under stub sbatch / srun ---------------------

SBATCH_STUB = r"""#!/usr/bin/env bash
# stub sbatch: records the call, prints the job id, then runs the job here and now (every array task in turn), its
# output in $STUB_DIR/job-<id>.out; fails like a job that failed (so a caller chaining afterok stops there)
echo "sbatch $*" >> "$STUB_DIR/calls"
array="" parsable=0
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in --array=*) array=${1#--array=} ;; --parsable) parsable=1 ;; esac
  shift
done
script=$1; shift
id=$(cat "$STUB_DIR/next" 2>/dev/null || echo 500)
echo $((id + 10)) > "$STUB_DIR/next"
if (( parsable )); then echo "$id"; else echo "Submitted batch job $id"; fi
rc=0
if [[ -z "$array" ]]; then
  SLURM_JOB_ID=$id SLURM_SUBMIT_DIR=$PWD bash "$script" "$@" >> "$STUB_DIR/job-$id.out" 2>&1 || rc=$?
else
  range=${array%%\%*}; lo=${range%-*}; hi=${range#*-}
  for ((t = lo; t <= hi; t++)); do
    SLURM_JOB_ID=$((id + t + 1)) SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$t SLURM_ARRAY_TASK_MIN=$lo \
      SLURM_ARRAY_TASK_MAX=$hi SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) SLURM_SUBMIT_DIR=$PWD \
      bash "$script" "$@" >> "$STUB_DIR/job-$id.out" 2>&1 || rc=$?
  done
fi
exit $rc
"""

SRUN_STUB = r"""#!/usr/bin/env bash
# stub srun: one task, here
echo "srun $*" >> "$STUB_DIR/calls"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
exec "$@"
"""


def test_prepare_sbatch_job_array_and_merge_under_stub_slurm(data, tmp_path, capsys):
    script = REPO / "launch" / "slurm" / "prepare.sbatch"
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-x", "--shell=bash", str(script.relative_to(REPO))], cwd=REPO,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    for name, body in (("sbatch", SBATCH_STUB), ("srun", SRUN_STUB)):
        (stub / "bin" / name).write_text(body)
        (stub / "bin" / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "PYTHON"))}
    env.update(PATH=f"{stub / 'bin'}:{env['PATH']}", STUB_DIR=str(stub), LIGHTSPAN_ROOT=str(REPO),
               PYTHON=sys.executable, SLURM_CPUS_PER_TASK="1", OMP_NUM_THREADS="1")

    def submit_array(out, *extra):
        (stub / "calls").write_text("")
        res = subprocess.run([str(script), "--array", "--num-shards", "2", "--source", str(data["src"]), "--out",
                              str(out), "--shard-tokens", str(SHARD_TOKENS), *extra], cwd=submit, env=env,
                             capture_output=True, text=True, timeout=300)
        logs = "".join(p.read_text() for p in sorted(stub.glob("job-*.out")))
        assert res.returncode == 0, res.stdout + res.stderr + logs
        return res.stdout, [c for c in (stub / "calls").read_text().splitlines() if c.startswith("sbatch")]

    out = tmp_path / "array"
    printed, calls = submit_array(out, "--tokenizer", str(data["root"] / "tok.model"))
    assert len(calls) == 2  # the tokenizer is given: no tokenizer job
    array_id = printed.split("shard job array ")[1].split()[0]
    assert "--array=0-1" in calls[0] and "--stage=shard" in calls[0]
    assert f"--dependency=afterok:{array_id}" in calls[1] and "--stage=merge" in calls[1]
    # the same folder as the same shards prepared and merged in process
    for i in range(2):
        prepare(str(data["src"]), tmp_path / "two", shard=i, num_shards=2, **data["common"])
    merge_shards(tmp_path / "two")
    assert _files(out) == _files(tmp_path / "two")
    a, b = _stats_json(data["one"], capsys), _stats_json(out, capsys)
    assert (a["documents"], a["tokens"], a["buckets"]) == (b["documents"], b["tokens"], b["buckets"])

    # without --tokenizer: a tokenizer job first, the array after it, the merge after the array
    printed, calls = submit_array(tmp_path / "trained", "--vocab-size", "400", "--holdout-docs", "4")
    tok_id, array_id = printed.split("tokenizer job ")[1].split()[0], printed.split("shard job array ")[1].split()[0]
    assert "--stage=tokenizer" in calls[0] and f"--dependency=afterok:{tok_id}" in calls[1]
    assert f"--dependency=afterok:{array_id}" in calls[2] and "--holdout-docs 4" in calls[2]
    store = TokenStore(tmp_path / "trained", verify="sha256")
    assert store.manifest["vocab_size"] == 400 and len(store.heldout) == 4
