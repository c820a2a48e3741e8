"""How functions, arguments and results are pickled, with arrays and handles taken out of the
pickle as persistent ids. Functions go by value (cloudpickle); data goes through the C pickler
when it can (several times faster), cloudpickle otherwise.

A persistent id is a small tuple the other side turns back into an object:
``("arr", segment, offset, nbytes, dtype, shape)``: array data in the arena;
``("h", id, shape, dtype, nbytes)``: a device array that stays on the slice (RemoteArray);
``("obj", id, type name)``: any other object that stays on the slice (opaque handle).
Each side supplies the two hooks; this module only holds the pickler plumbing.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

PersistentId = tuple[Any, ...]


class _FastPickler(pickle.Pickler):
    """The C pickler with a persistent-id hook: most arguments and results are plain data."""

    def __init__(self, file: io.BytesIO, hook: Callable[[Any], PersistentId | None]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.persistent_id = hook  # type: ignore[method-assign]


class _CloudPickler(cloudpickle.Pickler):
    """By-value pickling (lambdas, notebook classes), for what the C pickler refuses."""

    def __init__(self, file: io.BytesIO, hook: Callable[[Any], PersistentId | None]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._hook = hook

    def persistent_id(self, obj: Any) -> PersistentId | None:
        return self._hook(obj)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, load: Callable[[PersistentId], Any]) -> None:
        super().__init__(file)
        self._load = load

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"malformed persistent id {pid!r}")
        return self._load(pid)


def dumps(obj: Any, hook: Callable[[Any], PersistentId | None]) -> bytes:
    """Pickle data with the hook: the C pickler first, cloudpickle for what it cannot do.

    The hook may be called again for the same object on the fallback; hooks that allocate
    (arena regions) must tolerate that (the caller frees what it allocated either way)."""
    buffer = io.BytesIO()
    try:
        _FastPickler(buffer, hook).dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        buffer = io.BytesIO()
        _CloudPickler(buffer, hook).dump(obj)
    return buffer.getvalue()


def dumps_function(fn: Any) -> bytes:
    """A function by value (cloudpickle), pickled apart from its arguments so the executor can
    cache the unpickled function by the digest of these bytes."""
    return cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes, load: Callable[[PersistentId], Any]) -> Any:
    return _Unpickler(io.BytesIO(data), load).load()
