"""Logical axis names for parameters and caches, and the rules that map them to mesh axes.

Every parameter and cache dimension has a *logical* name (``kv_heads``, ``mlp``, ``batch``...);
a rules table maps names to the axes of a device mesh ``("data", "model")``, so the layout of
a sharded run is decided in one place. The default rules are Megatron-style: attention split by
heads and the MLP by its intermediate dimension over ``model``, caches by KV head over ``model``
and by batch row over ``data``. The fused weights are stored head-major (see ``model.Block``), so
a split along ``kv_heads`` keeps each KV head's query, key and value projections together; the
output projection's ``heads`` axis is the query heads times the head dim, in KV-group order, so
its blocks line up with them. An untied output layer is split by vocabulary (``logits``): every
decode step reads all of it, 1 GB at Llama-3-8B's shape, which whole on each device would cost
every device that read; its logits stay split (a greedy pick gathers only each device's best).
The embedding table stays whole: a lookup reads one row per token, split it would add an
all-reduce.

A run on a mesh (``make_mesh``, ``--mesh data=D,model=M``) places the parameters and caches by
these rules (``shard_params``, ``shard_caches``; inside ``jax.jit``, ``constrain_caches``) and
lets XLA partition the dense layers; the attention kernels, which XLA cannot partition, run per
shard (``pallas_kernels._spmd``), and the small sums of a decode step's row-parallel products
(``row_parallel``) may run as a kernel of ours. ``check_mesh`` refuses a ``model`` axis that
does not divide the KV heads before any device work: a KV head is the unit of attention, and
its query heads must sit beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError
from pallas_kernels.allreduce import (LANES, MAX_BYTES, chained_psum, new_link, one_shot_problem,
                                      one_shot_psum, psum_reference)

RULES: Mapping[str, str | None] = {
    "batch": "data", "kv_heads": "model", "heads": "model", "mlp": "model", "logits": "model",
    "vocab": None, "embed": None, "qkv": None, "head_dim": None, "gate_up": None, "seq": None,
}

_LAYER_AXES = {
    "input_norm": {"scale": ("embed",)},
    "qkv": {"kernel": ("embed", "kv_heads", "qkv", "head_dim"),
            "bias": ("kv_heads", "qkv", "head_dim")},
    "o": {"kernel": ("heads", "embed")},
    "post_attn_norm": {"scale": ("embed",)},
    "gate_up": {"kernel": ("embed", "gate_up", "mlp")},
    "down": {"kernel": ("mlp", "embed")},
}

def param_axes(cfg: ModelConfig) -> dict:
    """Logical axes of every parameter: the tree of ``model.param_shapes(cfg)`` with a tuple of
    names (one per dimension) at each leaf."""
    from longctx_jax.model import param_shapes

    shapes = param_shapes(cfg)
    axes = {"embed": {"embedding": ("vocab", "embed")}, "final_norm": {"scale": ("embed",)}}
    for i in range(cfg.num_layers):
        layer = shapes[f"layer_{i}"]
        axes[f"layer_{i}"] = {name: {k: _LAYER_AXES[name][k] for k in leaves}
                              for name, leaves in layer.items()}
    if "lm_head" in shapes:
        axes["lm_head"] = {"kernel": ("embed", "logits")}
    return axes


def cache_axes(caches):
    """Logical axes of every array of a cache tree (any policy's): each cache dataclass names
    its arrays' axes in a ``logical_axes`` class attribute ``{field: names}``; fields it does not
    name hold nested caches (Duo's two ``KV``s)."""
    if caches is None:
        return None
    if isinstance(caches, (tuple, list)):
        return type(caches)(cache_axes(c) for c in caches)
    if not dataclasses.is_dataclass(caches):
        raise ValueError(f"no logical axes for a cache array of shape {np.shape(caches)}: "
                         "its dataclass must name them in `logical_axes`")
    named = getattr(type(caches), "logical_axes", {})
    return dataclasses.replace(caches, **{  # static fields are not arrays: they stay as they are
        f.name: named[f.name] if f.name in named else cache_axes(getattr(caches, f.name))
        for f in dataclasses.fields(caches) if not f.metadata.get("static")})


def partition_specs(axes, rules: Mapping[str, str | None] = RULES):
    """The ``PartitionSpec`` of every leaf of a tree of logical-axes tuples."""
    return jax.tree.map(lambda names: PartitionSpec(*(rules.get(n) for n in names)), axes,
                        is_leaf=_is_names)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and bool(x) and all(isinstance(n, str) for n in x)


# ------------------------------------------------------------------------------------ meshes

AXES = ("data", "model")


def parse_mesh(text: str) -> tuple[int, int]:
    """``"data=2,model=4"`` -> ``(2, 4)`` (either part may be left out: it is then 1)."""
    sizes = {"data": 1, "model": 1}
    seen = set()
    for item in str(text).split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in sizes or name in seen:
            raise LongctxError(f"--mesh takes data=D,model=M (each once), got {text!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise LongctxError(f"--mesh {name} must be an integer, got {value!r}") from None
        if sizes[name] < 1:
            raise LongctxError(f"--mesh {name} must be >= 1, got {sizes[name]}")
        seen.add(name)
    return sizes["data"], sizes["model"]


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``data * model`` devices.

    The axes are ``Auto``: the model's dense ops are partitioned by XLA from the shardings of
    the parameters and caches (``jax.jit`` with ``NamedSharding``), and the attention kernels run
    per shard in a ``jax.shard_map`` (``pallas_kernels._spmd``).
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in zip(AXES, (data, model)):
        if not isinstance(size, int) or size < 1:
            raise LongctxError(f"mesh {name} must be an integer >= 1, got {size!r}")
    if data * model > len(devices):
        hint = ("; XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N CPU devices"
                if devices[0].platform == "cpu" else "")
        raise LongctxError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                           f"{len(devices)} available ({devices[0].platform}){hint}")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices[: data * model])


def mesh_sizes(mesh: Mesh | None) -> tuple[int, int]:
    """``(data, model)`` sizes of ``mesh`` (``(1, 1)`` without one)."""
    if mesh is None:
        return 1, 1
    shape = dict(mesh.shape)
    return shape.get("data", 1), shape.get("model", 1)


def check_mesh(cfg: ModelConfig, mesh: Mesh | None, batch: int | None = None,
               model_name: str | None = None) -> None:
    """Raise ``LongctxError`` (before any device work) unless ``mesh`` can shard ``cfg``: its
    ``model`` axis must divide the KV heads (a KV head and its query heads stay on one device,
    where its attention runs) and, given ``batch``, its ``data`` axis the batch."""
    if mesh is None:
        return
    missing = set(AXES) - set(mesh.axis_names)
    if missing:
        raise LongctxError(f"the mesh needs axes {AXES}, got {tuple(mesh.axis_names)}")
    data, model = mesh_sizes(mesh)
    hkv = cfg.num_kv_heads
    if hkv % model:
        name = model_name or "the model"
        raise LongctxError(f"{name} has {hkv} KV heads: model must divide {hkv} "
                           f"({_divisors(hkv)}), got model={model}")
    if batch is not None and batch % data:
        raise LongctxError(f"a batch of {batch} sequences does not split over data={data}: data "
                           f"must divide {batch} ({_divisors(batch)})")


def _divisors(n: int) -> str:
    ds = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ds[0] if len(ds) == 1 else ", ".join(ds[:-1]) + " or " + ds[-1]


def fit_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """``spec`` with every mesh axis that does not divide its dimension dropped (that dimension
    is then whole on every device of the axis): a batch of one, DuoAttention's per-layer subsets
    of heads, an MLP width the axis does not divide."""
    sizes = dict(mesh.shape)
    return PartitionSpec(*(a if a in sizes and shape[i] % sizes[a] == 0 else None
                           for i, a in enumerate(spec)))


def shardings(tree, axes, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
    """The ``NamedSharding`` of every array of ``tree`` (arrays or ``jax.eval_shape``
    structs) from its logical ``axes`` (:func:`param_axes`, :func:`cache_axes`), fitted to the
    shapes (:func:`fit_spec`)."""
    specs = partition_specs(axes, rules)
    return jax.tree.map(lambda x, s: NamedSharding(mesh, fit_spec(s, np.shape(x), mesh)),
                        tree, specs)


def shard_params(cfg: ModelConfig, params, mesh: Mesh):
    """``params`` placed on ``mesh`` by :data:`RULES`: attention by KV head, the MLP by its
    intermediate dimension and an untied output layer by vocabulary over ``model``; the
    embedding table and norms replicated."""
    return jax.device_put(params, shardings(params, param_axes(cfg), mesh))


def shard_caches(caches, mesh: Mesh):
    """A policy's caches placed on ``mesh``: batch over ``data``, KV heads over ``model``."""
    return jax.device_put(caches, shardings(caches, cache_axes(caches), mesh))


def constrain_caches(caches):
    """Inside ``jax.jit`` under ``jax.set_mesh``: pin the caches' layout (batch over ``data``,
    KV heads over ``model``), so XLA does not pick another for arrays it creates (``zeros``).
    Without a mesh, the caches as they are."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or caches is None:
        return caches
    specs = partition_specs(cache_axes(caches))
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(
        x, fit_spec(s, x.shape, mesh)), caches, specs)


def batch_sharding(mesh: Mesh, batch: int, ndim: int = 1) -> NamedSharding:
    """Inputs with a leading batch axis (tokens, lengths): rows over ``data`` where it divides."""
    spec = fit_spec(PartitionSpec("data", *(None,) * (ndim - 1)), (batch,) + (1,) * (ndim - 1),
                    mesh)
    return NamedSharding(mesh, spec)


# ------------------------------------------------------------------- row-parallel products

ALLREDUCES = ("auto", "lone", "psum", "xla")
_allreduce = jax.make_user_context("auto")  # part of jit's cache key: a change retraces
# Meshes on which the one-shot kernel measured faster than XLA's all-reduce in decode: two H200s
# (Llama-3-8B at 128K, the same padded products: lone sums 5.56 ms a token against 5.90 with
# lax.psum; chained, 4.93 against 5.25 lone, 128 steps). On four (Llama-3-70B at 32K, lone sums)
# it was slower: 14.20 ms against 13.68.
ONE_SHOT_MESH_SIZES = (2,)
# XLA's GPU compiler rewrites a vector times a matrix of fewer elements than this into a multiply
# and a reduction (gpu_algebraic_simplifier, jaxlib 0.11).
XLA_VECTOR_REWRITE = 10_000_000


@contextlib.contextmanager
def allreduce(kind: str):
    """Pick how :func:`row_parallel` sums over ``model`` in what is traced inside: ``"auto"``
    (the default; see there: a decode step's one-shot sums form one chain, :func:`chained_sums`),
    ``"lone"`` (as ``auto``, but every one-shot sum on its own, behind XLA's barrier: the
    previous default, to measure the chain), ``"psum"`` (every small sum as
    :func:`summed_per_shard` by ``lax.psum``: the kernel's path with XLA's all-reduce, to
    measure the kernel alone) or ``"xla"`` (every product partitioned by XLA, which inserts its
    own all-reduce: the plain path). Part of ``jax.jit``'s cache key."""
    if kind not in ALLREDUCES:
        raise LongctxError(f"allreduce takes {', '.join(ALLREDUCES[:-1])} or {ALLREDUCES[-1]}, "
                           f"got {kind!r}")
    with _allreduce(kind):
        yield


class _Chain:
    """The one-shot sums of one traced step that share a link (``allreduce.chained_psum``):
    the link as the last sum left it, the size (``rows``) and trace it belongs to, and the
    number of calls so far."""

    def __init__(self):
        self.link, self.rows, self.trace, self.calls = None, None, None, 0


_chain: contextvars.ContextVar[_Chain | None] = contextvars.ContextVar("chain", default=None)


@contextlib.contextmanager
def chained_sums():
    """Make the one-shot sums that :func:`row_parallel` traces inside one chain (by default;
    not under ``allreduce("lone")``): ``Decoder`` opens it around a decode step's layers. The
    chain keeps its receive slots and semaphore from sum to sum (``allreduce.chained_psum``), so
    the step pays XLA's barrier and the zeroing once instead of at every sum: on two H200s,
    Llama-3-8B at 128K decodes in 4.93 ms a token against 5.25 with lone sums. A sum traced at
    another level than the one before (inside a ``scan``, ``cond`` or ``checkpoint``), or of
    another size, starts a new chain, zeroed and behind the barrier: a chain's link is a value
    of one trace."""
    token = _chain.set(_Chain())
    try:
        yield
    finally:
        _chain.reset(token)


def row_parallel(x, kernel):
    """``x [..., n] @ kernel [n, d]`` in ``x``'s dtype, for the products whose contracted
    dimension a mesh splits over ``model`` (attention's output projection by heads, the MLP's
    down projection by its intermediate dimension): each device's partial product is summed
    over ``model``, Megatron-style.

    Small sums (a decode step's: one hidden vector per row) are latency. On a mesh of
    ``ONE_SHOT_MESH_SIZES`` devices where the one-shot NVLink kernel runs
    (``pallas_kernels.allreduce``: Hopper GPUs of one process) they are :func:`summed_per_shard`
    by it, those of a decode step as one chain (:func:`chained_sums`). A single row whose shard
    of ``kernel`` XLA would rewrite as a vector product (under ``XLA_VECTOR_REWRITE`` elements)
    is :func:`summed_per_shard` by ``lax.psum``, which pads it to a GEMM. Everything else (no
    mesh, a prefill chunk's sums, ``allreduce("xla")``) XLA partitions from the shardings,
    inserting its own all-reduce. See :func:`allreduce` for the other choices."""
    kernel = kernel.astype(x.dtype)
    reduce = _small_sum(x, kernel)
    if reduce is None:
        return jnp.tensordot(x, kernel, axes=1)
    if reduce is chained_psum:
        if _chain.get() is not None:
            return _chained(x, kernel, _chain.get())
        reduce = one_shot_psum  # no chain open: a lone sum
    return summed_per_shard(x, kernel, reduce)


def _small_sum(x, kernel):
    """The ``reduce`` that :func:`row_parallel` hands :func:`summed_per_shard` (for
    ``chained_psum``: the next sum of the open chain, if any), or ``None`` for XLA's
    partitioned product."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes or _allreduce.value == "xla":
        return None
    model = dict(mesh.shape).get("model", 1)
    if model == 1 or kernel.shape[0] % model:
        return None
    rows = _local_rows(x, mesh)
    if _allreduce.value == "psum" and rows * kernel.shape[1] * 4 <= MAX_BYTES:
        return psum_reference
    if _allreduce.value in ("auto", "lone") and mesh.size in ONE_SHOT_MESH_SIZES:
        shape = (rows, kernel.shape[1])
        if _allreduce.value == "auto" and one_shot_problem(shape, jnp.float32,
                                                           chained=True) is None:
            return chained_psum
        if one_shot_problem(shape, jnp.float32) is None:
            return one_shot_psum
    if rows == 1 and kernel.size // model < XLA_VECTOR_REWRITE:
        return psum_reference
    return None


def summed_per_shard(x, kernel, reduce):
    """``x [B, ..., n] @ kernel [n, d]`` under a mesh that splits ``n`` over ``model``: in a
    ``jax.shard_map``, each device's partial product in float32, summed over ``model`` by
    ``reduce(part, axis_name, out_dtype)`` (``one_shot_psum``, or ``psum_reference``), rows over
    ``data`` where it divides ``B``; in ``x``'s dtype.

    A single row is multiplied as two, the second zero. XLA's GPU compiler rewrites a vector
    times a matrix of under ``XLA_VECTOR_REWRITE`` elements (the 2048 x 4096 shard of Llama-3-8B's
    output projection on two devices) into a multiply and a reduction, 5x slower than the GEMM
    (an H200: 27 us a layer); two rows keep it a GEMM. The down projection's shard (7168 x 4096)
    is a GEMM either way, but padded too the step measured faster (5.55 ms a token at 128K on
    two H200s against 5.93, in two sessions)."""
    mesh = jax.sharding.get_abstract_mesh()
    x_spec = _shard_spec(x, mesh)

    def local(xs, ws):
        part = _partial_product(xs, ws)
        return reduce(part, "model", x.dtype).reshape(*xs.shape[:-1], ws.shape[1])

    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, PartitionSpec("model", None)),
                         out_specs=PartitionSpec(*x_spec[:-1], None),
                         check_vma=False)(x, kernel.astype(x.dtype))


def _partial_product(xs, ws):
    """One device's ``xs [..., n/M] @ ws [n/M, d]`` in float32, ``[rows, d]``; a single row is
    multiplied as two (see :func:`summed_per_shard`)."""
    rows = xs.reshape(-1, xs.shape[-1])
    if rows.shape[0] == 1:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    return jnp.dot(rows, ws, preferred_element_type=jnp.float32)[: math.prod(xs.shape[:-1])]


def _chained(x, kernel, chain: _Chain):
    """:func:`summed_per_shard` by the one-shot kernel as the next sum of ``chain``: its link
    goes in and comes out of the ``shard_map``, each device's own. A sum of another size, or
    traced at another level, than the chain's last starts a new chain (see
    :func:`chained_sums`)."""
    from jax.extend.core import get_opaque_trace_state

    mesh = jax.sharding.get_abstract_mesh()
    x_spec = _shard_spec(x, mesh)
    model = dict(mesh.shape)["model"]
    rows = _local_rows(x, mesh) * kernel.shape[1] // LANES  # of the kernel's [rows, 128] view
    trace = get_opaque_trace_state()
    if (chain.rows, chain.trace) != (rows, trace):
        chain.link, chain.rows, chain.trace, chain.calls = None, rows, trace, 0
    call, link_spec = chain.calls, PartitionSpec(tuple(mesh.axis_names))

    def local(xs, ws, *link):
        part = _partial_product(xs, ws)
        y, link = chained_psum(part, link if call else new_link(model, rows), "model", call,
                               x.dtype)
        return (y.reshape(*xs.shape[:-1], ws.shape[1]), *link)

    y, *link = jax.shard_map(
        local, mesh=mesh,
        in_specs=(x_spec, PartitionSpec("model", None)) + (link_spec,) * len(chain.link or ()),
        out_specs=(PartitionSpec(*x_spec[:-1], None), link_spec, link_spec),
        check_vma=False)(x, kernel, *(chain.link or ()))
    chain.link, chain.calls = tuple(link), call + 1
    return y


def _local_rows(x, mesh) -> int:
    """Rows of ``x [B, ..., n]`` on one device in :func:`summed_per_shard`."""
    return math.prod(x.shape[:-1]) // (dict(mesh.shape)["data"] if _shard_spec(x, mesh)[0]
                                       else 1)


def _shard_spec(x, mesh) -> PartitionSpec:
    """``x [B, ..., n]``'s layout in :func:`summed_per_shard`: rows over ``data`` where it
    divides ``B``, ``n`` over ``model``."""
    return fit_spec(PartitionSpec("data", *(None,) * (x.ndim - 2), "model"), x.shape, mesh)
