"""The native decode step of listed indexes (``listed_step.cc``), compiled on first use.

A retrieval decode step is one host call per layer, and in numpy its search and attention cost
about 0.6 ms of interpreter work per call before any key is read: most of a 30 ms token at 32
layers. The C++ step does the same work (probe, scan, top ``k``, attention) for every
(sequence, KV head) of the call in one function, on an OpenMP team, without the GIL.

It is built with the host's C++ compiler (``$CXX``, else ``c++``) into
``$LONGCTX_CACHE`` (default ``~/.cache/longctx_jax``), once per source version, and loaded with
ctypes (:func:`build`, which builds the host-call handler too). Without a compiler, or with
``LONGCTX_NATIVE=0``, the store runs its numpy step (the reference the tests compare with),
after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import numpy as np

SOURCE = pathlib.Path(__file__).with_name("listed_step.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_P = ctypes.c_void_p
MIN_SLICE = 1024  # a part's keys are scored on several threads in slices of at least this many


def enabled() -> bool:
    """Whether stores use the native step (``LONGCTX_NATIVE=0`` turns it off)."""
    return os.environ.get("LONGCTX_NATIVE", "1") != "0" and library() is not None


@functools.cache
def library():
    """The compiled step (a ctypes library), or ``None`` where it cannot be built."""
    lib = build(SOURCE, FLAGS, "the native retrieval step", "retrieval's host step runs in "
                "numpy (slower)")
    if lib is not None:
        lib.listed_step.restype = None
        lib.listed_step.argtypes = ([ctypes.c_int] * 5 + [ctypes.c_double, ctypes.c_float,
                                                          ctypes.c_int, ctypes.c_int64]
                                    + [_P] * 16)
    return lib


def build(source: pathlib.Path, flags: tuple[str, ...], what: str, otherwise: str,
          against: str = ""):
    """``source`` compiled with ``flags`` into the cache (once per source, flags, compiler, CPU
    and ``against``: the version of headers it includes) and loaded with ctypes; ``None``,
    after a warning ending in ``otherwise``, where there is no compiler or the build or the
    load fails."""
    text = source.read_bytes()
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn(f"no C++ compiler found: {otherwise}")
        return None
    # -march=native: a library built on one CPU may not run on another (a shared home)
    tag = hashlib.sha256(text + " ".join((compiler, *flags, against, _cpu_id())).encode())
    tag = tag.hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("LONGCTX_CACHE")
                         or pathlib.Path.home() / ".cache" / "longctx_jax")
    path = cache / f"{source.stem}-{tag}.so"
    if not path.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = pathlib.Path(tmp) / path.name
                subprocess.run([compiler, *flags, "-o", str(built), str(source)], check=True,
                               capture_output=True, text=True)
                os.replace(built, path)  # atomic: a concurrent build loses nothing
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            warnings.warn(f"could not build {what} ({detail.strip()[:200]}): {otherwise}")
            return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:  # e.g. a cache shared with a machine of another libc
        warnings.warn(f"could not load {what} {path} ({err}): {otherwise}")
        return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return "".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def address(a: np.ndarray | None) -> int:
    """``a``'s data address (0 for ``None``)."""
    return 0 if a is None else a.__array_interface__["data"][0]


def listed_step(q: np.ndarray, keys: np.ndarray, values: np.ndarray | None, cent_t: np.ndarray,
                offsets: np.ndarray, fill: np.ndarray, ids: np.ndarray, list_keys: np.ndarray,
                nlist: np.ndarray, listed: np.ndarray, n: np.ndarray, *, k: int, bf16: bool,
                scan: float, scale: float, threads: int, attend: bool):
    """One step for ``P`` parts: ``q [P, g, D]`` float32 (contiguous); per part the address
    (``uint64 [P]``) of its keys ``[cap, D]``, values (or ``None``), transposed centroids
    ``[D, nlist]`` (0: none, the part is scanned whole), list starts, fills, members and their
    keys in list order, and its
    ``nlist``, ``listed`` (rows below are in the lists, the rest scanned exactly) and ``n``.
    Returns ``(o [P, g, D], lse [P, g])`` (``None`` unless ``attend``), ``rows [P, k]``
    (``-1``: none), ``scanned [P]``, ``seconds [P, 2]`` (search, attention)."""
    parts, g, d = q.shape
    rows = np.empty((parts, k), np.int64)
    scanned = np.empty(parts, np.int64)
    seconds = np.empty((parts, 2), np.float64)
    o = np.empty((parts, g, d), np.float32) if attend else None
    lse = np.empty((parts, g), np.float32) if attend else None
    library().listed_step(parts, g, d, k, int(bf16), scan, scale, threads, MIN_SLICE, address(q),
                          address(keys), address(values) if attend else 0, address(cent_t),
                          address(offsets), address(fill), address(ids), address(list_keys),
                          address(nlist),
                          address(listed),
                          address(n), address(o), address(lse), address(rows),
                          address(scanned), address(seconds))
    return (o, lse), rows, scanned, seconds
