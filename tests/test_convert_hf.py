"""`lightspan convert` <-> Hugging Face: exported folders load offline in transformers and compute what we compute.

Tiny models only (seconds). Everything runs offline (HF_HUB_OFFLINE=1): folders are loaded from disk.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from data_pipeline.tokenizer import load_tokenizer  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402
from model.generate import greedy_generate  # noqa: E402
from pretrain import checkpoint  # noqa: E402
from pretrain.config import Config, to_dict  # noqa: E402
from pretrain.convert import export_hf, import_hf, load_model_weights, main  # noqa: E402

TEXT = """def fibonacci(n):
    # returns the n-th Fibonacci number, 0-indexed
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Counter:
    \"\"\"Counts things: 1, 2, 3, 42 and 1000 of them.\"\"\"

    def __init__(self):
        self.total = 0

    def add(self, value=1):
        self.total += value
        return self.total
"""


def tnl_cfg(**kw):
    # a large init_std so the random tiny model does not just repeat its last token (a sharper generate() check)
    base = dict(arch="tnl", vocab_size=128, dim=32, layers=3, heads=4, glu_dim=48, lrpe_layers=[0], init_std=0.5)
    base.update(kw)
    return ModelConfig(**base)


def llama_cfg(**kw):
    base = dict(arch="llama", vocab_size=128, dim=32, layers=2, heads=4, glu_dim=48, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


def save_run(run_dir, cfg, tokenizer=""):
    """A run folder with one checkpoint of a freshly initialised model; returns the model (eval mode)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    full = Config()
    full.model = cfg
    full.data.tokenizer = str(tokenizer)
    checkpoint.save_weights(run_dir, 7, model.state_dict(), {"config": to_dict(full)})
    return model


def hf_tensors(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for fname in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / fname)))
        return out
    return load_file(str(folder / "model.safetensors"))


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny sentencepiece model trained here (vocab 100, no byte fallback so 100 pieces suffice), loaded by ours."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    lines = (TEXT * 4 + TEXT.upper() * 2 + "the quick brown fox jumps over the lazy dog\n" * 20).splitlines()
    # the options data_pipeline/tokenizer.py trains with (text kept exactly, ids unk 0, bos 1, eos 2, pad 3)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]), model_prefix=str(path.with_suffix("")),
        vocab_size=100, model_type="bpe", byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    return load_tokenizer(path), path


@pytest.fixture(scope="module")
def tnl_export(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("tnl")
    model = save_run(root / "run", tnl_cfg(), tokenizer=sp_model[1])
    assert main(["--to", "hf", str(root / "run"), str(root / "hf")]) == 0
    return model, root / "hf"


def test_export_folder_layout(tnl_export):
    _, hf = tnl_export
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_transnormer.py",
            "modeling_transnormer.py", "tokenizer.model", "tokenizer_config.json"} <= names
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "transnormer" and cfg["architectures"] == ["TransnormerForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_transnormer.TransnormerForCausalLM"
    assert (cfg["decoder_embed_dim"], cfg["decoder_layers"], cfg["decoder_attention_heads"]) == (32, 3, 4)
    assert (cfg["hidden_dim"], cfg["glu_dim"], cfg["linear_use_lrpe_list"]) == (32, 48, [1, 0, 0])
    assert (cfg["norm_type"], cfg["linear_act_fun"], cfg["glu_act"], cfg["bias"]) == ("simplermsnorm", "silu", "none", False)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    keys = set(hf_tensors(hf))
    assert keys == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.token_mixer.lrpe.theta"} | {
        f"model.layers.{i}.{name}.weight" for i in range(3) for name in
        ("token_mixer.qkvu_proj", "token_mixer.out_proj", "channel_mixer.l1", "channel_mixer.l2", "channel_mixer.l3")}
    # the modeling files travel without lightspan: they import nothing of ours
    for name in ("modeling_transnormer.py", "configuration_transnormer.py", "tokenization_transnormer.py"):
        src = (hf / name).read_text() if (hf / name).exists() else ""
        assert "from model" not in src and "import model" not in src and "lightspan" not in src.split('"""')[-1]


def test_tnl_logits_match_transformers(tnl_export):
    model, hf_dir = tnl_export
    hf = load_hf(hf_dir)
    assert type(hf).__name__ == "TransnormerForCausalLM"
    ids = torch.randint(0, 128, (2, 150))  # > the HF file's block size of 64: several blocks plus a remainder
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        # chunked prefill through the cache equals one pass
        first = hf(ids[:, :70], use_cache=True)
        second = hf(ids[:, 70:], recurrent_cache=first.recurrent_cache)
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("export", ["tnl_export", "hybrid_export"])
def test_generate_matches_our_greedy_decoding(export, request):
    """Cached generate() (lightning states; a hybrid's S layers: key/value caches) equals our greedy decoding."""
    model, hf_dir = request.getfixturevalue(export)
    hf = load_hf(hf_dir)
    lengths = []
    hook = hf.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
    prompt = torch.randint(4, 128, (1, 9))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    hook.remove()
    ours = greedy_generate(model, prompt, 12, eos_id=2)
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[0, 9:].tolist())) > 1  # the check is not vacuous
    assert lengths[0] == 9 and set(lengths[1:]) == {1}  # the prompt once, then one token per step from the cache


@pytest.mark.parametrize("export", ["tnl_export", "hybrid_export"])
def test_generate_left_padded_batch(export, request):
    """A left-padded row decodes like the same prompt alone (TNL: padded k, v are zeroed, LRPE is relative;
    S layers: padded keys are left out of the softmax, RoPE is relative), and its logits are the prompt's."""
    model, hf_dir = request.getfixturevalue(export)
    hf = load_hf(hf_dir)
    short, long = torch.randint(4, 128, (1, 5)), torch.randint(4, 128, (1, 8))
    batch = torch.cat([torch.cat([torch.full((1, 3), 3), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out[0, 8:].tolist() == greedy_generate(model, short, 6)[0, 5:].tolist()
    assert out[1, 8:].tolist() == greedy_generate(model, long, 6)[0, 8:].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(batch, attention_mask=mask).logits[0, 3:], model(short)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("export", ["tnl_export", "hybrid_export"])
def test_hf_to_ours_to_hf_is_byte_identical(export, request, tmp_path):
    model, hf_dir = request.getfixturevalue(export)
    assert main(["--from", "hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    cfg, state = load_model_weights(tmp_path / "ckpt")
    assert cfg == model.cfg  # the hybrid's attention_pattern and rope_theta included
    ours = build_model(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids), atol=0, rtol=0)
    assert main(["--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2")]) == 0
    a, b = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf2")
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert (hf_dir / "tokenizer.model").read_bytes() == (tmp_path / "hf2" / "tokenizer.model").read_bytes()
    raw_a, raw_b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, tmp_path / "hf2"))
    for key in ("attention_pattern", "rope_theta"):
        assert raw_b.get(key) == raw_a.get(key), key


# ------------------------------------------------------------------------------------------------------------
# hybrids: S layers (RoPE softmax attention) among the lightning layers
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hybrid_export(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("hybrid")
    # layers 0, 2 lightning (LRPE on 0), 1, 3 softmax; a non-default RoPE base shows rope_theta travels
    model = save_run(root / "run", tnl_cfg(attention_pattern="LS", layers=4, rope_theta=1000.0), tokenizer=sp_model[1])
    assert main(["--to", "hf", str(root / "run"), str(root / "hf")]) == 0
    return model, root / "hf"


@torch.no_grad()
def test_hybrid_export_layout(hybrid_export):
    _, hf = hybrid_export
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["attention_pattern"], cfg["rope_theta"], cfg["decoder_layers"]) == ("LS", 1000.0, 4)
    keys = set(hf_tensors(hf))
    lightning = {f"model.layers.{i}.token_mixer.{n}.weight" for i in (0, 2) for n in ("qkvu_proj", "out_proj")}
    softmax = {f"model.layers.{i}.token_mixer.{n}_proj.weight" for i in (1, 3) for n in "qkvo"}
    glu = {f"model.layers.{i}.channel_mixer.l{j}.weight" for i in range(4) for j in (1, 2, 3)}
    assert keys == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.token_mixer.lrpe.theta"} | \
        lightning | softmax | glu


def test_hybrid_logits_match_transformers(hybrid_export):
    model, hf_dir = hybrid_export
    hf = load_hf(hf_dir)
    assert [type(layer.token_mixer).__name__ for layer in hf.model.layers] == \
        ["NormLinearAttention", "SoftmaxAttention"] * 2
    ids = torch.randint(0, 128, (2, 150))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=1e-4)
        # chunked prefill through the cache (lightning states + softmax keys/values) equals one pass
        first = hf(ids[:, :70], use_cache=True)
        second = hf(ids[:, 70:100], recurrent_cache=first.recurrent_cache)
        third = hf(ids[:, 100:], recurrent_cache=second.recurrent_cache)
        assert third.recurrent_cache.states[1][0].shape == (2, 4, 150, 8)  # S layer: keys of all 150 tokens
        torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), want,
                                   atol=1e-4, rtol=1e-4)


def test_plain_tnl_config_without_hybrid_fields_imports_as_all_lightning(tnl_export, tmp_path):
    """Released TNL config.json files have no attention_pattern / rope_theta: they mean all-lightning layers."""
    model, hf_dir = tnl_export
    src = tmp_path / "released"
    src.mkdir()
    raw = json.loads((hf_dir / "config.json").read_text())
    assert raw["attention_pattern"] == "L"
    for name in ("attention_pattern", "rope_theta"):
        raw.pop(name)
    (src / "config.json").write_text(json.dumps(raw))
    save_file(hf_tensors(hf_dir), str(src / "model.safetensors"), metadata={"format": "pt"})
    import_hf(src, tmp_path / "ckpt")
    cfg, _ = load_model_weights(tmp_path / "ckpt")
    assert cfg == model.cfg


def test_sharded_safetensors_with_index(tmp_path):
    model = save_run(tmp_path / "run", tnl_cfg())
    assert main(["--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf_tensors(tmp_path / "hf").values())
    hf = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 128, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert main(["--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    _, state = load_model_weights(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_llama_export_is_a_standard_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = save_run(tmp_path / "run", llama_cfg())
    assert main(["--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list((tmp_path / "hf").glob("modeling_*.py"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()  # no remote code
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, 128, (2, 45))
    with torch.no_grad():
        # same logits means the same RoPE convention (half-split rotation, theta^(-2i/d) frequencies)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(ids[:, 10:]).logits, model(ids[:, 10:]), atol=1e-5, rtol=1e-5)
    prompt = torch.randint(4, 128, (1, 6))
    assert hf.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == \
        greedy_generate(model, prompt, 8, eos_id=2).tolist()
    assert main(["--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back_cfg, state = load_model_weights(tmp_path / "back")
    assert back_cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_mismatched_shapes_and_foreign_folders_refuse(tnl_export, tmp_path, capsys):
    _, hf_dir = tnl_export
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = hf_tensors(hf_dir)
    tensors["model.layers.1.channel_mixer.l2.weight"] = torch.zeros(40, 32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.channel_mixer\.l2\.weight.*\(40, 32\).*\(48, 32\)"):
        import_hf(bad, tmp_path / "out")
    from pretrain.cli import main as lightspan

    assert lightspan(["convert", "--from", "hf", str(bad), str(tmp_path / "out")]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "channel_mixer.l2.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    del tensors["model.layers.1.channel_mixer.l2.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.channel_mixer\.l2\.weight'\]"):
        import_hf(bad, tmp_path / "out")

    raw = json.loads((hf_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(raw, model_type="gpt2")))
    with pytest.raises(ValueError, match="not a TNL or Llama Hugging Face export.*'gpt2'"):
        import_hf(bad, tmp_path / "out")
    (bad / "config.json").write_text(json.dumps(dict(raw, norm_type="layernorm")))
    with pytest.raises(ValueError, match="norm_type='layernorm'"):
        import_hf(bad, tmp_path / "out")
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(bad, tmp_path / "out")


def test_tokenizer_encodes_like_ours(tnl_export, sp_model):
    from transformers import AutoTokenizer

    ours, _ = sp_model
    assert ours.vocab_size == 100
    tok = AutoTokenizer.from_pretrained(str(tnl_export[1]), trust_remote_code=True)
    samples = [TEXT, "hello world", "  two  spaces\n\n\tdef f(x):\n    return 12345 + x  ", " leading space",
               "trailing space ", "", "\n", "<s> special strings are text </s>", "ünïcødé ✓ (unknown pieces)"]
    for s in samples:
        assert tok(s)["input_ids"] == ours.encode(s), repr(s)
        assert tok.decode(ours.encode(s)) == ours.decode(ours.encode(s)), repr(s)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok.decode([1] + ours.encode("hello") + [2], skip_special_tokens=True) == "hello"


def test_bfloat16_export_and_refusing_to_overwrite(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = save_run(tmp_path / "run", tnl_cfg())
    assert main(["--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in hf_tensors(tmp_path / "hf").values()} == {torch.bfloat16}
    # the same function: our model with bf16-rounded weights, both computing in fp32
    rounded = build_model(model.cfg).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                              **{dtype_kw: torch.float32}).eval()
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, rounded(ids), atol=1e-5, rtol=1e-5)
    from pretrain.cli import main as lightspan

    assert lightspan(["convert", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert {t.dtype for t in hf_tensors(tmp_path / "hf").values()} == {torch.float32}


def test_sharedllm_export_is_refused_with_the_way_out(tmp_path):
    cfg = ModelConfig(arch="sharedllm", vocab_size=128, dim=32, layers=2, heads=4, glu_dim=48, sharedllm_layers=1,
                      sharedllm_chunk=16, sharedllm_depth=1, sharedllm_node_positions=8)
    save_run(tmp_path / "run", cfg)
    with pytest.raises(ValueError, match=r"holds a SharedLLM model.*lightspan eval"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
