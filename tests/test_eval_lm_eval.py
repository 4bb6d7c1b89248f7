"""The lm-eval adapter: its methods against direct forward passes (no lm-eval needed), and its registration."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.lm_eval_adapter import LightspanLM
from evaluation.model_io import ModelRunner
from evaluation.reference_models import CharTokenizer
from model import ModelConfig, build_model

TOK = CharTokenizer(128)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, dim=32, layers=2, heads=2, glu_dim=64)).eval()
    return model, LightspanLM(runner=ModelRunner(model, chunk_size=8), tokenizer=TOK, max_length=64)


def _direct_logprob(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].double(), -1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[p, t].item() for p, t in zip(positions, cont)), \
        all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))


def test_loglikelihood_equals_a_direct_forward(lm):
    model, adapter = lm
    requests = [("The pass key is", " 12345"), ("abc", "d"), ("", "hello")]
    got = adapter.loglikelihood(requests)
    for (ctx, cont), (logprob, greedy) in zip(requests, got):
        ctx_ids = TOK.encode(ctx) or [TOK.eos_id]
        want, want_greedy = _direct_logprob(model, ctx_ids, TOK.encode(cont))
        assert logprob == pytest.approx(want, rel=1e-5) and greedy == want_greedy


def test_greedy_flag_is_true_for_the_models_own_continuation(lm):
    model, adapter = lm
    ctx = "some context"
    new = adapter.runner.generate(torch.tensor([TOK.encode(ctx)]), 3)[0].tolist()
    [(_, greedy)] = adapter.loglikelihood([(ctx, TOK.decode(new))])
    assert greedy


def test_loglikelihood_rolling_scores_every_token_once(lm):
    model, adapter = lm
    short = "x" * 30  # fits one window: equals the full forward from EOS
    want, _ = _direct_logprob(model, [TOK.eos_id], TOK.encode(short))
    assert adapter.loglikelihood_rolling([(short,)])[0] == pytest.approx(want, rel=1e-5)
    text = "the quick brown fox jumps over the lazy dog, " * 4  # 180 chars: three windows of 64 + 1
    ids = [TOK.eos_id] + TOK.encode(text)
    want = 0.0
    for begin in range(0, len(ids) - 1, 64):  # disjoint blocks of 64 predictions, the last with full context
        end = min(begin + 64, len(ids) - 1)
        start = max(0, end - 64)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[start:end + 1]]))[0].double(), -1)
        want += sum(logp[t - 1 - start, ids[t]].item() for t in range(begin + 1, end + 1))
    assert adapter.loglikelihood_rolling([(text,)])[0] == pytest.approx(want, rel=1e-5)


def test_generate_until_is_greedy_and_stops_at_the_stop_string(lm):
    model, adapter = lm
    ctx = "hello there"
    new = adapter.runner.generate(torch.tensor([TOK.encode(ctx)]), 10)[0].tolist()
    full = TOK.decode(new)
    [text] = adapter.generate_until([(ctx, {"max_gen_toks": 10})])
    assert text == full
    stop = full[3:5]
    [cut] = adapter.generate_until([(ctx, {"until": [stop], "max_gen_toks": 10})])
    assert cut == full[:full.index(stop)]


def test_registered_with_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    assert get_model("lightspan") is LightspanLM and issubclass(LightspanLM, LM)


@pytest.mark.slow
def test_simple_evaluate_runs_a_local_task_through_the_adapter(lm, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [{"ctx": "abc", "choices": ["d", "zz"], "label": 0}, {"ctx": "hello", "choices": [" x", "!"], "label": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(__import__("json").dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: lightspan_unit_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
    _, adapter = lm
    out = lm_eval.simple_evaluate(model=adapter, tasks=["lightspan_unit_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    picks = []
    for d in docs:  # lm-eval joins context and choice with " " (target_delimiter)
        scores = adapter.loglikelihood([(d["ctx"], " " + c) for c in d["choices"]])
        picks.append(int(max(range(len(scores)), key=lambda i: scores[i][0]) == d["label"]))
    assert out["results"]["lightspan_unit_mc"]["acc,none"] == pytest.approx(sum(picks) / len(picks))


@pytest.mark.slow
def test_lightspan_lm_eval_command_scores_a_saved_run(corpus, tmp_path):
    """The installed `lightspan-lm-eval` command (lm-eval's CLI with the adapter registered) on a trained run."""
    pytest.importorskip("lm_eval")
    import json
    import shutil
    import subprocess

    from parallel_parity import trainer_args
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    Trainer(load_config(None, [*trainer_args(corpus, tmp_path / "run"), "--train.steps=2"])).train()
    docs = [{"ctx": "def f():", "choices": [" return", " zzz"], "label": 0}]
    (tmp_path / "docs.jsonl").write_text(json.dumps(docs[0]) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task.yaml").write_text(
        "task: lightspan_cli_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
    import sys
    from pathlib import Path

    # installed beside this interpreter (a venv's bin/ need not be on PATH when its python is called directly)
    beside = Path(sys.executable).parent / "lightspan-lm-eval"
    exe = str(beside) if beside.is_file() else shutil.which("lightspan-lm-eval")
    assert exe, "lightspan-lm-eval is not installed: pip install -e ."
    out = subprocess.run([exe, "--model", "lightspan", "--model_args", f"path={tmp_path / 'run'}", "--tasks",
                          "lightspan_cli_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lightspan_cli_mc" in out.stdout and "acc" in out.stdout


# -- batching ------------------------------------------------------------------------------------------------------
ARCHS = {
    "tnl": dict(),
    "hybrid": dict(attention_pattern="LS", lrpe_layers=[]),
    "llama": dict(arch="llama"),
    "sharedllm": dict(arch="sharedllm", layers=3, lrpe_layers=[0], attn_backend="chunked", sharedllm_layers=2,
                      sharedllm_chunk=16, sharedllm_depth=2, sharedllm_node_positions=2),
}
LL_REQUESTS = [("The pass key is", " 12345"), ("abc", "d"), ("", "hello"), ("x" * 90, " truncated to 64"),
               ("hello there", " general kenobi"), ("hello there", "!"), ("a", "b" * 40), ("", "y" * 70),
               ("same length", " contin"), ("same lengtH", " contin"), ("q", "")]
ROLLING = ["x" * 30, "the quick brown fox jumps over the lazy dog, " * 4, "abc" * 30, "z" * 64, "k"]


def _runner(arch, chunk_size=8):
    from evaluation.model_io import ModelRunner

    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=128, dim=32, layers=2, heads=2, glu_dim=64), **ARCHS[arch]})
    model = build_model(cfg).eval()
    return ModelRunner(model, chunk_size=chunk_size, text_len=8 if arch == "sharedllm" else None)


class _Recorder:
    """A runner that records the (rows, width) of every forward it is asked for."""

    def __init__(self, runner):
        self.runner, self.shapes = runner, []
        self.sharedllm = runner.sharedllm

    def logits_chunks(self, ids):
        self.shapes.append(tuple(ids.shape))
        return self.runner.logits_chunks(ids)

    def generate(self, ids, n, eos_id=None):
        self.shapes.append(tuple(ids.shape))
        return self.runner.generate(ids, n, eos_id=eos_id)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_scores_equal_one_request_at_a_time(arch):
    runner = _runner(arch)
    one = LightspanLM(runner=runner, tokenizer=TOK, max_length=64, batch_size=1)
    want_ll = one.loglikelihood(LL_REQUESTS, disable_tqdm=True)
    want_roll = one.loglikelihood_rolling([(t,) for t in ROLLING], disable_tqdm=True)
    for size in (4, "auto"):
        rec = _Recorder(runner)
        many = LightspanLM(runner=rec, tokenizer=TOK, max_length=64, batch_size=size, batch_tokens=200)
        got_ll = many.loglikelihood(LL_REQUESTS, disable_tqdm=True)
        assert len(rec.shapes) < len(LL_REQUESTS)  # batched
        assert all(rows <= (4 if size == 4 else 64) and (size == 4 or rows * width <= 200)
                   for rows, width in rec.shapes)
        for (lp, greedy), (want, want_greedy) in zip(got_ll, want_ll):
            assert lp == pytest.approx(want, rel=1e-5, abs=1e-5) and greedy == want_greedy
        got_roll = many.loglikelihood_rolling([(t,) for t in ROLLING], disable_tqdm=True)
        assert got_roll == pytest.approx(want_roll, rel=1e-5, abs=1e-5)
    assert LL_REQUESTS[-1][1] == "" and want_ll[-1] == (0.0, True)


def test_rows_of_different_lengths_share_a_padded_batch_except_for_sharedllm():
    for arch, padded in (("tnl", True), ("sharedllm", False)):
        rec = _Recorder(_runner(arch))
        adapter = LightspanLM(runner=rec, tokenizer=TOK, max_length=64, batch_size=64)
        adapter.loglikelihood(LL_REQUESTS, disable_tqdm=True)
        if padded:  # one forward for all of them (("q", "") has nothing to score), as wide as the longest (64)
            assert rec.shapes == [(len(LL_REQUESTS) - 1, 64)]
        else:  # SharedLLM's context split depends on the length: only equal lengths batch
            lengths = {len(adapter._row(*adapter._split(c, x))[0]) for c, x in LL_REQUESTS} - {0}
            assert len(rec.shapes) == len(lengths)


def test_batches_are_longest_first_within_the_budget():
    from evaluation.lm_eval_adapter import _batches

    lengths = [5, 50, 20, 50, 7, 20]
    assert _batches(lengths, 2, 0, 0) == [[1, 3], [2, 5], [4, 0]]
    assert _batches(lengths, None, 100, 64) == [[1, 3], [2, 5, 4, 0]]  # 2 x 50, then 4 x 20 <= 100
    assert _batches(lengths, None, 100, 3) == [[1, 3], [2, 5, 4], [0]]
    assert _batches(lengths, None, 10, 64) == [[1], [3], [2], [5], [4], [0]]  # a row longer than the budget runs alone
    assert _batches(lengths, 4, 0, 0, same_length=True) == [[1, 3], [2, 5], [4], [0]]


def test_batched_generate_until_equals_one_at_a_time():
    runner = _runner("tnl")
    requests = [("hello there", {"max_gen_toks": 6}), ("hello where", {"max_gen_toks": 6}),
                ("abc", {"max_gen_toks": 6, "until": ["x"]}), ("hello there", {"max_gen_toks": 3})]
    want = LightspanLM(runner=runner, tokenizer=TOK, max_length=64).generate_until(requests, disable_tqdm=True)
    rec = _Recorder(runner)
    got = LightspanLM(runner=rec, tokenizer=TOK, max_length=64, batch_size=8).generate_until(requests,
                                                                                           disable_tqdm=True)
    assert got == want and sorted(rec.shapes) == [(1, 3), (1, 11), (2, 11)]


def test_progress_bar_shown_unless_disabled(lm, capsys):
    _, adapter = lm
    adapter.loglikelihood([("abc", "d"), ("ab", "c")])
    adapter.loglikelihood_rolling([("abc",)])
    adapter.generate_until([("abc", {"max_gen_toks": 2})])
    err = capsys.readouterr().err
    assert "lightspan loglikelihood: 100%" in err and "2/2" in err
    assert "lightspan loglikelihood_rolling (windows): 100%" in err and "lightspan generate_until: 100%" in err
    adapter.loglikelihood([("abc", "d")], disable_tqdm=True)
    adapter.loglikelihood_rolling([("abc",)], disable_tqdm=True)
    adapter.generate_until([("abc", {"max_gen_toks": 2})], disable_tqdm=True)
    assert "lightspan" not in capsys.readouterr().err


def test_bad_batch_size_is_refused(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="batch_size"):
        LightspanLM(runner=ModelRunner(model), tokenizer=TOK, batch_size="many")


@pytest.mark.slow
def test_lm_eval_hf_model_scores_our_export_as_the_adapter_does(tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True` (the eval extra's accelerate,
    our modeling code via auto_map, our tokenizer) on a tiny export, offline with a local task: every
    loglikelihood equals the lightspan adapter's on the same folder."""
    pytest.importorskip("lm_eval")
    import glob
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    [extra] = [line for line in (root / "pyproject.toml").read_text().splitlines() if line.startswith("eval = [")]
    assert '"accelerate' in extra.split("]")[0], "the eval extra must install accelerate"
    assert importlib.util.find_spec("accelerate"), "accelerate is missing: pip install -e '.[eval]'"

    import numpy as np

    from data_pipeline import prepare, train_tokenizer
    from pretrain import checkpoint
    from pretrain.cli import main as lightspan
    from pretrain.config import Config, to_dict

    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "for", "in", "if", "else", "key", "pass", "the", "is", "green"]
    texts = [" ".join(rng.choice(words, int(rng.integers(20, 150)))) + "\n" for _ in range(150)]
    train_tokenizer(texts, tmp_path / "tok.model", vocab_size=320, num_threads=1)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepared = prepare(str(tmp_path / "docs.jsonl"), tmp_path / "prepared", tokenizer=str(tmp_path / "tok.model"),
                       num_workers=1, progress=False)
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=320, dim=32, layers=2, heads=2, glu_dim=64)
    cfg.data.prepared_dir, cfg.data.loader, cfg.data.seq_len = str(prepared), "concat", 64
    torch.manual_seed(0)
    checkpoint.save_weights(tmp_path / "run", 5, build_model(cfg.model).state_dict(), {"config": to_dict(cfg)})
    assert lightspan(["convert", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0

    # non-empty contexts: for an empty one lm-eval's hf model prefixes BOS where lightspan (trained without BOS)
    # uses EOS (pass model_args prefix_token_id=EOS_ID to lm-eval's hf model for the same scores)
    docs = [{"ctx": "def f(self):", "choices": [" return", " zzz"], "label": 0},
            {"ctx": "if the key", "choices": [" is green", " value", " pass"], "label": 1},
            {"ctx": "for value in self", "choices": [":", " else"], "label": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task.yaml").write_text(
        "task: lightspan_hf_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
    beside = Path(sys.executable).parent / "lm_eval"
    exe = [str(beside)] if beside.is_file() else [sys.executable, "-m", "lm_eval"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([*exe, "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'},trust_remote_code=True",
                          "--tasks", "lightspan_hf_mc", "--include_path", str(tasks), "--device", "cpu",
                          "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "lightspan_hf_mc" in out.stdout
    [samples] = glob.glob(str(tmp_path / "out" / "*" / "samples_lightspan_hf_mc_*.jsonl"))
    requests, hf_scores = [], []
    for line in Path(samples).read_text().splitlines():
        record = json.loads(line)
        requests += [tuple(a.values()) for a in record["arguments"].values()]
        hf_scores += [float(r[0][0]) for r in record["resps"]]
    assert len(requests) == 7
    ours = LightspanLM(path=str(tmp_path / "hf"), device="cpu", batch_size=4).loglikelihood(requests,
                                                                                         disable_tqdm=True)
    assert [lp for lp, _ in ours] == pytest.approx(hf_scores, abs=1e-4)
