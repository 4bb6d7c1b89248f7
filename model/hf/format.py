"""The Hugging Face formats lightspan reads and writes, per architecture: key names, config.json, safetensors,
the tokenizer files (a sentencepiece model with our tokenizer class, or a Hugging Face tokenizer.json as is). No checkpoints and no ranks here (`pretrain.convert` is the CLI around it).

TNL (arch "tnl", hybrids included) exports as a `transnormer` folder with our remote code (configuration/
modeling/tokenization files, `auto_map`); the softmax baseline (arch "llama") as a standard `LlamaForCausalLM`
folder; SharedLLM has no Hugging Face form. Weights are read with safetensors, or torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model import ModelConfig, build_model
from model.hf import HF_DIR  # the remote-code files shipped into exports

REMOTE_MODEL = ("configuration_transnormer.py", "modeling_transnormer.py")
REMOTE_TOKENIZER = ("tokenization_transnormer.py",)

TNL_AUTO_MAP = {
    "AutoConfig": "configuration_transnormer.TransnormerConfig",
    "AutoModel": "modeling_transnormer.TransnormerModel",
    "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_transnormer.TransnormerTokenizer", None]}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# sentencepiece ids lightspan's tokenizer fixes (data_pipeline/tokenizer.py): used when no tokenizer is found
DEFAULT_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def check_exportable(cfg: ModelConfig, where) -> None:
    if cfg.arch == "sharedllm":
        raise ValueError(f"{where} holds a SharedLLM model: the Hugging Face export covers TNL (hybrids included) "
                         f"and Llama models only; evaluate it in place with `lightspan eval` (which reads lightspan "
                         f"checkpoints directly)")


def hf_tensors(cfg: ModelConfig, state: dict, dtype: torch.dtype | None = None) -> dict:
    """Our state dict -> the HF folder's tensors (HF names, contiguous, no shared storage, cast to dtype)."""
    tensors, seen = {}, set()
    for key, t in state.items():
        if cfg.arch == "llama" and cfg.tie_embeddings and key == "lm_head.weight":
            continue  # a tied Llama stores the embedding once, as transformers saves it
        t = t.detach().to("cpu")
        if dtype is not None:
            t = t.to(dtype)
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        t = t.clone() if ptr in seen else t.contiguous()  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[to_hf_key(cfg, key)] = t
    return tensors


def shipped_code(cfg: ModelConfig) -> tuple[str, ...]:
    """The remote-code files an export of cfg carries (TNL: ours; Llama: none, transformers has it)."""
    return REMOTE_MODEL if cfg.arch == "tnl" else ()


def read_hf_model(hf_dir) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, our full state dict, raw config.json) of a TNL or Llama Hugging Face folder, checked."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads((hf_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{hf_dir / 'config.json'} is not valid JSON ({e})") from None
    cfg = model_config_from_hf(raw, str(hf_dir))
    state = {from_hf_key(cfg, key): t for key, t in read_hf_weights(hf_dir).items()}
    check_state(cfg, state, f"Hugging Face folder {hf_dir}", rename=lambda k: to_hf_key(cfg, k))
    if cfg.arch == "tnl" or cfg.tie_embeddings:
        if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]):
            raise ValueError(f"{hf_dir}: lm_head.weight differs from model.embed_tokens.weight but the model ties "
                             f"them (TNL always; Llama with tie_word_embeddings), so it cannot be imported as is")
        state["lm_head.weight"] = state["embed_tokens.weight"]  # tied: one tensor, as our model's state dict has it
    return cfg, state, raw


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our state-dict keys and shapes for cfg, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(cfg: ModelConfig, state: dict, where: str, rename=lambda k: k) -> None:
    """Refuse missing/unexpected keys and shape mismatches, naming the tensor as `where` spells it."""
    want = expected_shapes(cfg)
    if (cfg.arch == "tnl" or cfg.tie_embeddings) and "lm_head.weight" not in state:
        want.pop("lm_head.weight")  # tied: transformers' save_pretrained stores the embedding only
    missing = [rename(k) for k in want if k not in state]
    unexpected = [rename(k) for k in state if k not in want]
    if missing or unexpected:
        raise ValueError(f"{where} does not match its config: missing tensors {missing[:6]}, "
                         f"unexpected tensors {unexpected[:6]}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{where}: tensor {rename(k)!r} has shape {tuple(state[k].shape)} but the config "
                             f"implies {shape}")


# ------------------------------------------------------------------------------------------------------------
# key names and configs
# ------------------------------------------------------------------------------------------------------------
def to_hf_key(cfg: ModelConfig, key: str) -> str:
    """Our state-dict key -> the HF one. TNL (hybrid S layers included: token_mixer.{q,k,v,o}_proj) keeps our
    names under `model.`; Llama differs only in its final norm."""
    if key == "lm_head.weight":
        return key
    if cfg.arch == "llama" and key == "final_norm.weight":
        return "model.norm.weight"
    return "model." + key


def from_hf_key(cfg: ModelConfig, key: str) -> str:
    if key == "lm_head.weight":
        return key
    if cfg.arch == "llama" and key == "model.norm.weight":
        return "final_norm.weight"
    return key[len("model."):] if key.startswith("model.") else "<not under model.>" + key


def hf_config(cfg: ModelConfig, ids: dict, dtype: torch.dtype, extra: dict) -> dict:
    """config.json for cfg; ids holds bos/eos/pad token ids."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
              "pad_token_id": ids["pad"], "use_cache": True, "torch_dtype": str(dtype).replace("torch.", "")}
    if cfg.arch == "tnl":
        return {
            "architectures": ["TransnormerForCausalLM"], "auto_map": TNL_AUTO_MAP, "model_type": "transnormer",
            **common,
            "decoder_embed_dim": cfg.dim, "decoder_layers": cfg.layers, "decoder_attention_heads": cfg.heads,
            "hidden_dim": cfg.dim, "glu_dim": cfg.glu_dim,
            "linear_use_lrpe_list": [1 if i in cfg.lrpe_layers else 0 for i in range(cfg.layers)],
            "norm_type": "simplermsnorm", "linear_act_fun": "silu", "glu_act": "none", "bias": False,
            "no_scale_embedding": cfg.no_scale_embedding, "init_std": cfg.init_std, "norm_eps": cfg.norm_eps,
            # hybrids: L/S letters tiled over the layers, and the RoPE base of the S layers
            "attention_pattern": cfg.attention_pattern, "rope_theta": cfg.rope_theta,
            "add_bos_token": False, "tie_word_embeddings": True, "lightspan": extra,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
        "hidden_size": cfg.dim, "intermediate_size": cfg.glu_dim, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": extra.get("context", 4096), "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, 5 reads rope_parameters: our RoPE is the plain (default) one
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "lightspan": extra,
    }


def model_config_from_hf(raw: dict, where: str) -> ModelConfig:
    """Our ModelConfig from a config.json; refuses what is not a TNL or Llama export we can compute."""
    kind = raw.get("model_type")

    def need(name):
        if name not in raw:
            raise ValueError(f"{where}: config.json of a {kind!r} model lacks {name!r}")
        return raw[name]

    def refuse_unless(name, ok, default):
        value = raw.get(name, default)
        if value not in ok:
            raise ValueError(f"{where}: config.json has {name}={value!r}; lightspan supports only {ok}")

    if kind == "transnormer":
        for name, ok, default in (("norm_type", ["simplermsnorm"], "simplermsnorm"),
                                  ("linear_act_fun", ["silu"], "silu"), ("glu_act", ["none"], "none"),
                                  ("bias", [False], False)):
            refuse_unless(name, ok, default)
        dim = need("decoder_embed_dim")
        if raw.get("hidden_dim", dim) != dim:
            raise ValueError(f"{where}: hidden_dim ({raw['hidden_dim']}) differs from decoder_embed_dim ({dim}); "
                             f"lightspan's TNL needs them equal")
        layers = need("decoder_layers")
        flags = raw.get("linear_use_lrpe_list") or []
        cfg = ModelConfig(arch="tnl", vocab_size=need("vocab_size"), dim=dim, layers=layers,
                          heads=need("decoder_attention_heads"), glu_dim=need("glu_dim"),
                          lrpe_layers=[i for i, f in enumerate(flags[:layers]) if f],
                          no_scale_embedding=bool(raw.get("no_scale_embedding", False)),
                          norm_eps=float(raw.get("norm_eps", 1e-6)), init_std=float(raw.get("init_std", 0.02)),
                          attention_pattern=str(raw.get("attention_pattern") or "L"),
                          rope_theta=float(raw.get("rope_theta", 10000.0)))
    elif kind == "llama":
        dim, heads = need("hidden_size"), need("num_attention_heads")
        refuse_unless("hidden_act", ["silu"], "silu")
        refuse_unless("attention_bias", [False], False)
        refuse_unless("mlp_bias", [False], False)
        refuse_unless("num_key_value_heads", [heads, None], heads)
        refuse_unless("head_dim", [dim // heads, None], None)
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling")
        if (scaling and scaling.get("rope_type", scaling.get("type")) != "default") or \
                rope.get("rope_type", "default") != "default":
            raise ValueError(f"{where}: rope scaling {scaling or rope} is not supported (plain RoPE only)")
        cfg = ModelConfig(arch="llama", vocab_size=need("vocab_size"), dim=dim, layers=need("num_hidden_layers"),
                          heads=heads, glu_dim=need("intermediate_size"), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                          init_std=float(raw.get("initializer_range", 0.02)),
                          rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                          tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    else:
        raise ValueError(f"{where} is not a TNL or Llama Hugging Face export: config.json has model_type {kind!r} "
                         f"(expected 'transnormer' or 'llama')")
    cfg.validate()
    return cfg


def parse_size(text) -> int:
    """'5GB' -> 5e9, '200MiB' -> 200*2^20, '1234' -> 1234 bytes."""
    s = str(text).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def write_safetensors(tensors: dict, out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write tensors (in order) into model.safetensors, or shards plus an index past max_shard_bytes."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def read_hf_weights(hf_dir: Path) -> dict:
    """All tensors of a HF folder: safetensors (single or indexed), else weights-only torch.load of .bin."""
    from safetensors.torch import load_file

    def indexed(index_name, loader):
        weight_map = json.loads((hf_dir / index_name).read_text())["weight_map"]
        out = {}
        for fname in dict.fromkeys(weight_map.values()):
            part = loader(hf_dir / fname)
            out.update({k: part[k] for k in weight_map if weight_map[k] == fname and k in part})
        lost = [k for k in weight_map if k not in out]
        if lost:
            raise ValueError(f"{hf_dir}: {index_name} lists tensors missing from their shard files: {lost[:6]}")
        return out

    def torch_bin(p):
        return torch.load(p, map_location="cpu", weights_only=True)

    if (hf_dir / INDEX_FILE).is_file():
        return indexed(INDEX_FILE, lambda p: load_file(str(p)))
    if (hf_dir / SINGLE_FILE).is_file():
        return load_file(str(hf_dir / SINGLE_FILE))
    if (hf_dir / "pytorch_model.bin.index.json").is_file():
        return indexed("pytorch_model.bin.index.json", torch_bin)
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch_bin(hf_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"{hf_dir}: no weights ({SINGLE_FILE}, {INDEX_FILE} or pytorch_model.bin)")


def tokenizer_ids(tok_path: Path | None) -> tuple[dict, dict]:
    """(ids, piece strings) of unk/bos/eos/pad; lightspan's fixed defaults without a tokenizer."""
    if tok_path is None:
        return dict(DEFAULT_IDS), {}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    pieces = {k: (sp.id_to_piece(v) if v >= 0 else None) for k, v in ids.items()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}, pieces


def write_tokenizer(tok_path: Path, out: Path, pieces: dict, vocab_size: int) -> None:
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(tok_path)).get_piece_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {n} pieces but the model's vocab_size is {vocab_size}: "
                         f"wrong tokenizer for this checkpoint")
    shutil.copyfile(tok_path, out / "tokenizer.model")
    for name in REMOTE_TOKENIZER:
        shutil.copyfile(HF_DIR / name, out / name)
    config = {
        "tokenizer_class": "TransnormerTokenizer", "auto_map": TOKENIZER_AUTO_MAP,
        "unk_token": pieces.get("unk"), "bos_token": pieces.get("bos"), "eos_token": pieces.get("eos"),
        "pad_token": pieces.get("pad"), "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_hf_tokenizer(tokenizer_json: bytes, config: dict, out: Path, n: int, vocab_size: int, where) -> None:
    """Ship a Hugging Face tokenizer as `tokenizer.json` + `tokenizer_config.json` (its special tokens, a tokenizer
    class AutoTokenizer knows, `split_special_tokens` as the corpus was encoded), loaded by AutoTokenizer with no
    remote code. `n`: its vocabulary, which must fit the model's `vocab_size`."""
    if n > vocab_size:
        raise ValueError(f"tokenizer {where} has {n} ids but the model's vocab_size is {vocab_size}: "
                         f"wrong tokenizer for this checkpoint")
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    config = dict(config)
    config.setdefault("model_max_length", 1 << 30)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
