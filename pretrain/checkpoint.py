"""The one checkpoint format and its one reader/writer: `torch.distributed.checkpoint` (DCP), every world size.

Layout of <run>/checkpoints/step_00000050/:
    .metadata, __<rank>_0.distcp   DCP, tensors only: "model.<fqn>" and "optim.<fqn>.<exp_avg|exp_avg_sq|step>";
                                   each rank writes only its shards, names are global under every layout
    state.json                     step, tokens seen, the LR-schedule position, the data stream's position (one
                                   global position: the batch of a step is a pure function of config, seed, step)
                                   and every rank's RNG state
    meta.json                      manifest, written last: format "dcp", config, layout, step, code version and
                                   the sha256 of every file above

Every rank writes into the same hidden `.tmp-step_...` folder; after a barrier rank 0 hashes the files, writes
meta.json and renames the folder into place, so a crash mid-save leaves only a temporary folder (removed at the
next start). With `checkpoint.async_save` the DCP write runs in a background thread on its own gloo group; the
next save (or `finalize`) waits for it before the barrier + rename.

Any layout loads any checkpoint: DCP reshards every tensor by its global shape (weights and optimizer moments),
the data position is global and each (dp, cp) rank derives its share of a step's batch from it, and the
optimizer/schedule hyperparameters come from the config in effect (a change against the checkpoint's config is
applied and logged). One process reads the weights with `load_model_weights` (no process group).

Trust model: a checkpoint is data, never code. `.metadata` (a pickle in DCP) is read with an allow-listed
unpickler that admits only DCP's own metadata classes, torch.Size and dtypes; a checkpoint holding non-tensor
(pickled) entries is refused; every file a manifest names must lie inside its folder; small files are JSON.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

PREFIX = "step_"
FORMAT = "dcp"
STATE = "state.json"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the file or tensor and the fix."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# -- finding checkpoints -------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints (meta.json present), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit() and (p / META).is_file()]
    return sorted(done, key=step_of)


def remove_stale(run_dir: Path) -> None:
    """Remove the temporary folders of saves that never completed (the writer calls this at start-up)."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def _inside(folder: Path, name: str, manifest: str = META) -> Path:
    """`folder / name`, refusing a name that leaves the folder (absolute, '..', a link out)."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name or \
            not (folder / path).resolve().is_relative_to(Path(folder).resolve()):
        raise CheckpointError(f"{folder / manifest} lists the file {name!r}, which is outside the checkpoint folder: "
                              f"the checkpoint is damaged or crafted; do not use it")
    return folder / path


def read_meta(path: Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
        raise CheckpointError(f"{path / META} is not a lightspan checkpoint manifest")
    return meta


def verify(path: Path) -> dict:
    """Returns meta.json; raises CheckpointError naming the first file whose sha256 differs from the manifest."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format', 'state.pt')!r}, not {FORMAT!r}: it was "
                              f"written by an older lightspan; convert it with that version or start again")
    for name, expected in meta.get("files", {}).items():
        file = _inside(path, name)
        if not file.is_file() or sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match the sha256 in {META}; "
                                  f"delete the folder to resume from the previous one")
    return meta


def pick_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from. resume=auto: the newest complete one whose files match their sha256,
    warning about (and skipping) corrupt ones; an explicit path must be intact; 'none': None."""
    if resume == "none":
        return None
    if resume != "auto":
        verify(resume)
        return Path(resume)
    refused = []
    for path in reversed(list_complete(run_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            refused.append(e)
            continue
        for e in refused:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
        return path
    if refused:  # starting again would train over them (and keep_last would prune them): refuse instead
        raise CheckpointError(f"{refused[0]}; no other checkpoint of {run_dir} can be resumed either: fix or move "
                              f"the {len(refused)} unusable one(s), or start again with checkpoint.resume=none")
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest intact checkpoint); verified."""
    path = Path(path)
    if (path / META).is_file():
        verify(path)
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint folder)")
    found = pick_resume(path, "auto")
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (looked for {checkpoint_dir(path)}/{PREFIX}*/{META})")
    return found


# -- the safe reader -----------------------------------------------------------------------------------------------
_ALLOWED = {
    ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "BytesStorageMetadata")),  # the last to name and refuse
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a tensor checkpoint never holds: "
                              f"the file is crafted or not a lightspan checkpoint; nothing was run, do not use it")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by an allow-listed unpickler and pickled (non-tensor) entries
    refused; every data file it opens must lie inside the checkpoint folder."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: not a complete DCP checkpoint") from None
        except Exception as e:  # noqa: BLE001 - any malformed pickle
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): the checkpoint is damaged") from None
        if type(metadata).__name__ != "Metadata":
            raise CheckpointError(f"{path} does not hold DCP metadata")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CheckpointError(f"checkpoint {self.path} holds pickled (non-tensor) entries {pickled[:3]}: lightspan "
                                  f"checkpoints hold tensors only, and pickles are never loaded")
        for info in (metadata.storage_data or {}).values():
            _inside(Path(self.path), str(info.relative_path), ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged data file
            files = sorted({str(self.storage_data[item.storage_index].relative_path) for item in plan.items})
            raise CheckpointError(f"checkpoint {self.path}: {', '.join(files)} cannot be read ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0].split('. ')[0]}): the checkpoint is damaged; "
                                  f"delete the folder to resume from the previous one") from None


def _load(tensors: dict, path: Path, **kwargs) -> None:
    """dcp.load through SafeReader; DCP's CheckpointException (a BaseException) becomes the rank's own error."""
    try:
        dcp.load(tensors, storage_reader=SafeReader(str(path)), **kwargs)
    except CheckpointException as e:
        inner = _unwrap(e)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(inner).__name__}: {inner})") from None


def _unwrap(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException; any other exception as it is."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


def tensor_metadata(path: Path) -> dict:
    """{name: TensorStorageMetadata} of a DCP checkpoint (global shapes and dtypes), read safely."""
    return SafeReader(str(path)).read_metadata().state_dict_metadata


# -- state the trainer keeps besides tensors -----------------------------------------------------------------------
def _rng_b64() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng(b64: str) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy()))


def set_schedule_position(scheduler, step: int) -> None:
    """Put a LambdaLR (built from the config in effect) at `step` optimizer steps: the learning rates follow."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _contiguous(tree):
    """DCP cannot place `_StridedShard` pieces (tp's [Q|K|V|U] blocks): give such DTensors a plain Shard layout
    of the same global tensor (one all-gather each); everything else is passed through, still sharded."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    if isinstance(tree, DTensor) and any(isinstance(p, _StridedShard) for p in tree.placements):
        placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in tree.placements]
        return distribute_tensor(tree.full_tensor(), tree.device_mesh, placements)
    return tree


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def _copy_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's piece of the full tensor into dst (a plain tensor, or a DTensor with any placements,
    `_StridedShard` included: the local split needs no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):
        dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
    else:
        dst.copy_(full)


def _assign(model, loaded: dict, optimizer=None, loaded_optim: dict | None = None) -> None:
    """Put loaded tensors (DCP placeholders in this layout, or full tensors) into the model's parameters and
    persistent buffers and the optimizer's state, one tensor made whole at a time."""
    params = dict(model.named_parameters())
    for name, t in list(params.items()) + [(n, b) for n, b in model.named_buffers() if n in loaded]:
        if name in loaded:
            _copy_full(t, _full(loaded[name]))
    if optimizer is None:
        return
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and key in loaded_optim.get(name, {}):
                _copy_full(value, _full(loaded_optim[name][key]))


def check_shapes(where, saved: dict, model_sd: dict, stage: bool = False) -> None:
    """Refuse weights that differ from this model's (global shapes), naming the tensor and both shapes.

    saved: {name: shape}. stage: this rank holds one pipeline stage, so other stages' tensors are expected extras.
    """
    missing = sorted(set(model_sd) - set(saved))
    unexpected = [] if stage else sorted(set(saved) - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                              f"the model config differs from the one the weights were saved with")
    for k, v in model_sd.items():
        if tuple(saved[k]) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {tuple(saved[k])}, the model expects "
                                  f"{tuple(v.shape)}: the model config differs from the one the weights were saved with")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META)


def _disk_full(exc: BaseException, root: Path) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(root).free < (64 << 20)
    except OSError:
        return False


class Checkpointer:
    """Save/load the trainer's state; every rank calls every method (a world of one included).

    hooks: objects with optional `on_checkpoint_staged(tmp)` (all shards written, before the rename) and
    `on_checkpoint_saved(final)`, called on rank 0 (the fault-injection tests pause there).
    """

    def __init__(self, run_dir: Path, env, async_save: bool = False, keep_last: int = 3, hooks=()):
        self.run_dir, self.env, self.async_save, self.keep_last = Path(run_dir), env, async_save, keep_last
        self.hooks = list(hooks)
        self.pending = None  # (future, tmp, final, meta) of an async save not yet renamed
        self._group = dist.new_group(backend="gloo") if async_save else None  # off the training group's thread
        if env.rank == 0:
            remove_stale(self.run_dir)

    def _hook(self, name: str, path: Path) -> None:
        for h in self.hooks:
            if hasattr(h, name):
                getattr(h, name)(path)

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, loader, tokens_seen: int, meta: dict, engine=None) -> Path:
        """engine: a DeepSpeed engine (dp_engine=deepspeed): its weights are saved, gathered, like everyone's;
        its optimizer state is not (see `deepspeed_weights`)."""
        self.finalize()
        env, rank = self.env, self.env.rank
        root = checkpoint_dir(self.run_dir)
        final = root / f"{PREFIX}{step:08d}"
        tmp = root / f".tmp-{PREFIX}{step:08d}"
        try:
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            env.barrier()
            if engine is not None:
                tensors = {"model": deepspeed_weights(engine)}
            else:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                tensors = _contiguous({"model": model_sd, "optim": optim_sd["state"]})
            rngs = env.all_gather_object(_rng_b64())
            if rank == 0:
                state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(), "rng": rngs}
                (tmp / STATE).write_text(json.dumps(state, indent=1))
            meta = dict(meta, format=FORMAT, step=step, code_version=code_version())
            if self.async_save:
                future = dcp.async_save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=self._group)
                self.pending = (future, tmp, final, meta)
            else:
                dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)))
                self.pending = (None, tmp, final, meta)
                self.finalize()
        except (Exception, CheckpointException) as e:  # DCP wraps a rank's error in a BaseException
            self.pending = None
            raise self._save_failed(e, tmp, final) from e
        return final

    def _save_failed(self, exc: BaseException, tmp: Path, final: Path) -> Exception:
        exc = _unwrap(exc)
        if self.env.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_complete(self.run_dir)
        kept_msg = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        cause = "no space left on device" if _disk_full(exc, tmp.parent) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PermissionError) or "Permission denied" in str(exc):
            cause = "permission denied"
        return OSError(errno.ENOSPC if cause.startswith("no space") else errno.EIO,
                       f"saving checkpoint {final} failed ({cause}); {kept_msg} and the partial folder was removed; "
                       f"free space or fix {tmp.parent}, then resume", str(tmp.parent))

    def finalize(self) -> None:
        """Wait for the pending save on every rank, then rank 0 hashes, writes meta.json and renames."""
        if self.pending is None:
            return
        future, tmp, final, meta = self.pending
        self.pending = None
        try:
            if future is not None:
                future.result()
            self.env.barrier()  # every rank's shards and small files are on disk
            if self.env.rank == 0:
                self._hook("on_checkpoint_staged", tmp)
                files = {name: sha256(tmp / name) for name in _files(tmp)}
                (tmp / META).write_text(json.dumps(dict(meta, saved_at=time.time(), files=files), indent=2))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in list_complete(self.run_dir)[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        except (Exception, CheckpointException) as e:
            raise self._save_failed(e, tmp, final) from e
        self.env.barrier()
        if self.env.rank == 0:
            self._hook("on_checkpoint_saved", final)

    # -- load ------------------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer, scheduler, loader, stage: bool = False,
             engine=None) -> tuple[int, int]:
        """Everything into this rank's (possibly differently sharded) model, optimizer, schedule and loader.

        Returns (step, tokens_seen). The optimizer's hyperparameters and the LR schedule stay those of the
        config in effect (the schedule is set to the saved step). A checkpoint without optimizer state (written
        by a DeepSpeed run) or a DeepSpeed engine to load into: weights only, AdamW moments restart at zero."""
        path = Path(path)
        saved = tensor_metadata(path)
        if engine is not None or not any(k.startswith("optim.") for k in saved):
            if engine is not None:
                load_deepspeed_weights(path, engine)
            else:
                load_weights(path, model, stage)
            if self.env.rank == 0:
                print(f"note: {path} is resumed without optimizer state (DeepSpeed runs save weights only, see "
                      f"docs/DESIGN.md); AdamW moments restart at zero", flush=True)
            return self._load_small(path, scheduler, loader)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_shapes(f"checkpoint {path}", {k[len("model."):]: v.size for k, v in saved.items()
                                           if k.startswith("model.")}, model_sd, stage)
        # A tied weight's optimizer state is saved under the name its holder used (the embedding without pp;
        # each end of a pipeline saves its own copy): read it under whichever name the checkpoint has.
        optim = {_saved_name(saved, name): v for name, v in optim_sd["state"].items()}
        tensors = _contiguous({"model": model_sd, "optim": optim})
        _load(tensors, path)
        tensors["optim"] = {name: tensors["optim"][_saved_name(saved, name)] for name in optim_sd["state"]}
        # DCP resharded into this layout's placeholders (get_state_dict created the optimizer's state); each
        # tensor is then made whole once and this rank's (possibly strided) piece copied into place.
        _assign(model, tensors["model"], optimizer, tensors["optim"])
        return self._load_small(path, scheduler, loader)

    def _load_small(self, path: Path, scheduler, loader) -> tuple[int, int]:
        try:
            state = json.loads((path / STATE).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / STATE} cannot be read ({e}): the checkpoint is damaged") from None
        if not isinstance(state, dict) or "loader" not in state:
            raise CheckpointError(f"checkpoint {path} holds weights only (no training state): start a run from it "
                                  f"with checkpoint.init_from={path}")
        missing = [k for k in ("step", "tokens_seen", "rng") if k not in state]
        if missing or not isinstance(state["rng"], list) or not state["rng"]:
            raise CheckpointError(f"{path / STATE} lacks {missing or ['rng']}: the checkpoint is damaged; resume from "
                                  f"an earlier one or start with checkpoint.resume=none")
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        _set_rng(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        set_schedule_position(scheduler, int(state["step"]))
        return int(state["step"]), int(state["tokens_seen"])


TIED = ("embed_tokens.weight", "lm_head.weight")  # a decoder's tied table: one tensor under two names


def _saved_name(saved: dict, name: str) -> str:
    """`name`, or its tied alias when only the alias has optimizer state in the checkpoint."""
    if any(k.startswith(f"optim.{name}.") for k in saved):
        return name
    for a, b in (TIED, TIED[::-1]):
        if name.endswith(a):
            alias = name[:-len(a)] + b
            if any(k.startswith(f"optim.{alias}.") for k in saved):
                return alias
    return name


def deepspeed_weights(engine) -> dict:
    """The full weights of a DeepSpeed engine's module (gathered under ZeRO-3), identical on every rank.

    Why no optimizer state: DeepSpeed keeps it as flat fp32 partitions tied to the dp size, and its own
    checkpoints are pickles loaded with torch.load(weights_only=False), which this reader never runs. Resuming a
    DeepSpeed run restarts the AdamW moments (logged); dp_engine=fsdp2 resumes exactly on any layout."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below ZeRO-3
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def load_deepspeed_weights(path: Path, engine) -> None:
    import deepspeed

    _, state = load_model_weights(path)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0):
        check_shapes(f"checkpoint {path}", {k: v.shape for k, v in state.items()}, engine.module.state_dict())
        engine.module.load_state_dict({k: state[k] for k in engine.module.state_dict()})


def load_weights(path: Path, model, stage: bool = False) -> None:
    """Model weights only (init_from): a lightspan checkpoint of any layout into this rank's model, any layout;
    every rank calls it."""
    path = Path(path)
    saved = tensor_metadata(path)
    model_sd = get_model_state_dict(model)
    check_shapes(f"checkpoint {path}", {k[len("model."):]: v.size for k, v in saved.items()
                                       if k.startswith("model.")}, model_sd, stage)
    tensors = _contiguous({"model": model_sd})
    _load(tensors, path)
    _assign(model, tensors["model"])


def load_full_weights(model, state: dict, where: str, stage: bool = False) -> None:
    """Full (unsharded) weights, e.g. read from a Hugging Face folder, into this rank's model, any layout."""
    model_sd = get_model_state_dict(model)
    check_shapes(where, {k: v.shape for k, v in state.items()}, model_sd, stage)
    _assign(model, state)


def load_model_weights(path: Path) -> tuple[dict, dict]:
    """(meta, full model state dict) of a checkpoint, read in this one process (no process group needed)."""
    path = resolve(path)
    meta = read_meta(path)
    saved = tensor_metadata(path)
    model = {k[len("model."):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for k, md in saved.items() if k.startswith("model.")}
    if not model:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    _load({"model": model}, path, no_dist=True)
    return meta, model


def save_weights(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """A weights-only checkpoint `<run>/checkpoints/step_<step>` of a full state dict, in this one process
    (evaluation and conversion write these; a run starts from one with checkpoint.init_from)."""
    return write_weights(checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}", state, meta, step)


def write_weights(out: Path, state: dict, meta: dict, step: int = 0) -> Path:
    """A weights-only checkpoint folder (what `convert --from hf` writes), in this one process."""
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unique = {}
    for k, v in state.items():  # a tied weight is stored under each name, as a plain state dict holds it
        unique[k] = v.detach().clone().contiguous()
    dcp.save({"model": unique}, storage_writer=dcp.FileSystemWriter(str(tmp)),
             no_dist=True)
    (tmp / STATE).write_text(json.dumps({"step": step, "tokens_seen": 0}))
    files = {name: sha256(tmp / name) for name in _files(tmp)}
    (tmp / META).write_text(json.dumps(dict(meta, format=FORMAT, step=step, code_version=code_version(),
                                            saved_at=time.time(), files=files), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


