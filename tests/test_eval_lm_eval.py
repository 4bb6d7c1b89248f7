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
