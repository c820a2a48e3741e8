"""How functions, arguments and results are pickled: cloudpickle, with arrays and handles taken
out of the pickle as persistent ids.

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


class _Pickler(cloudpickle.Pickler):
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
    buffer = io.BytesIO()
    _Pickler(buffer, hook).dump(obj)
    return buffer.getvalue()


def loads(data: bytes, load: Callable[[PersistentId], Any]) -> Any:
    return _Unpickler(io.BytesIO(data), load).load()
