"""Sharded checkpoints (torch.distributed.checkpoint, DCP) for the trainer's distributed path.

Layout of <run>/checkpoints/step_00000050/:
    .metadata, __<rank>_0.distcp   DCP: "model.<fqn>" and "optim.<...>" entries; each rank writes only its shards
    loader/dp<d>_cp<c>.pt          the data loader of one (dp, cp) coordinate (its tp/pp peers read the same data)
    rng/rank<r>.pt                 each rank's torch RNG state
    common.pt                      scheduler, step, tokens_seen (rank 0)
    meta.json                      manifest, written last: format "dcp", config, layout, step, code version and
                                   the sha256 of every file above (rank 0 hashes them after all ranks wrote)

Every rank writes into the same hidden `.tmp-step_...` folder; after a barrier rank 0 hashes, writes meta.json
and renames the folder into place, so a crash mid-save leaves only a temporary folder (ignored, then removed).
With `checkpoint.async_save` the DCP write runs in a background thread on its own gloo group; the next save (or
`finalize`) waits for it before the barrier + rename.

Model weights load into any layout (DCP reshards DTensors by their global shapes; names are global under every
layout, pp included); one process reads them with `load_model_weights` (no process group). Small files are
loaded with weights_only=True.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from pretrain import checkpoint, test_hooks

FORMAT = "dcp"


def code_version() -> str:
    """`git describe` of the source tree, else the installed package version, else 'unknown'."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("lightspan")
    except Exception:  # noqa: BLE001 - not installed as a package
        return "unknown"


def _contiguous(tree):
    """DCP cannot place `_StridedShard` pieces (tp's [Q|K|V|U] blocks): give such DTensors a plain Shard layout
    of the same global tensor (one all-gather each); everything else is passed through, still sharded."""
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    if isinstance(tree, DTensor) and any(isinstance(p, _StridedShard) for p in tree.placements):
        placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in tree.placements]
        return distribute_tensor(tree.full_tensor(), tree.device_mesh, placements)
    return tree


def _full(tree):
    if isinstance(tree, dict):
        return {k: _full(v) for k, v in tree.items()}
    return tree.full_tensor() if isinstance(tree, DTensor) else tree


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "meta.json")


class ShardedCheckpointer:
    """Save/load the trainer's state as a sharded DCP checkpoint; every rank calls every method."""

    def __init__(self, run_dir: Path, env, async_save: bool = False, keep_last: int = 3):
        self.run_dir, self.env, self.async_save, self.keep_last = Path(run_dir), env, async_save, keep_last
        self.pending = None  # (future, tmp, final, meta) of an async save not yet renamed
        self._group = dist.new_group(backend="gloo") if async_save else None  # off the training group's thread

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, loader, tokens_seen: int, meta: dict) -> Path:
        self.finalize()
        env, rank = self.env, self.env.rank
        root = checkpoint.checkpoint_dir(self.run_dir)
        final = root / f"{checkpoint.PREFIX}{step:08d}"
        tmp = root / f".tmp-{checkpoint.PREFIX}{step:08d}"
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "loader").mkdir(parents=True)
            (tmp / "rng").mkdir()
        env.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = _contiguous({"model": model_sd, "optim": optim_sd})
        c = env.coords
        if c.tp == 0 and c.pp == 0:
            torch.save(loader.state_dict(), tmp / "loader" / f"dp{c.dp}_cp{c.cp}.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank{rank}.pt")
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict(), "step": step, "tokens_seen": tokens_seen},
                       tmp / "common.pt")
        meta = dict(meta, format=FORMAT, step=step, code_version=code_version())
        if self.async_save:
            future = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=self._group)
            self.pending = (future, tmp, final, meta)
        else:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
            self.pending = (None, tmp, final, meta)
            self.finalize()
        return final

    def finalize(self) -> None:
        """Wait for the pending save on every rank, then rank 0 hashes, writes meta.json and renames."""
        if self.pending is None:
            return
        future, tmp, final, meta = self.pending
        self.pending = None
        if future is not None:
            future.result()
        self.env.barrier()  # every rank's shards and small files are on disk
        if self.env.rank == 0:
            test_hooks.pause("LIGHTSPAN_TEST_PAUSE_BEFORE_RENAME")
            files = {name: checkpoint.sha256(tmp / name) for name in _files(tmp)}
            (tmp / "meta.json").write_text(json.dumps(dict(meta, saved_at=time.time(), files=files), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint.list_complete(self.run_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.env.barrier()
        if self.env.rank == 0:
            test_hooks.pause("LIGHTSPAN_TEST_PAUSE_AFTER_SAVE")

    # -- load ------------------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler, loader) -> tuple[int, int]:
        """Load into this rank's (possibly differently sharded) model and optimizer; returns (step, tokens)."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_shapes(path, model_sd, stage=self.env.mesh["pp"].size() > 1)
        # The saved optimizer param_groups are one non-tensor entry that DCP keeps from a single rank; under pp
        # it names only that rank's stage. Keep this rank's parameter names with the saved hyperparameters.
        own_groups = copy.deepcopy(optim_sd["param_groups"])
        state = _contiguous({"model": model_sd, "optim": optim_sd})
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
        for own, saved in zip(own_groups, state["optim"]["param_groups"]):  # saved lr etc., this rank's params
            own.update({k: v for k, v in saved.items() if k != "params"})
        state["optim"]["param_groups"] = own_groups
        # DCP resharded into this layout's placeholders; set_state_dict's full-tensor path then cuts each rank's
        # (possibly strided) piece. The full tensors exist per rank only transiently, one load at a time.
        state = _full(state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(full_state_dict=True))
        c, saved = self.env.coords, meta.get("layout", {})
        layout = {d: saved.get(d) for d in ("dp", "cp")}
        mine = {"dp": self.env.mesh["dp"].size(), "cp": self.env.mesh["cp"].size()}
        shard = path / "loader" / f"dp{c.dp}_cp{c.cp}.pt"
        if layout != mine or not shard.is_file():
            raise ValueError(f"checkpoint {path} holds data-loader state for dp={layout['dp']} cp={layout['cp']}, "
                             f"this run has dp={mine['dp']} cp={mine['cp']}: resume the data order on the dp x cp "
                             f"layout it was saved with (the weights load into any layout: lightspan convert)")
        loader.load_state_dict(torch.load(shard, weights_only=True))
        rng = path / "rng" / f"rank{self.env.rank}.pt"
        torch.set_rng_state(torch.load(rng if rng.is_file() else path / "rng" / "rank0.pt",
                                       weights_only=True)["torch"])
        common = torch.load(path / "common.pt", weights_only=True)
        scheduler.load_state_dict(common["scheduler"])
        return int(common["step"]), int(common["tokens_seen"])


def check_shapes(path: Path, model_sd: dict, stage: bool = False) -> None:
    """Refuse a checkpoint whose model tensors differ from this model's (global shapes), naming the first.

    stage: this rank holds one pipeline stage, so the checkpoint's other stages' tensors are expected extras.
    """
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = {k[len("model."):] for k in saved if k.startswith("model.")}
    missing, unexpected = sorted(set(model_sd) - names), sorted(names - set(model_sd))
    if stage:
        unexpected = []
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in model_sd.items():
        if tuple(saved[f"model.{k}"].size) != tuple(v.shape):
            raise ValueError(f"checkpoint tensor {k!r} has shape {tuple(saved[f'model.{k}'].size)}, the model "
                             f"expects {tuple(v.shape)}: the config differs from the one it was saved with")


def load_model_weights(path: Path) -> dict:
    """The full model state dict of a DCP checkpoint, read in this one process (no process group needed)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for k, md in saved.items() if k.startswith("model.")}
    if not model:
        raise ValueError(f"checkpoint {path} holds no model weights")
    dcp.load({"model": model}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return model

