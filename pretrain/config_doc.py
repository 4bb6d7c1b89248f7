"""The config schema explained from its own source: every field's path, type, default and one-line meaning.

Nothing here is a second copy of the schema: the fields, types and defaults are read from the dataclasses
(pretrain.config.Config and the sections it nests, model.config.ModelConfig included), and the meaning of a field
from its comment in the source: the trailing `# comment` on the field's line, else the comment block right above
it. pretrain.config.CHOICES and RANGES add the allowed values. A field whose source has no comment falls back to
FALLBACK below (one line each; a comment added in the source takes precedence, and test_cli_help lists the
fields that still rely on it).

    lightspan train --help      the table (fields_help)
    lightspan config fields     the same table alone
    lightspan config show --config C [--section.key=value ...]   the resolved config as YAML (config_yaml)
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
import typing
from dataclasses import dataclass

# Meanings of the fields whose source line carries no comment yet (see the module docstring).
FALLBACK = {
    "model.vocab_size": "vocabulary size (the tokenizer's; a larger value is padding)",
    "model.layers": "decoder layers",
    "model.heads": "attention heads per layer (head size = dim / heads)",
    "model.no_scale_embedding": "true: do not multiply the embeddings by sqrt(dim)",
    "model.norm_eps": "epsilon of the RMS norms",
    "model.init_std": "standard deviation of the initial weights",
    "model.tie_embeddings": "the output head shares the embedding matrix",
    "data.text_field": "the column (JSON key) holding a document's text",
    "data.workers": "tokenizer processes when preparing the data",
    "data.min_log2": "dd: the shortest bucket is 2^min_log2 tokens",
    "data.max_log2": "dd: the longest bucket is 2^max_log2 tokens",
    "data.cycles": "curriculum cycles over the buckets",
    "train.steps": "optimizer steps of the whole run (a resumed run stops here too)",
    "train.seed": "seed of the weights' initialisation and the data order",
    "train.lr": "the peak learning rate (after warm-up; cosine decay to lr x min_lr_ratio)",
    "train.min_lr_ratio": "the final learning rate as a fraction of train.lr",
    "train.warmup_steps": "linear warm-up steps",
    "train.weight_decay": "AdamW's decoupled weight decay",
    "train.beta1": "AdamW's first-moment decay",
    "train.beta2": "AdamW's second-moment decay",
    "train.eps": "AdamW's denominator term",
    "train.grad_accum": "micro-batches accumulated per optimizer step",
    "parallel.dp": "data-parallel size (sharded: FSDP2 or DeepSpeed ZeRO)",
    "parallel.pp": "pipeline-parallel stages",
    "parallel.cp": "context-parallel size (each sequence split over cp ranks: LASP for lightning layers)",
    "parallel.tp": "tensor-parallel size (heads and MLP widths split over tp ranks)",
    "parallel.zero_stage": "DeepSpeed ZeRO stage (1, 2 or 3) when dp_engine=deepspeed",
    "checkpoint.keep_last": "how many complete checkpoints to keep",
    "log.every": "steps between metrics lines (loss averaged over them)",
    "log.tensorboard": "write TensorBoard scalars to <run>/tensorboard",
}

MAX_MEANING = 160  # characters of a meaning taken from a long comment block (its first sentence, cut here)


@dataclass(frozen=True)
class FieldDoc:
    path: str  # section.key
    type: str
    default: object
    meaning: str
    source: str  # "comment" | "fallback" | "" (nothing known)


def _comments(cls) -> dict[str, str]:
    """field name -> its comment in the class source (trailing, else the block right above)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): meanings fall back
        return {}
    trailing, alone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (alone if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        on_line = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
        if on_line:
            out[node.target.id] = " ".join(on_line)
            continue
        block, row = [], node.lineno - 1
        while row in alone:
            block.insert(0, alone[row])
            row -= 1
        if block:
            out[node.target.id] = _first_sentence(" ".join(block))
    return out


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    text = text if end < 0 else text[:end]
    return text if len(text) <= MAX_MEANING else text[:MAX_MEANING - 3].rstrip() + "..."


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is not None:
        return str(typ).replace("typing.", "")
    return getattr(typ, "__name__", str(typ))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def format_value(value) -> str:
    """A value as it is written in an override (--section.key=VALUE) or YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else repr(value)
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def _rules(path: str, section: str, name: str) -> str:
    """What the schema allows beyond the type: CHOICES and the numeric ranges."""
    from model import config as model_config
    from pretrain import config as pretrain_config

    if path in pretrain_config.CHOICES:
        return "one of: " + ", ".join(pretrain_config.CHOICES[path])
    if path in pretrain_config.RANGES:
        return pretrain_config.RANGES[path].describe()
    if section == "model" and name in model_config.RANGES:
        _, low, inclusive = model_config.RANGES[name]
        return f"{'>=' if inclusive else '>'} {low:g}"
    return ""


def field_docs(cfg_cls=None) -> list[FieldDoc]:
    """Every leaf field of the schema (sections in order, fields in order), documented."""
    from pretrain import config as pretrain_config

    cfg_cls = cfg_cls or pretrain_config.Config
    out = []
    for section in dataclasses.fields(cfg_cls):
        cls = typing.get_type_hints(cfg_cls)[section.name]
        hints = typing.get_type_hints(cls)
        comments = _comments(cls)
        notes = {}
        for f in dataclasses.fields(cls):
            path = f"{section.name}.{f.name}"
            meaning, source = comments.get(f.name, ""), "comment"
            if not meaning:
                range_rule = pretrain_config.RANGES.get(path)
                meaning, source = FALLBACK.get(path) or (range_rule.note if range_rule else ""), "fallback"
                source = source if meaning else ""
            rule = _rules(path, section.name, f.name)
            if rule and not all(word in meaning for word in rule.removeprefix("one of: ").split(", ")):
                meaning = f"{meaning} [{rule}]" if meaning else f"[{rule}]"
            notes[f.name] = FieldDoc(path, _type_name(hints[f.name]), _default(f), meaning, source)
        out.extend(notes[f.name] for f in dataclasses.fields(cls))
    return out


def fields_help() -> str:
    """The table `lightspan train --help` ends with: one line per field."""
    docs = field_docs()
    wide_path = max(len(d.path) for d in docs)
    wide_type = max(len(d.type) for d in docs)
    wide_default = min(16, max(len(format_value(d.default)) for d in docs))
    lines = ["config fields (set any as --section.key=VALUE; default = the schema's, a --config file overrides it):",
             f"  {'field':<{wide_path}}  {'type':<{wide_type}}  {'default':<{wide_default}}  meaning"]
    section = None
    for d in docs:
        if d.path.split(".")[0] != section:
            section = d.path.split(".")[0]
            lines.append(f"  [{section}]")
        lines.append(f"  {d.path:<{wide_path}}  {d.type:<{wide_type}}  {format_value(d.default):<{wide_default}}  "
                     f"{d.meaning or '-'}")
    return "\n".join(lines)


def config_yaml(cfg, header: str = "") -> str:
    """The resolved config as YAML that load_config reads back to the same Config."""
    import yaml

    from pretrain.config import to_dict

    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)
    return (f"# {header}\n" if header else "") + body
