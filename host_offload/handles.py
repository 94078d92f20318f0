"""A registry of host objects by int32 handle (see the package docstring)."""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any, Iterator

_objects: dict[int, Any] = {}
_next = itertools.count(1)
_lock = threading.Lock()


def register(obj: Any) -> int:
    """Keep ``obj`` until :func:`release`; returns its handle (a positive int32)."""
    with _lock:
        handle = next(_next) % (2**31 - 1) or next(_next)
        _objects[handle] = obj
    return handle


def lookup(handle) -> Any:
    """The object registered as ``handle`` (an int or a 0-d array, as a callback receives it)."""
    try:
        return _objects[int(handle)]
    except KeyError:
        raise KeyError(f"no host object registered as handle {int(handle)} (released?)") from None


def release(handle: int) -> None:
    with _lock:
        _objects.pop(int(handle), None)


@contextlib.contextmanager
def registered(obj: Any) -> Iterator[int]:
    """``with registered(obj) as handle:`` the object is reachable by ``handle`` inside."""
    handle = register(obj)
    try:
        yield handle
    finally:
        release(handle)
