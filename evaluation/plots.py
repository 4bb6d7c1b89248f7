"""PNG plots of the results (matplotlib, Agg backend: no display needed).

Every figure names what it shows and where it comes from: a title with the task, the model and its training step;
both axes named with their units; the training length marked (a dashed line, or "(Nx T)" on a length axis); and
how many trials stand behind each point or cell (the legend or the cell's text). `figure_*` build the figure
(tests read it back), `plot_*` build, save and close it.
"""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_label(model: str | None = None, step: int | None = None) -> str:
    """'tiny, step 200' from a model name (or a checkpoint path) and a step; '' when neither is known."""
    name = ""
    if model:
        path = Path(str(model))
        # runs/tiny/checkpoints/step_00000200 -> tiny; an HF export or any other folder -> its name
        name = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
    parts = [p for p in (name, f"step {step}" if step is not None else "") if p]
    return ", ".join(parts)


def _suptitle(title: str, model: str | None, step: int | None, detail: str = "") -> str:
    who = model_label(model, step)
    first = f"{title}: {who}" if who else title
    return first + (f"\n{detail}" if detail else "")


def _save(fig, path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
    return Path(path)


def _times(length: int, train_len: int | None) -> str:
    if not train_len:
        return ""
    r = length / train_len
    return f" ({r:g}x T)" if r >= 1 else f" (T/{train_len / length:g})"


# -- perplexity ----------------------------------------------------------------------------------------------------
def _reference(points: list[dict], train_len: int | None) -> dict:
    """The point relative changes are measured against: the training length, else the longest length below it,
    else the shortest."""
    if train_len:
        below = [p for p in points if p["length"] <= train_len]
        if below:
            return max(below, key=lambda p: p["length"])
    return min(points, key=lambda p: p["length"])


def figure_perplexity(curves: dict, train_len: int | None = None, title: str = "perplexity vs context length",
                      model: str | None = None, step: int | None = None):
    """curves: {label: [{length, ppl, windows?, tokens?}, ...]} -> one line each over a log2 length axis.

    The perplexity axis starts at zero (a 1% change looks like 1%), every point carries its change relative to
    the training length's point, and the legend gives the tokens scored and the windows behind each point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for label, points in curves.items():
        xs, ys = [p["length"] for p in points], [p["ppl"] for p in points]
        counts = ""
        if points and "tokens" in points[0]:
            wins = [p.get("windows", 0) for p in points]
            counts = (f" ({max(p['tokens'] for p in points):,} tokens scored per point, "
                      f"{min(wins)}-{max(wins)} windows)")
        ax.plot(xs, ys, marker="o", label=f"{label}{counts}")
        ref = _reference(points, train_len)
        for p in points:
            change = p["ppl"] / ref["ppl"] - 1 if ref["ppl"] else 0.0
            ax.annotate("ref" if p is ref else f"{change:+.1%}", (p["length"], p["ppl"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
        top = max([top, *ys])
    if train_len:
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length T = {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_xlabel("context length (tokens, log2 scale)")
    ax.set_ylabel("perplexity (axis from 0; labels: change vs T)")
    ax.set_title(_suptitle(title, model, step), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_perplexity(curves: dict, path, train_len: int | None = None, title: str = "perplexity vs context length",
                    model: str | None = None, step: int | None = None):
    """`figure_perplexity`, saved as a PNG at path."""
    return _save(figure_perplexity(curves, train_len, title, model, step), path)


# -- retrieval heatmaps ----------------------------------------------------------------------------------------------
DEPTH_LABELS = {
    "passkey": "pass-key position in the filler (0% = right after the intro, 100% = just before the question)",
    "needle": "needle position in the haystack (0% = right after the intro, 100% = just before the question)",
}


def figure_heatmap(grid: dict, title: str, task: str | None = None, model: str | None = None,
                   step: int | None = None, train_len: int | None = None):
    """grid: {lengths, depths, accuracy[length][depth], cell_trials?, trials?, overall} -> a length x depth heatmap.

    Each cell shows its accuracy and its number of trials; the length axis marks multiples of the training length
    T and a dashed line separates lengths up to T from longer ones."""
    plt = _pyplot()
    lengths, depths, acc = grid["lengths"], grid["depths"], grid["accuracy"]
    counts = grid.get("cell_trials")
    values = [[float("nan") if a is None else a for a in row] for row in acc]
    fig, ax = plt.subplots(figsize=(2.8 + 1.0 * len(depths), 1.6 + 0.55 * len(lengths)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n}{_times(n, train_len)}" for n in lengths])
    ax.set_xlabel(DEPTH_LABELS.get(task or title, "needle position (depth, % of the filler)"), fontsize=8)
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(values):
        for j, a in enumerate(row):
            n = counts[i][j] if counts else None
            if a == a:
                ax.text(j, i, f"{a:.2f}" + (f"\nn={n}" if n is not None else ""), ha="center", va="center",
                        fontsize=7)
    if train_len:
        edge = sum(1 for n in lengths if n <= train_len) - 0.5
        ax.axhline(edge, color="black", linestyle="--", linewidth=1.2,
                   label=f"training length T = {train_len} (longer above)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28 if len(lengths) < 4 else -0.18))
    flat = [n for row in counts for n in row if n] if counts else []
    if flat:
        per = f"{min(flat)} trial(s) per cell" if min(flat) == max(flat) else f"{min(flat)}-{max(flat)} trials per cell"
    else:
        per = f"{grid['trials']} trial(s) per cell" if "trials" in grid else "trials per cell unknown"
    detail = f"{per}, {sum(flat) if flat else '?'} in all; overall accuracy {grid['overall']:.2f}"
    ax.set_title(_suptitle(title, model, step, detail), fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (fraction correct)")
    return fig


def plot_heatmap(grid: dict, path, title: str, task: str | None = None, model: str | None = None,
                 step: int | None = None, train_len: int | None = None):
    """`figure_heatmap`, saved as a PNG at path."""
    return _save(figure_heatmap(grid, title, task, model, step, train_len), path)


# -- accuracy vs length (MQAR) -------------------------------------------------------------------------------------
def figure_accuracy(curves: dict, title: str, train_len: int | None = None, chance: float | None = None,
                    model: str | None = None, step: int | None = None, x_key: str = "seq_len",
                    count_key: str = "queries", x_label: str = "sequence length (tokens, log2 scale)",
                    y_label: str = "accuracy"):
    """curves: {label: [{seq_len, accuracy, queries, lo?, hi?}, ...]} -> accuracy vs length, one line each, the
    training length dashed, chance dotted, each point annotated with how many trials (queries) it holds; points
    that carry lo/hi (a 95% interval) get a shaded band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        xs, ys = [p[x_key] for p in points], [p["accuracy"] for p in points]
        n = [p.get(count_key, 0) for p in points]
        counts = f"{min(n):,}" if min(n) == max(n) else f"{min(n):,}-{max(n):,}"
        line, = ax.plot(xs, ys, marker="o", label=f"{label} ({counts} {count_key} per point)")
        if all("lo" in q and "hi" in q for q in points):  # a 95% interval per point
            ax.fill_between(xs, [q["lo"] for q in points], [q["hi"] for q in points], color=line.get_color(),
                            alpha=0.12, linewidth=0)
        for x, y, k in zip(xs, ys, n):
            ax.annotate(f"{y:.2f}\nn={k}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color=line.get_color())
    if chance is not None:
        ax.axhline(chance, color="red", linestyle=":", label=f"chance {chance:.3f}")
    if train_len:
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length T = {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(_suptitle(title, model, step), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_accuracy(curves: dict, path, title: str, train_len: int | None = None, chance: float | None = None,
                  model: str | None = None, step: int | None = None, **kw):
    """`figure_accuracy`, saved as a PNG at path."""
    return _save(figure_accuracy(curves, title, train_len, chance, model, step, **kw), path)
