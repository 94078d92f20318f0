"""Code the notebooks share: where the committed results are, smoke mode's small model, labels,
plain-text tables and needle heatmaps."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterable, Sequence

import warnings

import jax

from longctx_jax.evals.plots import accuracy_grid  # noqa: F401  (the notebooks use it)

# tqdm.auto asks for notebook widgets; the notebooks turn progress bars off.
warnings.filterwarnings("ignore", message="IProgress not found")

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def device() -> str:
    """``gpu: NVIDIA H100 80GB HBM3 (jax 0.11.2)``: what this notebook ran on."""
    return f"{jax.default_backend()}: {jax.devices()[0].device_kind} (jax {jax.__version__})"


def first_layers(model, n: int):
    """``model`` (a ``LoadedModel``) cut to its first ``n`` layers, with the same embeddings,
    final norm and tokenizer. Smoke mode runs this: it compiles quickly, and its outputs mean
    nothing."""
    cfg = dataclasses.replace(model.config, num_layers=n)
    params = {k: v for k, v in model.params.items()
              if not k.startswith("layer_") or int(k.removeprefix("layer_")) < n}
    return dataclasses.replace(model, config=cfg, params=params)


def shipped_duo(cfg, **options):
    """DuoAttention with the gates shipped for SmolLM2, for a model of ``cfg``'s layers: the same
    policy as ``lc.make_policy("duo", **options)`` on the whole model, and the first layers'
    gates on a model cut by :func:`first_layers`."""
    from longctx_jax.policies.duo import Duo, load_gates

    return Duo.from_gates(load_gates()[: cfg.num_layers], **options)


def shipped_locret(cfg, **options):
    """Locret with the retaining heads shipped for SmolLM2, for a model of ``cfg``'s layers: the
    same policy as ``lc.make_policy("locret", **options)`` on the whole model, and the first
    layers' heads on a model cut by :func:`first_layers` (a layer's head reads only that layer's
    query, key and value, which the cut leaves as they were)."""
    import jax.numpy as jnp

    from longctx_jax.policies import make_policy
    from longctx_jax.policies.locret import load_heads

    w1, w2, _ = load_heads()
    if cfg.num_layers == w1.shape[0]:
        return make_policy("locret", **options)
    return make_policy("locret", w1=jnp.asarray(w1[: cfg.num_layers]),
                       w2=jnp.asarray(w2[: cfg.num_layers]), **options)


def label(spec: str) -> str:
    """A short name for a method spec: ``streaming 64+256``, ``duo 50% 64+256``, ...

    ``spec`` is ``name[:option=value...]`` as in result files (``duo:retrieval_ratio=0.5:...``).
    """
    name, *items = spec.split(":")
    opts = dict(item.split("=", 1) for item in items)
    opts.pop("gates", None)
    head = [name]
    if name in ("streaming", "duo"):
        window = f"{opts.pop('sink', '64')}+{opts.pop('window', '256')}"
        ratio = opts.pop("retrieval_ratio", None)
        head = [name] + ([f"{float(ratio):.0%}"] if ratio is not None else []) + [window]
    return " ".join(head + [f"{k}={v}" for k, v in opts.items()])


def spec_of(policy) -> str:
    """The spec string of a policy object: its options that differ from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(policy)}
    return ":".join([policy.name] + [f"{k}={v}" for k, v in policy.options().items()
                                     if v != defaults.get(k) and k != "gates"])


def load_json(path: str | pathlib.Path) -> Any:
    return json.loads(pathlib.Path(path).read_text())


def quality_records(folder: str | pathlib.Path) -> list[dict]:
    """The evaluation records (``longctx eval`` / ``benchmarks.quality`` JSON) in ``folder``."""
    records = []
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        data = load_json(path)
        if isinstance(data, dict) and "task" in data and "results" in data:
            records.append({**data, "file": path.name})
    return records


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def context_name(n: int) -> str:
    """``8192 -> "8K"``; other values as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def print_table(rows: Iterable[dict], columns: Sequence[str] | None = None) -> None:
    """Rows of dicts as an aligned text table (numbers to 3 significant decimals)."""
    rows = list(rows)
    columns = list(columns or (rows[0] if rows else []))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    text = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in text]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]
    print("  ".join(c.rjust(w) if n else c.ljust(w)
                    for c, w, n in zip(columns, widths, numeric)).rstrip())
    print("  ".join("-" * w for w in widths))
    for t in text:
        print("  ".join(v.rjust(w) if n else v.ljust(w)
                        for v, w, n in zip(t, widths, numeric)).rstrip())


def heatmap(ax, record: dict, title: str | None = None):
    """Needle accuracy by depth (rows) and context length (columns) on ``ax``; returns the
    image (for a colorbar)."""
    lengths, depths, grid = accuracy_grid(record)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [context_name(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_title(title or label(record.get("method_spec") or record["method"]), fontsize=9)
    return image
