"""Single-process checkpoints: model, optimizer, scheduler, data loader, RNG, step.

Layout: <run>/checkpoints/step_00000050/{state.pt, meta.json}. A checkpoint is written into a hidden
temporary folder and renamed into place only when complete, so a crash mid-save never damages the last
good one; meta.json (written last) carries the sha256 of state.pt. Loading uses weights_only=True:
nothing is unpickled beyond tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

PREFIX = "step_"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, state: dict, meta: dict, keep_last: int = 3) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    meta = dict(meta, step=step, saved_at=time.time(), files={"state.pt": sha256(tmp / "state.pt")})
    from pretrain import test_hooks

    test_hooks.pause("LIGHTSPAN_TEST_PAUSE_BEFORE_RENAME")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_complete(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    test_hooks.pause("LIGHTSPAN_TEST_PAUSE_AFTER_SAVE")
    return final


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first; stale temporary folders are removed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    done = [p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """'none' -> None; 'auto' -> latest complete checkpoint in the run folder (or None); else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        done = list_complete(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no complete checkpoint there (missing meta.json)")
    return path


def verify(path: Path) -> dict:
    """Returns meta.json; raises ValueError naming the first file whose sha256 differs from the manifest."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    for name, expected in meta.get("files", {}).items():
        if not (path / name).is_file() or sha256(path / name) != expected:
            raise ValueError(f"checkpoint {path} is corrupt: {name} does not match the sha256 in meta.json; "
                             f"delete it to resume from the previous one")
    return meta


def pick_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from. resume=auto: the newest complete one whose files match their sha256,
    warning about (and skipping) corrupt ones; an explicit path must be intact; 'none': None."""
    if resume != "auto":
        path = resolve_resume(run_dir, resume)
        if path is not None:
            verify(path)
        return path
    for path in reversed(list_complete(run_dir)):
        try:
            verify(path)
            return path
        except ValueError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None


def load(path: Path) -> tuple[dict, dict]:
    """Returns (state, meta); refuses a file whose checksum does not match its meta.json."""
    path = Path(path)
    meta = verify(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return state, meta


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load weights, refusing with the first differing tensor's name and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"the model expects {tuple(v.shape)}: the config differs from the one it was saved with")
    model.load_state_dict(state)
