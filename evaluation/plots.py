"""PNG plots of the results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(curves: dict, path, train_len: int | None = None, title: str = "perplexity vs context length"):
    """curves: {label: [{length, ppl}, ...]} -> one line each, log2 x axis; a dashed line at the training length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([p["length"] for p in points], [p["ppl"] for p in points], marker="o", label=label)
    if train_len:
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
    return Path(path)


def plot_heatmap(grid: dict, path, title: str):
    """grid: {lengths, depths, accuracy[length][depth]} -> a length x depth heatmap, cells annotated."""
    plt = _pyplot()
    lengths, depths, acc = grid["lengths"], grid["depths"], grid["accuracy"]
    values = [[float("nan") if a is None else a for a in row] for row in acc]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.0 + 0.5 * len(lengths)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(values):
        for j, a in enumerate(row):
            if a == a:
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title} (overall {grid['overall']:.2f})")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
    return Path(path)
