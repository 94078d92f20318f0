"""Plots of training runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < 2 * n or n < 2:
        return y
    kernel = np.ones(n) / n
    return np.convolve(np.pad(y, (n // 2, n - 1 - n // 2), mode="edge"), kernel, mode="valid")


def loss_figure(steps: np.ndarray, loss: np.ndarray, label: str, ylabel: str):
    """``(plt, fig, ax, right)``: the loss per step (faint) and its running mean on a log-scale
    axis ``ax``, and a second y axis ``right`` for a run's other curve; :func:`save_figure`
    finishes it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label=f"{label} (per step)")
    ax.plot(steps, _smooth(loss, max(len(steps) // 25, 1)), color="tab:blue",
            label=f"{label} (smoothed)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    return plt, fig, ax, ax.twinx()


def save_figure(plt, fig, ax, right, path: str | os.PathLike, title: str, legend: str) -> None:
    """One legend for both axes of a :func:`loss_figure` (at ``legend``), the title, and the
    figure written to ``path``."""
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc=legend, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss(records: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Distillation loss (raw and smoothed, log scale) and mean gate against the step."""
    steps = np.array([r["step"] for r in records])
    plt, fig, ax, right = loss_figure(steps, np.array([r["distill"] for r in records]), "distill",
                                      "mean (h_full - h_mixed)^2 at answer positions")
    right.plot(steps, [r["mean_gate"] for r in records], color="tab:red", label="mean gate")
    right.set_ylim(0, 1.05)
    right.set_ylabel("mean gate")
    save_figure(plt, fig, ax, right, path, title or "DuoAttention gate training", "upper right")


def plot_gates(gates: np.ndarray, path: str | os.PathLike, title: str | None = None,
               ratio: float = 0.25) -> None:
    """Gate map: KV heads (rows) x layers (columns), values printed; the heads a
    ``retrieval_ratio`` of ``ratio`` keeps as retrieval heads are outlined."""
    from longctx_jax.policies.duo import select_heads

    plt = _pyplot()
    gates = np.asarray(gates, np.float32)
    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * layers + 1.8), 0.55 * heads + 1.6))
    image = ax.imshow(gates.T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for layer, chosen in enumerate(select_heads(gates, retrieval_ratio=ratio)):
        for h in range(heads):
            value = gates[layer, h]
            ax.text(layer, h, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if value > 0.6 else "white")
            if h in chosen:
                ax.add_patch(plt.Rectangle((layer - 0.5, h - 0.5), 1, 1, fill=False,
                                           edgecolor="red", lw=1.5))
    ax.set_xticks(range(layers))
    ax.set_xticklabels([str(i) for i in range(layers)], fontsize=7)
    ax.set_yticks(range(heads))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_title((title or "DuoAttention gates") + f" (red: retrieval heads at {ratio:.0%})",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="gate", fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
