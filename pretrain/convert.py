"""`lightspan convert`: lightspan checkpoints <-> Hugging Face folders, and the weights a run starts from.

    lightspan convert --to hf CKPT OUT [--tokenizer PATH] [--max-shard-size 5GB] [--dtype float32]
    lightspan convert --from hf HF_DIR OUT

CKPT is a run folder (its newest intact checkpoint) or one checkpoint folder; every checkpoint is read by the
one reader, `pretrain.checkpoint` (DCP, any layout, in this one process). The formats themselves (key names,
config.json, safetensors, tokenizer files) are `model.hf.format`'s. A TNL model becomes a `transnormer` folder
loaded with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`, the softmax baseline a
`LlamaForCausalLM` folder; SharedLLM is refused. `--from hf` writes a weights-only lightspan checkpoint, which
`checkpoint.init_from` starts a run from (as it does from the HF folder itself).

Outputs are built in a hidden sibling folder and renamed into place when complete; an OUT that is, contains or
lies inside the input is refused (--overwrite would delete the input). Exported files are readable by group and
others (0644). Nothing is unpickled: safetensors, the allow-listed DCP reader, torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import json
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from model import ModelConfig
from model.hf import HF_DIR
from model.hf import format as hf
from pretrain import checkpoint


def model_config_from_meta(meta: dict) -> ModelConfig:
    raw = dict((meta.get("config") or {}).get("model") or {})
    if not raw:
        raise ValueError("checkpoint meta.json has no config.model: cannot tell which model it holds")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in raw.items() if k in known})
    cfg.validate()
    return cfg


def load_model_weights(ckpt_path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, full model state dict on CPU) of a run folder or checkpoint folder, in this one process."""
    meta, state = checkpoint.load_model_weights(ckpt_path)
    return model_config_from_meta(meta), state


def is_hf_folder(path) -> bool:
    """A Hugging Face model folder: config.json, and neither a checkpoint (meta.json) nor a run folder (a run
    folder has its own config.json beside checkpoints/)."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / checkpoint.META).is_file()
            and not checkpoint.checkpoint_dir(path).is_dir())


def load_init_weights(source, model, stage: bool = False) -> None:
    """`checkpoint.init_from`: weights only into this rank's (sharded) model, any layout. source: a lightspan
    checkpoint or run folder, or a Hugging Face TNL/Llama folder. A shape mismatch names the tensor and both
    shapes. Every rank calls it."""
    if is_hf_folder(source):
        _, state, _ = hf.read_hf_model(source)
        checkpoint.load_full_weights(model, state, f"Hugging Face folder {source}", stage=stage)
    else:
        checkpoint.load_weights(checkpoint.resolve(source), model, stage=stage)


def find_tokenizer(meta: dict, ckpt: Path) -> Path | None:
    """The tokenizer a checkpoint was trained with: data.tokenizer (a sentencepiece .model, a Hugging Face
    tokenizer.json or a folder holding one), else the prepared folder's tokenizer.model / tokenizer.json (a
    mixture's shared one included; relative paths as the run saw them, i.e. from the current folder), else one
    beside the checkpoint."""
    data = (meta.get("config") or {}).get("data") or {}
    candidates = []
    if data.get("tokenizer"):
        candidates.append(Path(data["tokenizer"]))
    for folder in ([Path(data["prepared_dir"])] if data.get("prepared_dir") else []) + [ckpt]:
        candidates += [folder / "tokenizer.model", folder / "tokenizer.json"]
    for p in candidates:
        if p.is_file() or (p.is_dir() and ((p / "tokenizer.model").is_file() or (p / "tokenizer.json").is_file())):
            return p
    return None


# ------------------------------------------------------------------------------------------------------------
# the two directions
# ------------------------------------------------------------------------------------------------------------
def _check_out(src: Path, out: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the input: replacing it would delete the input."""
    a, b = src.resolve(), out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ValueError(f"the output folder {out} overlaps the input {src} (the same folder, or one inside the "
                         f"other): writing it would destroy the input; choose an output folder elsewhere")


def _fresh_dir(out: Path, overwrite: bool) -> Path:
    """A temporary sibling of out to write into; renamed onto out when complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, out: Path) -> Path:
    """Make the files world-readable (shared storage), then swap the finished folder in."""
    os.chmod(tmp, 0o755)
    for p in tmp.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)
    return out


def export_hf(ckpt, out, tokenizer=None, max_shard_size="5GB", dtype: str | None = None,
              overwrite: bool = False) -> Path:
    """Write the HF folder `out` for a lightspan checkpoint (see the module docstring)."""
    out = Path(out)
    _check_out(Path(ckpt), out)
    ckpt_dir = checkpoint.resolve(ckpt)
    meta, state = checkpoint.load_model_weights(ckpt_dir)
    cfg = model_config_from_meta(meta)
    hf.check_exportable(cfg, f"checkpoint {ckpt_dir}")
    hf.check_state(cfg, state, f"checkpoint {ckpt_dir}")
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(meta, ckpt_dir)
    if tokenizer and not tok_path.exists():
        raise FileNotFoundError(f"--tokenizer {tok_path}: no such file")
    hf_tok = None
    if tok_path is not None:
        from data_pipeline.tokenizer import is_hf_tokenizer, load_tokenizer

        if is_hf_tokenizer(tok_path):  # a Hugging Face tokenizer: shipped as tokenizer.json + tokenizer_config.json
            hf_tok = load_tokenizer(tok_path)
        elif tok_path.is_dir():
            tok_path = tok_path / "tokenizer.model"
    if hf_tok is not None:
        ids = {k: (v if v >= 0 else None) for k, v in (("unk", hf_tok.unk_id), ("bos", hf_tok.bos_id),
                                                         ("eos", hf_tok.eos_id), ("pad", hf_tok.pad_id))}
        pieces = {}
    else:
        ids, pieces = hf.tokenizer_ids(tok_path)
    data = (meta.get("config") or {}).get("data") or {}
    extra = {"source": str(ckpt_dir.resolve()), "step": meta.get("step"), "model": dataclasses.asdict(cfg),
             "context": int(max(data.get("seq_len", 0), 2 ** data.get("max_log2", 0), 4096))}
    tensors = hf.hf_tensors(cfg, state, hf.DTYPES[dtype] if dtype else None)
    tmp = _fresh_dir(out, overwrite)
    try:
        out_dtype = next(iter(tensors.values())).dtype
        (tmp / "config.json").write_text(json.dumps(hf.hf_config(cfg, ids, out_dtype, extra), indent=2))
        gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        hf.write_safetensors(tensors, tmp, hf.parse_size(max_shard_size))
        for name in hf.shipped_code(cfg):
            shutil.copyfile(HF_DIR / name, tmp / name)
        if hf_tok is not None:
            hf.write_hf_tokenizer(hf_tok.json_bytes, hf_tok.config, tmp, hf_tok.vocab_size, cfg.vocab_size,
                                  tok_path)
            print(f"[convert] tokenizer (Hugging Face tokenizer.json): {tok_path}")
        elif tok_path is not None:
            hf.write_tokenizer(tok_path, tmp, pieces, cfg.vocab_size)
            print(f"[convert] tokenizer: {tok_path}")
        else:
            print(f"[convert] no tokenizer found for {ckpt_dir} (pass --tokenizer PATH): the export has none",
                  file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit_dir(tmp, out)


def import_hf(hf_dir, out, overwrite: bool = False) -> Path:
    """Write a weights-only lightspan checkpoint folder `out` from a TNL or Llama HF folder."""
    from pretrain.config import Config, to_dict

    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(hf_dir, out)
    cfg, state, raw = hf.read_hf_model(hf_dir)
    full = Config()
    full.model = cfg
    tmp = _fresh_dir(out, overwrite)
    try:
        if (hf_dir / "tokenizer.model").is_file():
            shutil.copyfile(hf_dir / "tokenizer.model", tmp / "tokenizer.model")
            full.data.tokenizer = str((out / "tokenizer.model").resolve())
        meta = {"config": to_dict(full), "tokens_seen": 0,
                "source": {"hf_dir": str(hf_dir.resolve()), "model_type": raw.get("model_type")}}
        checkpoint.write_weights(tmp / "weights", state, meta)
        for p in (tmp / "weights").iterdir():
            os.replace(p, tmp / p.name)
        (tmp / "weights").rmdir()
        checkpoint.verify(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit_dir(tmp, out)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="lightspan convert", description=__doc__.split("\n\n")[0])
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="lightspan checkpoint -> Hugging Face folder")
    direction.add_argument("--from", dest="from_", choices=["hf"], help="Hugging Face folder -> lightspan checkpoint")
    p.add_argument("src", help="--to hf: a run folder or checkpoint folder; --from hf: a Hugging Face folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--tokenizer", help="tokenizer to ship: a sentencepiece .model, or a Hugging Face tokenizer.json or "
                                       "its folder (default: the one the run was trained with)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (e.g. 2GB, 500MB)")
    p.add_argument("--dtype", choices=sorted(hf.DTYPES), help="cast the exported weights (default: as saved)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.to:  # errors reach the CLI boundary (pretrain.errors): one line, exit 2
        out = export_hf(args.src, args.out, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                        dtype=args.dtype, overwrite=args.overwrite)
        print(f"[convert] wrote Hugging Face folder {out.resolve()}")
    else:
        out = import_hf(args.src, args.out, overwrite=args.overwrite)
        print(f"[convert] wrote lightspan checkpoint {out.resolve()}")
    return 0


if __name__ == "__main__":
    from pretrain.errors import run_cli

    sys.exit(run_cli(main))
