"""Sum of a small array over a mesh axis in one exchange over NVLink (Hopper, one process).

Why: a decode step of a model split over ``model`` ends each attention and each MLP with an
all-reduce of one hidden vector per token, 64 of them a token at Llama-3-8B's depth: latency,
not bandwidth. Here every device writes its part straight into each peer's memory (a peer
pointer that XLA hands the kernel), signals the peer's semaphore and sums the parts once its own
have arrived: one crossing of the link, in one kernel. On two H200s, in the decode step of
Llama-3-8B at 128K, a sum takes 10 us of each device's time (XLA's barrier before the launch
4.5, zeroing the semaphore 1.1, the kernel 4.5). XLA's own all-reduce kernel takes 6.1 us, but
its step idles longer between kernels: with both on the same padded products the step took
5.56 ms with this kernel and 5.90 with ``lax.psum`` (16 steps a call, two sessions; results in
``benchmarks/results/sharded_h200x2/``). On four H200s it was slower than XLA's;
``sharding.row_parallel`` uses it on two.

Contract: inside a ``jax.shard_map`` over ``axis_name`` (manual), ``x`` of any shape whose size
is a multiple of 128; returns the sum over the axis of every device's ``x`` in ``out_dtype``,
accumulated in float32 in rank order, so every device gets the same bits. Reference:
``lax.psum`` (:func:`psum_reference`). Where it runs: :func:`one_shot_problem`.

Safety of the buffers: XLA runs a barrier across the mesh before each launch of a kernel that
addresses peers, so a peer's receive buffer is in use by this kernel (not by something else)
when it is written; a device leaves the kernel only after every peer's part has arrived, and a
peer writes again only after the next barrier, so a part is never overwritten before it is read.
:func:`chained_psum` waits for that barrier at the first sum of a chain only; its docstring says
why the others are safe. No multicast (NVLink SHARP) is used.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

LANES = 128
MAX_BYTES = 128 << 10  # one warpgroup holds a part in registers: the largest tested


def psum_reference(x, axis_name, out_dtype=None):
    """``lax.psum`` in float32, cast to ``out_dtype`` (default: ``x``'s)."""
    return lax.psum(x.astype(jnp.float32), axis_name).astype(out_dtype or x.dtype)


def one_shot_problem(shape, dtype, mesh=None, axis_name: str = "model",
                     chained: bool = False) -> str | None:
    """Why :func:`one_shot_psum` (``chained``: :func:`chained_psum`) cannot sum ``x`` of
    ``shape``/``dtype`` over ``axis_name`` of ``mesh`` (default: the mesh in force,
    ``jax.set_mesh``); None when it can."""
    size = math.prod(shape)
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"it takes float32, bf16 or f16, not {jnp.dtype(dtype).name}"
    if size % LANES:
        return f"its size ({size}) is not a multiple of {LANES}"
    if size * jnp.dtype(dtype).itemsize > MAX_BYTES:
        return f"it is larger than {MAX_BYTES} bytes"
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not a GPU"
    if mesh is None:
        mesh = _concrete_mesh()
        if isinstance(mesh, str):
            return mesh
    if mesh is None or mesh.empty:
        return "no mesh of devices is set (jax.set_mesh)"
    if axis_name not in mesh.axis_names:
        return f"the mesh has no axis {axis_name!r}"
    devices = list(mesh.devices.flat)
    capability = str(getattr(devices[0], "compute_capability", "?"))
    if not capability.startswith("9"):
        return f"the kernel is for Hopper (compute capability 9.x), not {capability}"
    if jax.process_count() != 1:
        return "the mesh spans processes (peer pointers are exchanged within one process)"
    if [d.id for d in devices] != list(range(len(devices))):
        return "the mesh's devices are not in id order"
    return _build_problem(mesh, axis_name, chained)


def _concrete_mesh():
    """The mesh set by ``jax.set_mesh``, also while tracing (``jax.sharding.get_mesh`` refuses
    inside ``jax.jit``; the devices tell whether they are Hopper GPUs); a reason where jax's
    private module moved."""
    try:
        from jax._src.mesh import get_concrete_mesh  # private
    except ImportError:
        return "jax's concrete mesh is out of reach (jax._src.mesh.get_concrete_mesh moved)"
    return get_concrete_mesh()


@functools.cache
def _build_problem(mesh, axis_name: str, chained: bool) -> str | None:
    """Compile the kernel once on ``mesh`` (``chained``: a chain of two sums): a jax whose
    Mosaic GPU API moved gives a reason here (and ``row_parallel`` another sum) instead of a
    failure inside a model. On ``mesh`` itself, as this runs while a model is traced under it:
    a ``shard_map`` over another mesh would fail there."""
    from jax.sharding import PartitionSpec as P

    def sums(a):
        if not chained:
            return one_shot_psum(a, axis_name, jnp.bfloat16)
        y, link = chained_psum(a, new_link(mesh.shape[axis_name], 1), axis_name, 0)
        return chained_psum(y, link, axis_name, 1, jnp.bfloat16)[0]

    f = jax.shard_map(sums, mesh=mesh, in_specs=P(axis_name), out_specs=P(), check_vma=False)
    n = mesh.shape[axis_name]
    try:
        jax.jit(f).trace(jax.ShapeDtypeStruct((n, LANES), jnp.float32)).lower().compile()
    except Exception as e:  # noqa: BLE001 - any failure to build is the reason it cannot run
        first_line = (str(e).splitlines() or [""])[0][:200]
        return f"it does not build here: {type(e).__name__}: {first_line}"
    return None


def _exchange_and_sum(x_ref, y_ref, parts_ref, where, semaphore, axis_name: str, n: int):
    """The body both kernels share: this device's part goes to ``parts_ref[*where, me]`` on
    every device (``parts_ref[*where, r]`` holds rank r's part), each peer's ``semaphore`` is
    signalled, and once this device's own has counted ``n - 1`` arrivals the parts are added in
    float32 in rank order into ``y_ref``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    me = lax.axis_index(axis_name)
    part = x_ref[...]
    parts_ref[(*where, me)] = part
    for offset in range(1, n):
        peer = lax.rem(me + offset, n)
        plgpu.remote_ref(parts_ref, {axis_name: peer})[(*where, me)] = part
    for offset in range(1, n):
        pl.semaphore_signal(semaphore, device_id={axis_name: lax.rem(me + offset, n)})
    pl.semaphore_wait(semaphore, n - 1)
    total = parts_ref[(*where, 0)].astype(jnp.float32)
    for rank in range(1, n):
        total = total + parts_ref[(*where, rank)].astype(jnp.float32)
    y_ref[...] = total.astype(y_ref.dtype)


def one_shot_psum(x, axis_name: str, out_dtype=None):
    """Sum of ``x`` over ``axis_name`` (see the module docstring), in ``out_dtype``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n = lax.axis_size(axis_name)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if n == 1:
        return x.astype(out_dtype)
    rows = x.size // LANES
    flat = x.reshape(rows, LANES)

    def kernel(x_ref, y_ref, parts_ref, arrived):
        _exchange_and_sum(x_ref, y_ref, parts_ref, (), arrived, axis_name, n)

    y, _ = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((rows, LANES), out_dtype),
                  jax.ShapeDtypeStruct((n, rows, LANES), x.dtype)),
        scratch_types=[plgpu.SemaphoreType.REGULAR],
        kernel_name="one_shot_psum",
    )(flat)
    return y.reshape(x.shape)


# ------------------------------------------------------------------ chained sums of one step

SLOTS = 2  # receive slots a chain alternates between (see chained_psum)


def new_link(n: int, rows: int, dtype=jnp.float32):
    """The receive slots and semaphore of a chain of :func:`chained_psum` calls on one device,
    zeroed: ``(slots [SLOTS, n, rows, 128] dtype, sems [2, 128] int16)``. Inside the
    ``jax.shard_map`` over the summed axis of ``n`` devices."""
    return (jnp.zeros((SLOTS, n, rows, LANES), dtype), jnp.zeros((2, LANES), jnp.int16))


def chained_psum(x, link, axis_name: str, call: int, out_dtype=None):
    """:func:`one_shot_psum` for the ``call``-th sum (from 0) of a chain whose receive slots and
    semaphore persist across its calls in ``link`` (:func:`new_link`, threaded from call to
    call: returns ``(sum, link)``); the same contract otherwise.

    Why: a lone sum's semaphore is scratch that XLA zeroes before each launch, and XLA runs a
    barrier over the mesh before each launch so that no peer signals it before it is zeroed or
    writes a buffer still in use: 5.6 us of a 10 us sum. In a chain only call 0 is launched
    after the barrier (its link zeroed before it, in stream order, on every device). Later calls
    skip it, which is safe because
      * the semaphore is never zeroed again: every call adds one per peer and waits for (and
        takes back) as many, so a peer's signal for the next call may arrive early and is kept;
      * calls alternate between two receive slots, and a peer can write slot ``call % 2`` again
        (call ``call + 2``) only after this device has signalled it in call ``call + 1``, which it
        does after call ``call`` (the reads of that slot) has finished; with more than two
        devices a wait may be met early by a fast peer's next signal, but that peer signalled
        only after every part of this call had been written (each device writes all its parts
        before its first signal), and release and acquire carry those writes along;
      * the link is one buffer for the whole chain (each call aliases it in place), which no
        other value of the program shares while the chain runs.
    The link must not be copied between calls (a peer's early write would land in the old
    copy): it is an in-place operand of each call and the next call's input alone.

    The semaphore is an ``int16`` pair, ``sems[0, :2]``: Pallas takes a semaphore from an array
    only of its interpret-mode semaphore type, int16, and the kernel's atomics work on the
    32-bit word at the element's address (4-byte aligned, the array's start), which holds the
    count while ``sems[0, 1]`` stays 0. ``sems[1]`` is rewritten with zeros on each call: the
    semaphore's atomics are not seen as writes, and a write makes ``sems`` an (aliased)
    output of the kernel, as the slots are."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n = lax.axis_size(axis_name)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if n == 1:
        return x.astype(out_dtype), link
    slot = call % SLOTS
    rows = x.size // LANES
    flat = x.reshape(rows, LANES)
    slots, sems = link

    def kernel(x_ref, slots_ref, sems_ref, y_ref):
        sems_ref[1] = jnp.zeros((LANES,), jnp.int16)  # a write: sems is aliased out
        _exchange_and_sum(x_ref, y_ref, slots_ref, (slot,), sems_ref.at[0, 0], axis_name, n)

    slots_ref, sems_ref = jax.new_ref(slots), jax.new_ref(sems)
    y = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((rows, LANES), out_dtype),
        compiler_params=plgpu.CompilerParams(skip_device_barrier=call > 0),
        kernel_name="chained_psum",
    )(flat.astype(slots.dtype), slots_ref, sems_ref)
    return y.reshape(x.shape), (slots_ref[...], sems_ref[...])
