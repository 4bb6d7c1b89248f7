"""The one config schema: typed nested dataclasses, loaded from YAML, overridden by dotted CLI flags.

    cfg = load_config("configs/tiny.yaml", ["--train.lr=3e-4", "--parallel.tp=2"])

Every value is checked against its field's type and numeric range (RANGES, check_ranges); unknown keys and bad
values raise ConfigError naming the field, the value, what is allowed and the fix. Malformed YAML is a
ConfigError naming the file and the line.
"""
from __future__ import annotations

import dataclasses
import math
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
    # an existing tokenizer: a sentencepiece .model, or a Hugging Face tokenizer.json or folder holding one (local
    # only); empty: train a sentencepiece one with model.vocab_size
    tokenizer: str = ""
    # a mixture instead of data.source: [{path, weight, text_field, dir}, ...]; each source is prepared into
    # prepared_dir/<dir> (default: its file name + a hash) with one tokenizer, and the loader blends them by weight
    sources: list = field(default_factory=list)
    holdout: float = 0.0  # fraction of the documents (evenly spread) no loader reads; evaluation's perplexity does
    holdout_docs: int = 0  # ... or that many documents (give one of the two)
    workers: int = 2
    loader: str = "dd"  # "dd" (dataset decomposition) or "concat" (concat-and-chunk baseline)
    seq_len: int = 2048  # concat: the fixed length; dd: the longest bucket is 2^max_log2
    tokens_per_step: int = 65536  # global tokens per optimizer step (all dp ranks together)
    min_log2: int = 8
    max_log2: int = 13
    curriculum: str = "grow_p2"  # uniform | grow_p2 | grow_linear
    cycles: int = 8
    # data.source: synthetic:retrieval, real corpus text with facts and later questions (data_pipeline/synthetic.py)
    synthetic_seed: int = 0  # synthetic:retrieval: the seed its documents are generated from
    synthetic_documents: int = 2000  # synthetic:retrieval: documents generated (plain and retrieval together)
    synthetic_fraction: float = 0.5  # synthetic:retrieval: share of retrieval documents (the rest: plain corpus text)
    synthetic_kinds: list = field(default_factory=list)  # synthetic kinds: passkey multikey multihop needle ([]: all)
    synthetic_keys: int = 4  # synthetic:retrieval: most facts in a multikey/needle document (multihop: keys // 2 chains)
    synthetic_min_distance: int = 64  # synthetic:retrieval: fewest tokens from a fact to its question
    synthetic_max_distance: int = 4096  # most tokens from a fact to its question (<= 2^max_log2 - 129: one DD piece)


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
    # the largest global gradient norm, > 0; .inf (YAML) or --train.grad_clip=inf turns clipping off (the norm is
    # still measured and logged). 0 and negatives are refused: 0 would zero every gradient in the single-process
    # path while the distributed one skipped clipping, and a negative one flips the gradients' sign
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    on_nan: str = "stop"  # stop (raise, naming the step; nothing poisoned is saved) | skip (drop that update)
    # none | full (a block keeps its input only) | selective (keeps matmul outputs, recomputes the rest)
    activation_checkpointing: str = "none"
    loss_chunk: int = 1024  # tokens per chunk of the fused head + cross-entropy (never full logits); 0: unchunked
    compile: bool = False  # torch.compile each block (regional); sequence lengths marked dynamic
    max_skipped_steps: int = 10  # on_nan=skip: the run stops once more than this many updates were skipped


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
    microbatches: int = 0  # pipeline micro-batches per step; 0: one per stage (= parallel.pp)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0 saves only at the end
    resume: str = "auto"  # auto (latest complete one in the run folder) | none | a checkpoint path
    keep_last: int = 3
    async_save: bool = False  # write the sharded checkpoint in a background thread
    # start a new run (step 0, fresh optimizer) from these weights: a lightspan checkpoint (any layout; a run
    # folder means its newest one) or a Hugging Face TNL/Llama folder as `convert --to hf` writes it
    init_from: str = ""


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    batches: bool = False  # every rank records what it read per step in <run>/batches/rank<r>.jsonl (audit)
    # also log to Weights & Biases when wandb is installed (offline under <run>/wandb/ unless WANDB_API_KEY/WANDB_MODE)
    wandb: bool = False
    val_every: int = 0  # steps between validation losses on the held-out split (data.holdout*); 0: none
    val_tokens: int = 65536  # held-out tokens each validation scores (sequences of the longest training length)


@dataclass
class ProfileConfig:
    steps: list = field(default_factory=list)  # steps to trace with torch.profiler (<run>/profile/); [] : none
    memory_snapshot: bool = False  # on GPU, also dump a CUDA memory snapshot of those steps (pytorch.org/memory_viz)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


CHOICES = {
    "data.loader": ("dd", "concat"),
    "data.curriculum": ("uniform", "grow_p2", "grow_linear"),
    "train.precision": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nan": ("stop", "skip"),
    "train.activation_checkpointing": ("none", "full", "selective"),
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
    hint = ""
    if typ in (int, float) and isinstance(value, str):
        hint = "; write the number without quotes"
    raise ConfigError(f"{path}: expected {getattr(typ, '__name__', typ)}, got {value!r} ({type(value).__name__}){hint}")


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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override --{key}: cannot read {raw!r} as a YAML value; quote it or close its "
                              f"brackets, e.g. --{key}=[0,1]") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        i += 1
    return out


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: low..high, each end open or closed; floats finite unless allow_inf."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    allow_inf: bool = False  # +inf is a meaningful value (train.grad_clip: no clipping)
    note: str = ""  # what the field is, shown with the fix

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def admits(self, value) -> bool:
        if value == math.inf and self.allow_inf:
            return self.high == math.inf
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


# The numeric ranges of the schema (the model section keeps its own, in model.config.RANGES). Every float field,
# listed here or not, must be finite: NaN and infinities are refused everywhere except where allow_inf says so.
RANGES = {
    "train.lr": Range(0, low_open=True, note="the peak learning rate"),
    "train.min_lr_ratio": Range(0, 1, note="the final learning rate as a fraction of train.lr"),
    "train.warmup_steps": Range(0),
    "train.weight_decay": Range(0),
    "train.beta1": Range(0, 1, high_open=True, note="AdamW's first-moment decay"),
    "train.beta2": Range(0, 1, high_open=True, note="AdamW's second-moment decay"),
    "train.eps": Range(0, low_open=True, note="AdamW's denominator term"),
    "train.grad_clip": Range(0, low_open=True, allow_inf=True,
                             note="the largest global gradient norm; --train.grad_clip=inf turns clipping off"),
    "train.threads": Range(0, note="0 leaves torch's default"),
    "train.max_skipped_steps": Range(0, note="with train.on_nan=skip, the run stops after more skipped updates"),
    "data.workers": Range(0),
    "data.holdout": Range(0, 1, high_open=True, note="the fraction of documents held out of training"),
    "data.holdout_docs": Range(0, note="documents held out of training"),
    "data.synthetic_seed": Range(0, note="the seed of the synthetic:retrieval documents"),
    "data.synthetic_documents": Range(1, note="documents the synthetic:retrieval source generates"),
    "data.synthetic_fraction": Range(0, 1, note="the share of retrieval documents in synthetic:retrieval"),
    "data.synthetic_keys": Range(1, note="facts asked about in a synthetic multikey/needle document, at most"),
    "data.synthetic_min_distance": Range(1, note="tokens from a synthetic fact to its question, at least"),
    "data.synthetic_max_distance": Range(1, note="tokens from a synthetic fact to its question, at most"),
    "checkpoint.every": Range(0, note="0 saves only at the end"),
    "checkpoint.keep_last": Range(1),
    "train.loss_chunk": Range(0, note="0 computes the whole logits at once"),
    "parallel.microbatches": Range(0, note="0: one per pipeline stage"),
    "log.val_every": Range(0, note="0 turns validation off"),
    "log.val_tokens": Range(1),
}


def check_ranges(cfg: Config) -> None:
    """Refuse a value outside its field's range (RANGES) and any non-finite float, naming field, value and fix."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            path, value = f"{section.name}.{f.name}", getattr(obj, f.name)
            rule = RANGES.get(path)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if rule is not None:
                    raise ConfigError(f"{path} must be a number {rule.describe()}, got {value!r} "
                                      f"({type(value).__name__}); set --{path} to a value {rule.describe()}")
                continue
            if rule is None:
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{path} must be a finite number, got {value}; set --{path} to a finite value")
                continue
            if not rule.admits(value):
                what = f" ({rule.note})" if rule.note else ""
                raise ConfigError(f"{path} must be {rule.describe()}{what}, got {value!r}; "
                                  f"set --{path} to a value {rule.describe()}")


def check_pipeline(cfg: Config) -> None:
    """A pipeline of pp stages needs at least pp micro-batches per step (torch's 1F1B refuses fewer, but only
    after the model is built; GPipe and interleaved would leave stages idle)."""
    p = cfg.parallel
    if p.microbatches == 0:
        p.microbatches = p.pp
    if p.pp > 1 and p.microbatches < p.pp:
        raise ConfigError(f"parallel.microbatches ({p.microbatches}) must be >= parallel.pp ({p.pp}): a {p.pp}-stage "
                          f"pipeline needs at least one micro-batch per stage; set --parallel.microbatches={p.pp}")


def validate(cfg: Config) -> None:
    check_ranges(cfg)
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
                "parallel.dp", "parallel.pp", "parallel.cp", "parallel.tp", "data.cycles"]
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
    if cfg.data.holdout and cfg.data.holdout_docs:
        raise ConfigError(f"data.holdout ({cfg.data.holdout}) and data.holdout_docs ({cfg.data.holdout_docs}) are both "
                          f"set: give one (a fraction of the documents, or a count)")
    if cfg.data.sources:
        from pretrain.data import mixture_sources

        try:
            mixture_sources(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    from parallel.mesh import LayoutError, check_layout
    from parallel.specs import spec_for

    try:
        check_layout(cfg.parallel, None, cfg.model, cfg.data)  # the one layout check (the world: at start-up)
        spec_for(cfg.model).validate(cfg)  # what the architecture adds
    except (LayoutError, ValueError) as e:
        raise ConfigError(str(e)) from None
    check_pipeline(cfg)


def _read_yaml(path: Path):
    """The YAML document in path; malformed YAML (or a file that is not text) is a ConfigError naming file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"pass a YAML file such as configs/tiny.yaml") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; fix that line "
                          f"(indentation, a missing ':' or an unclosed quote or bracket)") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (the configs/ folder has the shipped ones)")
        raw = _read_yaml(path) or {}
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
