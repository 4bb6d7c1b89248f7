"""checkpoint.init_from: a new run (step 0, fresh optimizer) starts from existing weights: a sharded checkpoint
written at tp=2, or a Hugging Face export. The first step's logits equal the source model's."""
import pytest
import torch
from parallel_parity import trainer_args
from test_checkpoint_resilience import _cmd, _run

from model import build_model
from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.convert import export_hf, model_config_from_meta
from pretrain.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2") / "run"
    _run(_cmd(2, *trainer_args(corpus, run), "--parallel.tp=2"), timeout=300)
    return run


def _source_logits(ckpt, ids):
    meta, state = checkpoint.load_model_weights(ckpt)
    model = build_model(model_config_from_meta(meta)).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids)


def _started_from(corpus, out, source, *extra):
    cfg = load_config(None, trainer_args(corpus, out) + [f"--checkpoint.init_from={source}", *extra])
    trainer = Trainer(cfg)
    trainer.maybe_resume()
    assert trainer.step == 0 and not trainer.optimizer.state  # weights only: step 0, fresh AdamW
    return trainer


def test_init_from_a_tp2_checkpoint_and_an_hf_export(corpus, tp2_run, tmp_path):
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    expected = _source_logits(tp2_run, ids)

    trainer = _started_from(corpus, tmp_path / "from-dcp", tp2_run)
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(ids), expected, rtol=0, atol=0)
    losses = trainer.train()  # and it trains on from there
    assert len(losses) == 4 and losses[0] < 6.0  # not the ~ln(512) = 6.24 of a fresh initialisation

    hf = export_hf(tp2_run, tmp_path / "hf")
    trainer = _started_from(corpus, tmp_path / "from-hf", hf)
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(ids), expected, rtol=0, atol=0)


def test_init_from_a_model_of_another_shape_names_the_tensor(corpus, tp2_run, tmp_path):
    with pytest.raises(ValueError, match=r"channel_mixer\.l1\.weight.*\(64, 32\).*\(48, 32\)"):
        _started_from(corpus, tmp_path / "bad", tp2_run, "--model.glu_dim=48")
