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
import sys
import threading
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
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


EMPTY_ARGS = dumps(((), {}), lambda _obj: None)  # the arguments of a call without any


class FunctionPickles:
    """``dumps_function`` with a cache: a function called again is not pickled again while
    nothing its pickle depends on can have changed (cloudpickle took 18 us for an empty
    function and 93 us for one that uses numpy, on the 2-core CPU machine).

    Correctness first, so only two kinds are cached, and each use re-checks its entry:
    - functions cloudpickle pickles by reference (``module.qualname``, as the plain pickler
      writes them): reused while that name still resolves to the same function;
    - functions pickled by value whose every captured value is immutable (None, bool, int,
      float, complex, str, bytes, tuples of those) or an importable module: reused while the
      code, defaults, closure cells, referenced globals, names and doc are the same objects
      (identity, not equality: ``1 == 1.0``), and, where a module is captured, while the number
      of loaded modules is unchanged (cloudpickle records which submodules were imported).
    Anything else (a global list or dict, a helper function or class from the notebook,
    function attributes, non-string annotations) is pickled on every call, as before.

    By-value entries are also found through the function's code object, so a new function
    object made from the same code (``s.run(lambda a: a * 2, x)`` in a loop makes one per
    call) reuses the pickle when its snapshot matches: the check compares the same captured
    objects, so a lambda closing over another value is pickled afresh.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: weakref.WeakKeyDictionary[types.FunctionType, _Entry]
        self._entries = weakref.WeakKeyDictionary()
        self._by_code: weakref.WeakKeyDictionary[types.CodeType, _Entry]
        self._by_code = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def dumps(self, fn: Any) -> bytes:
        if type(fn) is not types.FunctionType:
            return dumps_function(fn)
        with self._lock:
            entry = self._entries.get(fn)
            if entry is None:
                entry = self._by_code.get(fn.__code__)
        if entry is not None and entry.still_valid(fn):
            return entry.data
        data = dumps_function(fn)
        fresh = _entry_for(fn, data)
        with self._lock:
            if fresh is None:
                self._entries.pop(fn, None)
                self._by_code.pop(fn.__code__, None)
            else:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                    self._by_code.clear()
                self._entries[fn] = fresh
                if not fresh.by_reference:  # by name: only that very function resolves
                    self._by_code[fn.__code__] = fresh
        return data


@dataclass(frozen=True)
class _Entry:
    data: bytes
    by_reference: bool
    same: tuple[Any, ...] = ()  # objects that must be identical next time
    equal: tuple[Any, ...] = ()  # values that must be equal next time
    module_count: int | None = None  # a module is captured: len(sys.modules) at the time

    def still_valid(self, fn: types.FunctionType) -> bool:
        if self.by_reference:
            return _resolves_to(fn)
        snapshot = _snapshot(fn)
        if snapshot is None:
            return False
        same, equal, _ = snapshot
        if self.module_count is not None and (
            len(sys.modules) != self.module_count or cloudpickle.list_registry_pickle_by_value()
        ):
            return False
        # The objects checked when the entry was made, unchanged: still immutable.
        return (
            equal == self.equal
            and len(same) == len(self.same)
            and all(a is b for a, b in zip(same, self.same, strict=True))
        )


def _entry_for(fn: types.FunctionType, data: bytes) -> _Entry | None:
    """A cache entry for ``fn`` pickled as ``data``, or None if it must not be reused."""
    if _resolves_to(fn):
        try:
            by_reference = data == pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            by_reference = False
        if by_reference:
            return _Entry(data, True)
    snapshot = _snapshot(fn)
    if snapshot is None:
        return None
    same, equal, captured = snapshot
    modules = False
    for value in captured:
        if type(value) is types.ModuleType:
            if sys.modules.get(value.__name__) is not value or _by_value_module(value.__name__):
                return None
            modules = True
        elif value is not _MISSING and value is not _EMPTY_CELL and not _immutable(value):
            return None
    return _Entry(data, False, same, equal, len(sys.modules) if modules else None)


def _resolves_to(fn: types.FunctionType) -> bool:
    """Whether ``fn`` is importable by its name (what pickling by reference relies on)."""
    module_name, qualname = fn.__module__, fn.__qualname__
    if not isinstance(module_name, str) or module_name == "__main__" or "<" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None or _by_value_module(module_name):
        return False
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def _by_value_module(name: str) -> bool:
    registered = cloudpickle.list_registry_pickle_by_value()
    return bool(registered) and any(name == r or name.startswith(r + ".") for r in registered)


_MISSING = object()  # a referenced global that does not exist (yet)
_EMPTY_CELL = object()
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")
_code_names: weakref.WeakKeyDictionary[types.CodeType, tuple[str, ...]]
_code_names = weakref.WeakKeyDictionary()


def _names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code (and code nested in it) refers to, and the base globals: a
    superset of the globals cloudpickle captures."""
    names = _code_names.get(code)
    if names is None:
        found = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(dict.fromkeys(_names(const)))
        found.update(dict.fromkeys(_BASE_GLOBALS))
        names = _code_names[code] = tuple(found)
    return names


Snapshot = tuple[tuple[Any, ...], tuple[Any, ...], list[Any]]


def _snapshot(fn: types.FunctionType) -> Snapshot | None:
    """What a by-value pickle of ``fn`` is made of: (objects, values, captured values), or
    None if the function has attributes or annotations that are not strings."""
    annotations = fn.__annotations__
    if fn.__dict__ or (annotations and any(type(v) is not str for v in annotations.values())):
        return None
    glob = fn.__globals__
    captured = [glob.get(name, _MISSING) for name in _names(fn.__code__)]
    if fn.__closure__:
        captured += map(_cell_value, fn.__closure__)
    if fn.__defaults__:
        captured += fn.__defaults__
    kwdefaults = fn.__kwdefaults__
    if kwdefaults:
        captured += kwdefaults.values()
    same = (
        fn.__code__,
        fn.__defaults__,
        kwdefaults,
        fn.__name__,
        fn.__qualname__,
        fn.__module__,
        fn.__doc__,
        *annotations.values(),
        *captured,
    )
    return same, (tuple(annotations), tuple(kwdefaults or ())), captured


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _immutable(value: Any, depth: int = 0) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is tuple and depth < 3:
        return all(_immutable(item, depth + 1) for item in value)
    return False


def loads(data: bytes, load: Callable[[PersistentId], Any]) -> Any:
    return _Unpickler(io.BytesIO(data), load).load()
