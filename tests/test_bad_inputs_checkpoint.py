"""Hostile and damaged checkpoints, and saves that cannot complete (issue #17, checkpoint side).

One good run folder is trained once per module (`python -m pretrain`, a tiny model, 2 steps); every case works on
a private copy of it, damages or crafts one thing, and feeds it to a real reader: resuming the run
(`python -m pretrain`), `lightspan convert --to hf` or `lightspan eval` as subprocesses, or the library. Each case
checks that the input is refused (non-zero exit, or the exception), that the message names the cause (the file,
the tensor, the path), that a CLI prints no traceback, that no payload ran (its marker file never appears), and
that the run folder is byte-identical afterwards (every file hashed before and after).
"""
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoint_resilience import _args  # the tiny run both files train
import torch

from pretrain import checkpoint

REPO = Path(__file__).resolve().parents[1]
STEP = "step_00000002"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# --- payloads ----------------------------------------------------------------------------------------------------

class ShellPayload:
    """Unpickling this runs `touch MARKER` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class TouchPayload:
    """Unpickling this creates MARKER through pathlib (a class the metadata allow-list admits, PosixPath, is part
    of the payload)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


# --- the run folder and helpers ----------------------------------------------------------------------------------

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("LIGHTSPAN_DEBUG", None)
    return env


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def good_run(corpus):
    """A run folder with one complete checkpoint (step 2), trained by the CLI (which also prepares the corpus)."""
    run = corpus / "good_run"
    res = _run([sys.executable, "-m", "pretrain", *_args(corpus, run, "--train.steps=2")], cwd=corpus)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    checkpoint.verify(run / "checkpoints" / STEP)
    return run


@pytest.fixture()
def run(good_run, tmp_path):
    """A private copy of the good run folder."""
    return Path(shutil.copytree(good_run, tmp_path / "run", symlinks=True))


def _ckpt(run):
    return run / "checkpoints" / STEP


def _snapshot(folder):
    """Every path under folder: a file's sha256, 'dir', or a link's target."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fix_checksums(ckpt, extra=None):
    """Rewrite meta.json's sha256s to match the files as they now are (what a forger does)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
                     for name in sorted(os.listdir(ckpt)) if name != "meta.json"}
    meta["files"].update(extra or {})
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2))


def _verb(verb, run, tmp_path, corpus, *extra):
    """Read the run folder the way `verb` does; returns the finished subprocess."""
    if verb == "resume":
        cmd = [sys.executable, "-m", "pretrain", *_args(corpus, run, "--train.steps=4", *extra)]
    elif verb == "convert":
        cmd = [sys.executable, "-m", "pretrain.cli", "convert", "--to", "hf", str(run), str(tmp_path / "hf_out")]
    else:
        cmd = [sys.executable, "-m", "pretrain.cli", "eval", str(run), "--out", str(tmp_path / "eval_out"),
               "--tasks", "mqar", "--mqar-examples", "4", "--no-progress"]
    return _run(cmd, cwd=tmp_path)


def _refused(res, *words):
    """Non-zero exit, no traceback, and a last stderr line `error: ...` naming every word."""
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


def _nothing_written(tmp_path):
    assert not (tmp_path / "hf_out").exists() and not (tmp_path / "eval_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# --- 0. the payloads are live: a plain unpickler runs them ------------------------------------------------------

def test_the_payloads_run_under_a_plain_unpickler(tmp_path):
    for i, cls in enumerate((ShellPayload, TouchPayload)):
        marker = tmp_path / f"MARKER{i}"
        pickle.loads(pickle.dumps(cls(marker)))
        assert marker.exists(), cls.__name__  # so "the marker is absent" below means the reader refused it


# --- 1. a .metadata pickle carrying code, its checksum forged ---------------------------------------------------

@pytest.mark.parametrize("verb", ["resume", "convert", "eval"])
def test_metadata_payload_is_refused_and_never_runs(run, corpus, tmp_path, verb):
    marker = tmp_path / "MARKER"
    (_ckpt(run) / ".metadata").write_bytes(pickle.dumps(ShellPayload(marker)))
    _fix_checksums(_ckpt(run))
    checkpoint.verify(_ckpt(run))  # the forged manifest matches: only the reader stands in the way
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), f"{STEP}/.metadata", "system", "nothing was run")
    assert not marker.exists()
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


# --- 2. a pickled (non-tensor) entry smuggled into the DCP data ------------------------------------------------

def _smuggle_pickled_entry(run, marker):
    """Re-save the checkpoint's tensors with one extra non-tensor entry ("optim.evil"), as DCP itself writes it."""
    import torch.distributed.checkpoint as dcp

    ck = _ckpt(run)
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own good file: a plain unpickler is fine here
    tensors = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(ck)), no_dist=True)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    optim["evil"] = TouchPayload(marker)
    for name in (".metadata", "__0_0.distcp"):
        (ck / name).unlink()
    dcp.save({"model": model, "optim": optim}, storage_writer=dcp.FileSystemWriter(str(ck)), no_dist=True)
    _fix_checksums(ck)


@pytest.mark.parametrize("verb", ["resume", "convert"])  # eval reads through convert's reader, tested below
def test_pickled_entry_is_refused_and_never_runs(run, corpus, tmp_path, verb):
    marker = tmp_path / "MARKER"
    _smuggle_pickled_entry(run, marker)
    assert not marker.exists()
    checkpoint.verify(_ckpt(run))
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), STEP, "pickled", "optim.evil")
    assert not marker.exists()
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


def test_pickled_entry_is_refused_by_the_library_reader(run, tmp_path):
    marker = tmp_path / "MARKER"
    _smuggle_pickled_entry(run, marker)
    before = _snapshot(run)
    with pytest.raises(checkpoint.CheckpointError, match=r"pickled \(non-tensor\) entries \['optim\.evil'\]"):
        checkpoint.load_model_weights(run)
    assert not marker.exists() and _snapshot(run) == before


# --- 3. a legacy state.pt checkpoint holding a pickle payload ---------------------------------------------------

@pytest.mark.parametrize("verb", ["resume", "convert", "eval"])
def test_legacy_state_pt_is_refused_and_never_unpickled(run, corpus, tmp_path, verb):
    marker = tmp_path / "MARKER"
    ck = _ckpt(run)
    meta = json.loads((ck / "meta.json").read_text())
    for p in ck.iterdir():
        p.unlink()
    torch.save({"model": ShellPayload(marker), "step": 2}, ck / "state.pt")
    meta.pop("format")
    meta["files"] = {"state.pt": checkpoint.sha256(ck / "state.pt")}
    (ck / "meta.json").write_text(json.dumps(meta))
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), STEP, "'state.pt'", "not 'dcp'")
    assert not marker.exists()
    assert _snapshot(run) == before  # resume did not start a fresh run over it (keep_last would prune it)
    _nothing_written(tmp_path)


# --- 4. file names that leave the checkpoint folder -------------------------------------------------------------

@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_naming_a_file_outside_is_refused(run, corpus, tmp_path, where):
    outside = run / "outside" if where == "relative" else tmp_path / "elsewhere" / "secret"
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(b"not yours to read\n")
    name = "../../outside" if where == "relative" else str(outside)
    _fix_checksums(_ckpt(run), {name: checkpoint.sha256(outside)})  # the checksum matches: only the path is wrong
    before = _snapshot(run)
    with pytest.raises(checkpoint.CheckpointError, match="outside the checkpoint folder"):
        checkpoint.verify(_ckpt(run))
    _refused(_verb("convert", run, tmp_path, corpus), repr(name), "outside the checkpoint folder")
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


def _point_storage_outside(run):
    """The DCP storage metadata's relative_path of every item set to '../x' (a real copy of the data lies there)."""
    ck = _ckpt(run)
    shutil.copyfile(ck / "__0_0.distcp", ck.parent / "x")
    with open(ck / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own good file
    md.storage_data = {k: dataclasses.replace(v, relative_path="../x") for k, v in md.storage_data.items()}
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)
    (ck / "__0_0.distcp").unlink()
    _fix_checksums(ck)


@pytest.mark.parametrize("verb", ["resume", "convert"])
def test_storage_metadata_path_outside_is_refused(run, corpus, tmp_path, verb):
    _point_storage_outside(run)
    checkpoint.verify(_ckpt(run))
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), "'../x'", ".metadata", "outside the checkpoint folder")
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


def test_data_file_linked_outside_is_refused(run, corpus, tmp_path):
    ck = _ckpt(run)
    elsewhere = tmp_path / "elsewhere.distcp"
    shutil.move(ck / "__0_0.distcp", elsewhere)
    (ck / "__0_0.distcp").symlink_to(elsewhere)  # same bytes, same sha256: only the link leaves the folder
    before = _snapshot(run)
    with pytest.raises(checkpoint.CheckpointError, match=r"'__0_0\.distcp', which is outside the checkpoint"):
        checkpoint.verify(ck)
    _refused(_verb("convert", run, tmp_path, corpus), "'__0_0.distcp'", "outside the checkpoint folder")
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


# --- 5. damaged files and a checkpoint of another model --------------------------------------------------------

@pytest.mark.parametrize("verb", ["resume", "convert"])
def test_truncated_data_file_with_forged_checksums_is_refused(run, corpus, tmp_path, verb):
    data = _ckpt(run) / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    _fix_checksums(_ckpt(run))
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), "__0_0.distcp", "cannot be read")
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


def test_garbage_metadata_is_refused(run, corpus, tmp_path):
    (_ckpt(run) / ".metadata").write_bytes(bytes(range(256)) * 4)
    _fix_checksums(_ckpt(run))
    before = _snapshot(run)
    _refused(_verb("convert", run, tmp_path, corpus), f"{STEP}/.metadata", "cannot be read")
    assert _snapshot(run) == before
    _nothing_written(tmp_path)


@pytest.mark.parametrize("verb", ["resume", "convert"])
def test_meta_json_that_is_not_json_is_refused(run, corpus, tmp_path, verb):
    (_ckpt(run) / "meta.json").write_text('{"format": "dcp", "files": {')
    before = _snapshot(run)
    _refused(_verb(verb, run, tmp_path, corpus), f"{STEP}/meta.json", "not valid JSON")
    assert _snapshot(run) == before  # resume did not start the run again from scratch
    _nothing_written(tmp_path)


def test_checkpoint_of_another_model_shape_names_the_tensor_and_both_shapes(run, corpus, tmp_path):
    before = _snapshot(run)
    last = _refused(_verb("resume", run, tmp_path, corpus, "--model.glu_dim=96"), STEP, "has shape",
                    "the model expects")
    assert re.search(r"tensor '[\w.]+' has shape \(64, 32\), the model expects \(96, 32\)", last), last
    assert _snapshot(run) == before


# --- 6. the disk fills up during a save -------------------------------------------------------------------------

def _no_tmp_left(run):
    return not list((run / "checkpoints").glob(".tmp-step_*"))


def test_disk_full_on_a_small_tmpfs(good_run, corpus, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in good_run.rglob("*") if p.is_file())
    size = (used + (160 << 10) + 4095) // 4096 * 4096  # the good run and some slack, not a second checkpoint
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                 capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"mount is not available: {e}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        run = Path(shutil.copytree(good_run, mnt / "run"))
        before = _snapshot(_ckpt(run))
        res = _run([sys.executable, "-m", "pretrain", *_args(corpus, run, "--train.steps=4",
                                                             "--checkpoint.every=2")], cwd=tmp_path)
        last = _refused(res, "no space left", "step_00000004", str(run / "checkpoints"))
        assert f"previous checkpoint {_ckpt(run)} is intact" in last, last
        assert _snapshot(_ckpt(run)) == before
        checkpoint.verify(_ckpt(run))
        assert _no_tmp_left(run)
        assert [p.name for p in checkpoint.list_complete(run)] == [STEP]
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("where", ["writer", "dcp.save"])
def test_disk_full_injected_keeps_the_previous_checkpoint(run, corpus, monkeypatch, where):
    import torch.distributed.checkpoint as dcp

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    if where == "writer":  # inside DCP's writer, so DCP wraps it as it would wrap a real ENOSPC
        def write_data(self, plan, planner):
            target = Path(self.path) / "__0_0.distcp"
            target.write_bytes(b"\0" * 4096)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

        monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_data)
    else:
        def save(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(dcp, "save", save)
    before = _snapshot(_ckpt(run))
    trainer = Trainer(load_config(None, _args(corpus, run, "--train.steps=4", "--checkpoint.every=2")))
    with pytest.raises(OSError) as info:
        trainer.train()
    err = info.value
    assert err.errno == errno.ENOSPC, err
    assert "no space left" in str(err) and "step_00000004" in str(err) and err.filename == str(run / "checkpoints")
    assert f"previous checkpoint {_ckpt(run)} is intact" in str(err)
    assert _snapshot(_ckpt(run)) == before
    checkpoint.verify(_ckpt(run))
    assert _no_tmp_left(run)
    assert [p.name for p in checkpoint.list_complete(run)] == [STEP]


# --- 7. convert writing over its own input ----------------------------------------------------------------------

@pytest.mark.parametrize("out", [".", "sub", "checkpoints/" + STEP, ".."])
def test_convert_onto_or_into_its_own_input_is_refused(run, tmp_path, out):
    src = run if out != ".." else _ckpt(run)
    target = run if out in (".", "..") else run / out
    before = _snapshot(run)
    res = _run([sys.executable, "-m", "pretrain.cli", "convert", "--to", "hf", str(src), str(target), "--overwrite"],
               cwd=tmp_path)
    _refused(res, "overlaps the input", str(target))
    assert _snapshot(run) == before
    assert not [p for p in run.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_convert_of_the_good_copy_works(run, tmp_path):
    """The control: the copies the cases damage convert when left alone."""
    before = _snapshot(run)
    res = _run([sys.executable, "-m", "pretrain.cli", "convert", "--to", "hf", str(run), str(tmp_path / "hf")],
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file() and _snapshot(run) == before


def test_a_damaged_newest_checkpoint_still_falls_back_to_an_intact_older_one(run):
    """The refusals above are for runs with nothing usable left: a corrupt newest checkpoint beside an intact one
    is skipped with a warning, as before."""
    newer = run / "checkpoints" / "step_00000004"
    shutil.copytree(_ckpt(run), newer)
    data = bytearray((newer / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newer / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_00000004 is corrupt: __0_0\.distcp .*falling back"):
        assert checkpoint.pick_resume(run, "auto") == _ckpt(run)
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000004 is corrupt"):
        checkpoint.pick_resume(run, str(newer))
