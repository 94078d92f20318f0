"""Plots of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np


def accuracy_grid(record: dict) -> tuple[list[int], list[float], np.ndarray]:
    """``(lengths, depths, accuracy [depths, lengths])`` of an evaluation record (NaN where a
    cell did not run)."""
    results = record["results"]
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in results:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    return lengths, depths, grid


def heatmap(record: dict, path: str, title: str | None = None) -> None:
    """The familiar needle-in-a-haystack map: depth (rows) x context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grid = accuracy_grid(record)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                        for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or heatmap_title(record), fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_title(record: dict) -> str:
    """Task, method with its options, mode and samples per cell: enough to tell two maps apart."""
    from longctx_jax.evals.runner import method_label

    n = sorted({r["n"] for r in record["results"]})
    per_cell = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
    return (f"{record['task']}: {method_label(record)}\n"
            f"({record['mode']}, {per_cell} samples per cell)")
