"""Host calls from jitted code: :func:`host_call` runs a numpy function on the host, like
``io_callback`` but through an XLA FFI handler (``host_call.cc``).

Why: a retrieval decode step makes one host call per layer, and on an H200 ``io_callback``
costs about 0.56 ms a call in JAX's machinery (copies to pageable memory, dispatch), 18 ms of a
token at 32 layers; the handler copies through pinned memory on XLA's stream and calls the
function directly, about 0.06 ms a call. The handler is built on first use (as the native
step, :mod:`host_offload.native`) against the FFI headers jaxlib ships.

Where it cannot serve, :func:`host_call` is ``io_callback``: no compiler, a default backend other
than the CPU or a CUDA GPU, a mesh of several devices set with ``jax.set_mesh`` (as
``generate`` and ``score`` do; the partitioner wants a sharding for a side-effecting call,
which ``io_callback`` gives and the handler does not), or ``LONGCTX_HOST_CALL=callback``. A
call jitted over arrays sharded across devices without a mesh set fails to compile: set the
mesh, or ``LONGCTX_HOST_CALL=callback``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import sys
import threading
import traceback
from typing import Callable

import jax
import jax.extend
import jaxlib.version
import numpy as np
from jax.experimental import io_callback

from host_offload import native

SOURCE = pathlib.Path(__file__).with_name("host_call.cc")
TARGET = "longctx_host_call"
_DISPATCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_int64)

# fn id -> (function, static arguments, operand and result (shape, dtype) pairs)
_calls: dict[int, tuple] = {}
_ids: dict[tuple, int] = {}
_lock = threading.Lock()


def host_call(fn: Callable, result: jax.ShapeDtypeStruct | None, *args, static: tuple = ()):
    """``fn(*static, *args)`` on the host with ``args`` as numpy arrays (its own, to keep),
    returning an array of ``result``'s shape and dtype (``None``: nothing); never removed as
    unused. It runs after the device work its operands depend on; two calls with no data
    dependency between them may run in either order (``io_callback(ordered=True)`` orders
    them). ``fn`` and ``static`` must be hashable and stable (a module-level function, not a
    fresh lambda): they name the call across traces."""
    if not _use_ffi():
        return io_callback(functools.partial(fn, *static), result, *args, ordered=True)
    args = [jax.numpy.asarray(a) for a in args]
    spec = None if result is None else (tuple(result.shape), np.dtype(result.dtype))
    key = (fn, static, tuple((a.shape, np.dtype(a.dtype)) for a in args), spec)
    with _lock:
        fid = _ids.get(key)
        if fid is None:
            fid = _ids[key] = len(_ids) + 1
            _calls[fid] = (fn, static, key[2], spec)
    out = jax.ffi.ffi_call(TARGET, () if result is None else result,
                           has_side_effect=True)(*args, fn=np.int64(fid))
    return None if result is None else out


def route() -> str:
    """How a host call traced now crosses: ``"ffi"`` (the handler) or ``"io_callback"``."""
    return "ffi" if _use_ffi() else "io_callback"


def _use_ffi() -> bool:
    if os.environ.get("LONGCTX_HOST_CALL", "ffi") == "callback" or not _registered():
        return False
    backend = jax.extend.backend.get_backend()
    if backend.platform not in ("cpu", "gpu") or "rocm" in backend.platform_version.lower():
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


_library = None  # the handler's library, kept loaded while its targets are registered


@functools.cache
def _registered() -> bool:
    """Whether the handler is built and registered (for the CPU and CUDA)."""
    flags = ("-O2", "-shared", "-fPIC", "-std=c++17", "-w", "-I" + jax.ffi.include_dir(),
             "-ldl")
    lib = native.build(SOURCE, flags, "the host-call handler", "host calls go through "
                       "io_callback (slower)", against="jaxlib " + jaxlib.version.__version__)
    if lib is None:
        return False
    global _library
    _library = lib
    lib.host_call_set_dispatch.argtypes = [_DISPATCH]
    lib.host_call_set_dispatch(_dispatch)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.HostCallCpu), platform="cpu")
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.HostCallCuda), platform="CUDA")
    return True


def _view(address: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def _run(fid: int, args, rets, message: int, capacity: int) -> int:
    """The handler's dispatcher: run call ``fid`` on views of the buffers at ``args`` and write
    its result to ``rets[0]``; 0, or 1 with the error's text at ``message``."""
    fn = None
    try:
        fn, static, specs, result = _calls[fid]
        # copies: the buffers are XLA's or the staging memory, reused after the call
        arrays = [_view(args[i], s, d).copy() for i, (s, d) in enumerate(specs)]
        out = fn(*static, *arrays)
        if result is not None:
            out, (shape, dtype) = np.asarray(out), result
            if out.shape != shape:
                raise ValueError(f"host call returned shape {out.shape}, expected {shape}")
            np.copyto(_view(rets[0], shape, dtype), out, casting="same_kind")
        return 0
    except BaseException as err:  # noqa: BLE001 - reported through XLA, never lost
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        print(f"host call {getattr(fn, '__qualname__', fid)} failed:", file=sys.stderr)
        traceback.print_exc()
        data = text.encode()[: max(capacity - 1, 0)].decode(errors="ignore").encode()
        ctypes.memmove(message, data + b"\0", len(data) + 1)
        return 1


_dispatch = _DISPATCH(_run)  # kept: the handler holds its address
