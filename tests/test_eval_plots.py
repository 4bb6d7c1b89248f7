"""The evaluation's PNGs say what they show: a title with the task, the model and its step; named axes; the training
length marked; the trials behind each point or cell; a perplexity axis from zero (a +1% change is not a cliff);
the passkey heatmap's depth axis about the pass key, not a needle; an MQAR plot. Read back from the figures."""
import pytest

from evaluation import plots
from evaluation.cli import write_outputs

CKPT = "/runs/tiny/checkpoints/step_00000200"
CURVE = [{"length": n, "ppl": p, "windows": w, "tokens": 4095}
         for n, p, w in ((128, 80.8, 63), (256, 80.2, 31), (512, 79.8, 15), (1024, 80.0, 7), (2048, 80.6, 3))]
GRID = {"lengths": [512, 1024, 2048], "depths": [0.0, 0.5, 1.0], "overall": 0.5, "trials": 3,
        "accuracy": [[1.0, 2 / 3, 1 / 3], [1 / 3, 0.0, 2 / 3], [1 / 3, 1 / 3, 0.0]],
        "cell_trials": [[3, 3, 3], [3, 3, 3], [3, 3, 3]]}
MQAR = [{"seq_len": n, "accuracy": a, "queries": 4096, "examples": 256} for n, a in ((256, 0.9), (512, 0.5),
                                                                                     (1024, 0.2))]


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _vertical_at(ax, x):
    return any(len(set(line.get_xdata())) == 1 and line.get_xdata()[0] == x for line in ax.lines)


def test_model_label():
    assert plots.model_label(CKPT, 200) == "tiny, step 200"
    assert plots.model_label("/exports/hf-tiny", None) == "hf-tiny"
    assert plots.model_label(None, None) == ""


def test_perplexity_axis_starts_at_zero_and_says_what_it_shows():
    fig = plots.figure_perplexity({"tnl": CURVE}, 512, model=CKPT, step=200)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 80.8  # not 79.8..80.8: a 1% change looks like 1%
    assert "tiny, step 200" in ax.get_title() and "perplexity" in ax.get_title()
    assert "context length" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()
    assert _vertical_at(ax, 512)  # the training length
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("4,095 tokens scored per point" in t and "3-63 windows" in t for t in labels)
    assert any("training length T = 512" in t for t in labels)
    texts = _texts(fig)
    assert texts == ["+1.3%", "+0.5%", "ref", "+0.3%", "+1.0%"]  # vs 79.8 at T: 80.8/79.8, ..., 80.6/79.8


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_heatmap_names_its_axes_trials_model_and_training_length(task):
    fig = plots.figure_heatmap(GRID, f"{task} retrieval", task=task, model=CKPT, step=200, train_len=512)
    ax = fig.axes[0]
    title = ax.get_title()
    assert task in title and "tiny, step 200" in title and "3 trial(s) per cell" in title and "27 in all" in title
    xlabel = ax.get_xlabel()
    assert ("pass-key position" in xlabel) == (task == "passkey") and ("needle" in xlabel) == (task == "needle")
    assert "context length" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["512 (1x T)", "1024 (2x T)", "2048 (4x T)"]
    assert any(len(set(line.get_ydata())) == 1 and line.get_ydata()[0] == 0.5 for line in ax.lines)  # above T
    cells = _texts(fig)
    assert len(cells) == 9 and all(t.endswith("\nn=3") for t in cells) and "0.67\nn=3" in cells
    assert "accuracy" in fig.axes[1].get_ylabel()  # the colour bar


def test_heatmap_of_uneven_cells_and_without_counts():
    grid = dict(GRID, cell_trials=[[3, 2, 3], [3, 3, 3], [3, 3, 1]])
    assert "1-3 trials per cell" in plots.figure_heatmap(grid, "passkey", task="passkey").axes[0].get_title()
    old = {k: v for k, v in GRID.items() if k != "cell_trials"}  # a results.json written before cell_trials
    fig = plots.figure_heatmap(old, "passkey", task="passkey")
    assert "3 trial(s) per cell" in fig.axes[0].get_title() and all("n=" not in t for t in _texts(fig))


def test_mqar_plot_accuracy_vs_length():
    fig = plots.figure_accuracy({"tnl": MQAR}, "MQAR query accuracy vs length", 512, 2 / 64, model=CKPT, step=200)
    ax = fig.axes[0]
    assert "MQAR" in ax.get_title() and "tiny, step 200" in ax.get_title()
    assert "sequence length" in ax.get_xlabel() and ax.get_ylabel() == "accuracy"
    assert _vertical_at(ax, 512) and ax.get_ylim()[0] == 0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("4,096 queries per point" in t for t in labels) and any("chance" in t for t in labels)
    assert "0.50\nn=4096" in _texts(fig)


def test_every_png_of_eval_has_title_axes_training_length_and_trials(tmp_path, monkeypatch):
    """write_outputs (what `lightspan eval` calls): one PNG per task, each figure checked before it is saved."""
    figures = {}
    save = plots._save

    def capture(fig, path):
        figures[path.name] = fig
        ax = fig.axes[0]
        figures[path.name] = {"title": ax.get_title(), "x": ax.get_xlabel(), "y": ax.get_ylabel(),
                              "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
                              "texts": _texts(fig), "yticks": [t.get_text() for t in ax.get_yticklabels()]}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    results = {"model": CKPT, "step": 200, "arch": "tnl", "train_len": 512, "tasks": {
        "ppl": {"curve": CURVE, "heldout": {"unseen": True}},
        "passkey": {"task": "passkey", **GRID}, "needle": {"task": "needle", **GRID, "trials": 1},
        "mqar": {"accuracy": 0.9, "queries": 4096, "seq_len": 256, "num_kv_pairs": 16, "vocab_size": 64,
                 "chance": 2 / 64, "by_length": MQAR}}}
    written = write_outputs(results, tmp_path)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == ["mqar.png", "needle.png", "passkey.png", "perplexity.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        f = figures[name]
        assert "tiny, step 200" in f["title"] and f["x"] and f["y"], name
        assert any("T = 512" in t for t in f["legend"]) or "512 (1x T)" in f["yticks"], name  # training length
        assert any("n=" in t for t in f["texts"]) or any("per point" in t for t in f["legend"]), name  # trials
    assert figures["perplexity.png"]["title"].startswith("held-out perplexity")
    assert "pass-key position" in figures["passkey.png"]["x"]


def test_bench_quality_call_still_works(tmp_path):
    """bench/quality.py's positional call (curves, path, train_len, title)."""
    out = plots.plot_perplexity({"a": CURVE, "b": CURVE}, tmp_path / "p.png", 512, "held-out perplexity")
    assert out.read_bytes()[:4] == b"\x89PNG"
