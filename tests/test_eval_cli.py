"""`lightspan eval` end to end on a tiny run folder, its HF export, and the MQAR recipe."""
import json

import numpy as np
import pytest
import torch

from data_pipeline import prepare, train_tokenizer
from model import ModelConfig, build_model
from pretrain import checkpoint
from pretrain.cli import main as lightspan
from pretrain.config import Config, to_dict

SMALL = ["--train-len", "64", "--max-length", "256", "--ppl-tokens", "600", "--lengths", "64,256", "--depths", "3",
         "--mqar-examples", "16", "--mqar-seq-len", "32", "--mqar-kv", "4", "--no-progress"]


def _texts(n=150, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "value", "for", "in", "if", "else", "key", "pass", "the", "is", "green"]
    return [" ".join(rng.choice(words, int(rng.integers(20, 150)))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    tok_path = root / "tok.model"
    tok = train_tokenizer(_texts() + ["0123456789 The pass key is. What? Remember it."] * 20, tok_path,
                          vocab_size=320, num_threads=1)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(seed=1)))
    prepared = prepare(str(src), root / "prepared", tokenizer=str(tok_path), num_workers=1, progress=False)
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tok.vocab_size, dim=32, layers=2, heads=2, glu_dim=64)
    cfg.data.prepared_dir, cfg.data.loader, cfg.data.seq_len = str(prepared), "concat", 64
    torch.manual_seed(0)
    model = build_model(cfg.model)
    checkpoint.save_weights(root / "run", 5, model.state_dict(), {"config": to_dict(cfg)})
    return root


def test_eval_writes_json_and_plots(run, tmp_path):
    out = tmp_path / "out"
    assert lightspan(["eval", str(run / "run"), "--out", str(out), *SMALL]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"ppl", "passkey", "needle", "mqar"} and res["train_len"] == 64
    ppl = res["tasks"]["ppl"]
    assert [p["length"] for p in ppl["curve"]] == [16, 32, 64, 128, 256] and "last" in ppl["heldout"]["note"]
    assert ppl["heldout"]["tokens"] == 600
    keys = res["tasks"]["passkey"]
    assert keys["lengths"] == [256] and keys["too_short"] == [64] and keys["depths"] == [0.0, 0.5, 1.0]
    assert res["tasks"]["mqar"]["queries"] == 64 and res["step"] == 5
    assert [p["seq_len"] for p in res["tasks"]["mqar"]["by_length"]] == [32, 64, 128]  # L, 2L, 4L
    assert keys["cell_trials"] == [[1, 1, 1]]
    for name in ("perplexity.png", "passkey.png", "needle.png", "mqar.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_eval_of_the_hf_export_gives_the_same_scores(run, tmp_path):
    assert lightspan(["convert", "--to", "hf", str(run / "run"), str(tmp_path / "hf")]) == 0
    args = [*SMALL, "--tasks", "passkey,mqar"]
    assert lightspan(["eval", str(run / "run"), "--out", str(tmp_path / "a"), *args]) == 0
    assert lightspan(["eval", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), *args]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["tasks"] for d in "ab")
    assert a["passkey"]["records"] == b["passkey"]["records"]
    assert a["mqar"]["accuracy"] == b["mqar"]["accuracy"]


def test_bad_task_and_missing_data_are_reported(run, tmp_path, capsys):
    assert lightspan(["eval", str(run / "run"), "--out", str(tmp_path), "--tasks", "ppl,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_train_mqar_recipe_saves_a_checkpoint_eval_reads(tmp_path):
    out = tmp_path / "mqar"
    assert lightspan(["eval", "--train-mqar", str(out), "--mqar-steps", "3", "--mqar-examples", "8"]) == 0
    meta = json.loads(next((out / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    assert meta["mqar"]["seq_len"] == 32 and meta["history"][-1]["step"] == 3
    assert lightspan(["eval", str(out), "--out", str(tmp_path / "res"), "--tasks", "mqar",
                      "--mqar-examples", "8", "--no-progress"]) == 0
    res = json.loads((tmp_path / "res" / "results.json").read_text())["tasks"]["mqar"]
    assert res["seq_len"] == 32 and res["vocab_size"] == 32 and "note" not in res


def test_device_defaults_to_auto_cuda_when_visible_else_cpu(run, tmp_path, capsys):
    from evaluation.cli import parse_args

    assert parse_args(["x"]).device == "auto"
    assert lightspan(["eval", str(run / "run"), "--out", str(tmp_path / "o"), *SMALL, "--tasks", "mqar"]) == 0
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert f" on {want}\n" in capsys.readouterr().out


@pytest.mark.parametrize("gpus, env, device, want", [
    (0, {}, "auto", "cpu"), (0, {}, None, "cpu"), (2, {}, "auto", "cuda"), (2, {}, "cpu", "cpu"),
    (2, {}, "CUDA:1", "cuda:1"), (2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "auto", "cuda:1"),
    (2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda", "cuda:1"),
    (2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:0", "cuda:0"),
    (0, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "auto", "cpu"),
])
def test_resolve_device(monkeypatch, gpus, env, device, want):
    from evaluation.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert resolve_device(device) == want


@pytest.mark.parametrize("gpus, env, device, words", [
    (0, {}, "cuda", "no CUDA GPU is visible"), (2, {}, "cuda:2", "only 2 GPU(s)"), (2, {}, "tpu9", "not a device"),
    (2, {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "auto", "local rank 3 has no GPU"),
])
def test_resolve_device_refuses(monkeypatch, gpus, env, device, words):
    from evaluation.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(device)


def test_sharedllm_eval_with_the_question_as_query(run, tmp_path):
    """A SharedLLM checkpoint (trained with the right-half policy) evaluated with --sharedllm-select query: passkey
    and needle hand it their question; perplexity and MQAR have none and expand the right half."""
    from evaluation.model_io import load_for_eval

    cfg = Config()
    meta = json.loads(next((run / "run" / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    cfg.model = ModelConfig(arch="sharedllm", vocab_size=meta["config"]["model"]["vocab_size"], dim=32, layers=2,
                            heads=2, glu_dim=64, sharedllm_layers=1, sharedllm_chunk=32, sharedllm_depth=1,
                            sharedllm_node_positions=8, sharedllm_context_chunks=1)
    cfg.data.prepared_dir, cfg.data.loader, cfg.data.seq_len = meta["config"]["data"]["prepared_dir"], "concat", 64
    torch.manual_seed(0)
    checkpoint.save_weights(tmp_path / "shared", 3, build_model(cfg.model).state_dict(), {"config": to_dict(cfg)})
    out = tmp_path / "out"
    assert lightspan(["eval", str(tmp_path / "shared"), "--out", str(out), *SMALL, "--sharedllm-select", "query",
                      "--tokenizer", str(run / "tok.model")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sharedllm_select"] == "query" and res["step"] == 3
    assert "query" in res["tasks"]["passkey"] and "query" in res["tasks"]["needle"]
    for name in ("perplexity.png", "passkey.png", "needle.png", "mqar.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert load_for_eval(tmp_path / "shared").runner.selects_by_query is False  # the checkpoint's own: right
    with pytest.raises(ValueError, match="applies to a SharedLLM"):
        load_for_eval(run / "run", sharedllm_select="query")
