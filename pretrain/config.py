"""The one config schema: typed nested dataclasses, loaded from YAML, overridden by dotted CLI flags.

    cfg = load_config("configs/tiny.yaml", ["--train.lr=3e-4", "--parallel.tp=2"])

Every value is checked against its field's type; unknown keys and bad values raise ConfigError naming
the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ModelConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (embedded corpus), a local file/folder, or a hub dataset name
    text_field: str = "text"
    prepared_dir: str = "data/stdlib"  # token shards + index + tokenizer live here
    tokenizer: str = ""  # existing sentencepiece .model; empty: train one with model.vocab_size
    workers: int = 2
    loader: str = "dd"  # "dd" (dataset decomposition) or "concat" (concat-and-chunk baseline)
    seq_len: int = 2048  # concat: the fixed length; dd: the longest bucket is 2^max_log2
    tokens_per_step: int = 65536  # global tokens per optimizer step (all dp ranks together)
    min_log2: int = 8
    max_log2: int = 13
    curriculum: str = "grow_p2"  # uniform | grow_p2 | grow_linear
    cycles: int = 8


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 1234
    out_dir: str = "runs/default"  # the run folder: metrics.jsonl, tensorboard/, checkpoints/
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    on_nan: str = "stop"  # stop (raise, naming the step; nothing poisoned is saved) | skip (drop that update)


@dataclass
class ParallelConfig:
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    sequence_parallel: bool = False  # Megatron-SP: norms/residuals on sequence shards between the tp regions
    dp_engine: str = "fsdp2"  # fsdp2 | deepspeed
    zero_stage: int = 2
    cp_impl: str = "lasp2"  # lasp2 | lasp1
    attn_cp_impl: str = "ring"  # ring | ulysses | ulysses_deepspeed (softmax layers; DeepSpeed's all-to-alls)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved | gpipe
    microbatches: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0 saves only at the end
    resume: str = "auto"  # auto (latest complete one in the run folder) | none | a checkpoint path
    keep_last: int = 3
    async_save: bool = False  # distributed runs: write the sharded checkpoint in a background thread


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "data.loader": ("dd", "concat"),
    "data.curriculum": ("uniform", "grow_p2", "grow_linear"),
    "train.precision": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nan": ("stop", "skip"),
    "parallel.dp_engine": ("fsdp2", "deepspeed"),
    "parallel.cp_impl": ("lasp2", "lasp1"),
    "parallel.attn_cp_impl": ("ring", "ulysses", "ulysses_deepspeed"),
    "parallel.pp_schedule": ("1f1b", "interleaved", "gpipe"),
}


def _coerce(path: str, value, typ):
    """Check (and where lossless, convert) one value against a field type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"{path}: expected {getattr(typ, '__name__', typ)}, got {value!r} ({type(value).__name__})")


def _merge(obj, updates: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of its fields, got {value!r}")
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _parse_overrides(overrides: list[str]) -> dict:
    """['--train.lr=3e-4', '--model.layers', '4'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--") or item == "--":
            raise ConfigError(f"cannot read override {item!r}: write it as --section.key=value")
        body = item[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, raw = body, overrides[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {item!r} has no value: write it as --{body}=VALUE")
        if "." not in key:
            raise ConfigError(f"override --{key}: name the section, e.g. --train.{key}=...")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        i += 1
    return out


def validate(cfg: Config) -> None:
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for path, allowed in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{path} must be one of {list(allowed)}, got {value!r}")
    positive = ["train.steps", "train.grad_accum", "data.tokens_per_step", "data.seq_len", "log.every",
                "parallel.dp", "parallel.pp", "parallel.cp", "parallel.tp", "parallel.microbatches", "data.cycles"]
    for path in positive:
        section, key = path.split(".")
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{path} must be positive, got {getattr(getattr(cfg, section), key)}")
    d = cfg.data
    if not 1 <= d.min_log2 <= d.max_log2:
        raise ConfigError(f"data.min_log2 ({d.min_log2}) must be >= 1 and <= data.max_log2 ({d.max_log2})")
    longest = d.seq_len if d.loader == "concat" else 2**d.max_log2
    if d.tokens_per_step % longest:
        raise ConfigError(
            f"data.tokens_per_step ({d.tokens_per_step}) must be a multiple of the longest sequence ({longest}"
            f"{' = 2^data.max_log2' if d.loader == 'dd' else ' = data.seq_len'}) so every step holds whole sequences"
        )
    if cfg.train.warmup_steps < 0 or cfg.train.lr <= 0:
        raise ConfigError(f"train.lr ({cfg.train.lr}) must be > 0 and train.warmup_steps ({cfg.train.warmup_steps}) >= 0")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    p = cfg.parallel
    if cfg.model.heads % p.tp:
        raise ConfigError(f"model.heads ({cfg.model.heads}) not divisible by parallel.tp ({p.tp})")
    if cfg.model.layers % p.pp:
        raise ConfigError(f"model.layers ({cfg.model.layers}) not divisible by parallel.pp ({p.pp})")
    if p.pp > 1 and p.pp_schedule == "interleaved" and cfg.model.layers < 2 * p.pp:
        raise ConfigError(f"parallel.pp_schedule=interleaved runs 2 stages per pp rank: model.layers "
                          f"({cfg.model.layers}) must be at least 2 x parallel.pp ({2 * p.pp}); use 1f1b or fewer ranks")
    if cfg.model.arch == "sharedllm":
        from pretrain.data import check_sharedllm_data

        try:
            check_sharedllm_data(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if p.pp > 1 and cfg.model.sharedllm_layers > cfg.model.layers // p.pp:
            raise ConfigError(f"model.sharedllm_layers ({cfg.model.sharedllm_layers}) must fit in the first pipeline "
                              f"stage ({cfg.model.layers // p.pp} layers at parallel.pp={p.pp}): the compressor and "
                              f"the cross-attention it feeds run on stage 0; lower parallel.pp or sharedllm_layers")
        if p.tp > 1 and p.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel is not supported for model.arch=sharedllm (its cross-"
                              "attention reads the unsharded sequence); set parallel.sequence_parallel=false")
        if p.tp > 1 and cfg.model.sharedllm_lower != "shared":
            raise ConfigError("tensor parallelism for model.arch=sharedllm needs model.sharedllm_lower=shared")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (the configs/ folder has the shipped ones)")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections {list(Config.__dataclass_fields__)}")
        _merge(cfg, raw, "")
    _merge(cfg, _parse_overrides(overrides or []), "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict) -> Config:
    cfg = Config()
    _merge(cfg, raw, "")
    validate(cfg)
    return cfg
