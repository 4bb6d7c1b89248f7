"""The trainer's torchrun path on the embedded corpus for the two non-plain stacks, against one process:
a hybrid TNL ('LS': LASP-2 on the lightning layers, ring attention on the softmax layers) and SharedLLM-TNL
(context chunks + running text cut from each sequence; chunks spread over cp, cross-attention by ring), each at
tp=2, cp=2 and pp=2 (1F1B), 2 gloo ranks; the losses of every step match the single-process trainer's.
SharedLLM also resumes a pp=2 run from its sharded checkpoint (stage-0 compressor names kept global).
Grad-level parity of the same layouts: test_parallel_combos (parallelize + TrainStep)."""
import pytest

from parallel.harness import run_distributed
from parallel_parity import trainer_args

pytestmark = pytest.mark.distributed

MODELS = {
    "hybrid": ["--model.attention_pattern=LS"],
    # 128-token sequences = 2 context chunks of 16 tokens + 96 tokens of running text (loss on those)
    "sharedllm": ["--model.arch=sharedllm", "--model.sharedllm_layers=1", "--model.sharedllm_chunk=16",
                  "--model.sharedllm_depth=2", "--model.sharedllm_node_positions=4",
                  "--model.sharedllm_context_chunks=2", "--data.loader=concat", "--data.seq_len=128"],
}
LAYOUTS = {"tp": ["--parallel.tp=2"], "cp": ["--parallel.cp=2"],
           "pp": ["--parallel.pp=2", "--parallel.microbatches=2"]}


def _cfg(corpus, out, model, *extra):
    from pretrain.config import load_config

    return load_config(None, [*trainer_args(corpus, out), *MODELS[model], *extra])


def _worker(rank, world, corpus, out, model):
    from pretrain.trainer import Trainer

    runs = {layout: Trainer(_cfg(corpus, out / layout, model, *args)).train() for layout, args in LAYOUTS.items()}
    if model == "sharedllm":
        Trainer(_cfg(corpus, out / "resume", model, *LAYOUTS["pp"])).train(stop_after=2)
        runs["pp_resumed"] = Trainer(_cfg(corpus, out / "resume", model, *LAYOUTS["pp"])).train()
    return runs


@pytest.mark.parametrize("model", ["hybrid", "sharedllm"])
def test_trainer_tp_cp_pp_match_single_process(model, corpus, tmp_path):
    from pretrain.trainer import Trainer

    single = Trainer(_cfg(corpus, tmp_path / "single", model)).train()
    assert len(single) == 4 and all(x == x for x in single)
    runs = run_distributed(_worker, world_size=2, args=(corpus, tmp_path, model), timeout_s=300)
    for r in runs:
        for layout in LAYOUTS:
            assert r[layout] == pytest.approx(single, abs=1e-4), layout
    if model == "sharedllm":
        assert runs[0]["pp_resumed"] == pytest.approx(single[2:], abs=1e-4)
        # the pp=2 stages' sharded checkpoint merges into one plain SharedLLM equal to the single run's
        import torch

        from model import build_model
        from pretrain.convert import load_model_weights

        cfg = _cfg(corpus, tmp_path / "single", model)
        merged, reference = build_model(cfg.model), build_model(cfg.model)
        merged.load_state_dict(load_model_weights(tmp_path / "pp")[1])
        reference.load_state_dict(load_model_weights(tmp_path / "single")[1])
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
