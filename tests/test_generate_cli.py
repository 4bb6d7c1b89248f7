"""`lightspan generate`: greedy decoding is the model's argmax continuation (the evaluation runner's and
model.generate's), the sampling loop decodes from the same states, a seed makes sampling reproducible, and the CLI
reads a run folder, a checkpoint folder and an HF export alike."""
import json

import numpy as np
import pytest
import torch

from data_pipeline import train_tokenizer
from evaluation.model_io import ModelRunner, load_for_eval
from model import ModelConfig, build_model
from model.generate import greedy_generate
from pretrain import checkpoint
from pretrain.cli import main as lightspan
from pretrain.config import Config, to_dict
from evaluation.generate_cli import Sampler, filter_logits, generate, sample_generate

ARCHS = {
    "tnl": dict(arch="tnl"),
    "hybrid": dict(arch="tnl", attention_pattern="LS"),
    "llama": dict(arch="llama"),
}


def _model(kind: str, vocab: int = 64):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, dim=32, layers=2, heads=2, glu_dim=64, attn_backend="chunked", **ARCHS[kind])
    return build_model(cfg).eval()


def _argmax_continuation(model, ids, n):
    """No cache at all: the whole sequence through the model for every new token."""
    out = ids
    for _ in range(n):
        with torch.no_grad():
            nxt = model(out)[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out[:, ids.shape[1]:]


class _Loaded:
    def __init__(self, runner):
        self.runner = runner


@pytest.mark.parametrize("kind", list(ARCHS))
def test_greedy_is_the_argmax_continuation(kind):
    model = _model(kind)
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    runner = ModelRunner(model, chunk_size=4)  # a prompt longer than a chunk: the state carries across chunks
    greedy = generate(_Loaded(runner), ids[0].tolist(), 12)
    assert torch.equal(greedy[0], _argmax_continuation(model, ids[:1], 12)[0])
    assert torch.equal(greedy, greedy_generate(model, ids[:1], 12)[:, 9:])
    # the sampling loop, picking the argmax, decodes from the same states as the runner
    both = sample_generate(runner, ids, 12, lambda logits: logits.argmax(-1))
    assert torch.equal(both, _argmax_continuation(model, ids, 12))
    # top-k 1 sampling is greedy whatever the temperature
    top1 = generate(_Loaded(runner), ids[0].tolist(), 12, temperature=5.0, top_k=1, seed=3)
    assert torch.equal(top1, greedy)


def test_sampling_with_a_seed_is_reproducible():
    runner = ModelRunner(_model("tnl"), chunk_size=8)
    prompt = [5, 6, 7, 8]
    a = generate(_Loaded(runner), prompt, 24, temperature=1.5, top_k=40, seed=7, num_samples=3)
    b = generate(_Loaded(runner), prompt, 24, temperature=1.5, top_k=40, seed=7, num_samples=3)
    c = generate(_Loaded(runner), prompt, 24, temperature=1.5, top_k=40, seed=8, num_samples=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 24) and len({tuple(r) for r in a.tolist()}) > 1  # the samples differ from each other


def test_eos_stops_and_pads():
    runner = ModelRunner(_model("tnl"), chunk_size=8)
    ids = torch.tensor([[5, 6, 7]])
    first = int(sample_generate(runner, ids, 1, lambda x: x.argmax(-1))[0, 0])
    out = sample_generate(runner, ids, 10, lambda x: x.argmax(-1), eos_id=first)
    assert out.tolist() == [[first]]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False]  # the best token always stays
    torch.manual_seed(0)
    draws = Sampler(1.0, top_k=2, seed=0)(logits.expand(2000, 4))
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def _texts(n=120, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "value", "for", "in", "if", "else", "key", "pass", "the", "is", "green"]
    return [" ".join(rng.choice(words, int(rng.integers(20, 80)))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("genrun")
    tok = train_tokenizer(_texts(), root / "tok.model", vocab_size=300, num_threads=1)
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, dim=32, layers=2, heads=2, glu_dim=64)
    cfg.data.tokenizer = str(root / "tok.model")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    checkpoint.save_weights(root / "run", 5, model.state_dict(), {"config": to_dict(cfg)})
    return root


def test_cli_reads_run_checkpoint_and_hf_folders_alike(run, tmp_path, capsys):
    loaded = load_for_eval(run / "run")
    tok = loaded.tokenizer
    prompt = "def value"
    ids = tok.encode(prompt)
    expected = greedy_generate(loaded.runner.model, torch.tensor([ids]), 8)[0, len(ids):].tolist()
    if tok.eos_id in expected:
        expected = expected[:expected.index(tok.eos_id)]
    assert lightspan(["convert", "--to", "hf", str(run / "run"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    (ckpt,) = (run / "run" / "checkpoints").iterdir()
    outputs = []
    for path in (run / "run", ckpt, tmp_path / "hf"):
        assert lightspan(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--ids"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    text, id_line = outputs[0].splitlines()[-2:]
    assert json.loads(id_line.removeprefix("ids: ")) == ids + expected
    assert text == tok.decode(ids + expected)


def test_cli_sampling_is_reproducible_and_bad_arguments_are_one_line(run, capsys):
    args = ["generate", str(run / "run"), "--prompt", "the", "--max-new-tokens", "12", "--temperature", "1.2",
            "--top-p", "0.9", "--seed", "4", "--num-samples", "2", "--ignore-eos"]
    assert lightspan(args) == 0
    first = capsys.readouterr().out
    assert lightspan(args) == 0
    assert capsys.readouterr().out == first and first.count("--- sample") == 2
    for bad, words in ((["--temperature", "-1"], "--temperature must be"), (["--top-p", "0"], "--top-p must be"),
                       (["--max-new-tokens", "-2"], "--max-new-tokens must be")):
        assert lightspan(["generate", str(run / "run"), *bad]) == 2
        assert words in capsys.readouterr().err


def test_hf_export_is_readable_by_group_and_others_whatever_the_umask(run, tmp_path):
    import os
    import stat

    old = os.umask(0o077)  # a private umask: the export must still be readable on shared storage
    try:
        assert lightspan(["convert", "--to", "hf", str(run / "run"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths)
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p.name, oct(mode))


def test_llama_key_value_cache_matches_one_forward():
    """The softmax baseline's cache: a prompt read in pieces (5 tokens, 4 tokens, then one at a time) from the
    returned key/value caches gives the logits of one forward over the whole sequence."""
    model = _model("llama")
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        pieces, states, pos = [], None, 0
        for width in (5, 4, 1, 1, 1):
            logits, states = model(ids[:, pos:pos + width], position_offset=pos, states=states, return_states=True)
            pieces.append(logits)
            pos += width
    assert [s[0].shape[2] for s in states] == [12, 12]  # each layer's cache holds every token read
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
