"""How functions, arguments and results are pickled, with arrays and handles taken out of the
pickle as persistent ids. Functions go by value (cloudpickle); data goes through the C pickler
when it can (several times faster), cloudpickle otherwise.

A persistent id is a small tuple the other side turns back into an object:
``("arr", segment, offset, nbytes, dtype, shape)``: array data in the arena (``"buf"``: in a
frame of the message), staged to the device;
``("host", <"arr" or "buf" id>)``: the same data, arriving as a host (numpy) array;
``("h", id, shape, dtype, nbytes)``: a device array that stays on the slice (RemoteArray);
``("obj", id, type name)``: any other object that stays on the slice (opaque handle);
``("parts", {key: pickle})``: a ``Parts`` mapping, each value pickled on its own;
``("pickle", pickle)``: an object pickled on its own, with other hooks (the executor's host
objects on sim slices).
Each side supplies the two hooks; this module holds the pickler plumbing.

Objects defined in ``__main__`` (a notebook's cells: IPython's user namespace is the
``__main__`` module) go by value, as cloudpickle ships them: the C pickler would write a
reference to ``__main__.name``, which means another module in the process that reads it.
"""

from __future__ import annotations

import functools
import io
import itertools
import operator
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


class _ByValue(pickle.PicklingError):
    """The object must be pickled by value: the C pickler hands it to cloudpickle."""


_DEFINITIONS = (types.FunctionType, type)


class _FastPickler(pickle.Pickler):
    """The C pickler with a persistent-id hook: most arguments and results are plain data.

    Functions and classes of ``__main__`` stop it (``_ByValue``): the C pickler would pickle
    them by reference, and ``__main__`` on the other side is another program."""

    def __init__(self, file: io.BytesIO, hook: Callable[[Any], PersistentId | None]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

        def persistent_id(obj: Any) -> PersistentId | None:
            if isinstance(obj, _DEFINITIONS) and getattr(obj, "__module__", None) == "__main__":
                raise _ByValue(obj)
            return hook(obj)

        self.persistent_id = persistent_id  # type: ignore[method-assign]


class _CloudPickler(cloudpickle.Pickler):
    """By-value pickling (lambdas, notebook classes), for what the C pickler refuses."""

    def __init__(self, file: io.BytesIO, hook: Callable[[Any], PersistentId | None]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._hook = hook

    def persistent_id(self, obj: Any) -> PersistentId | None:
        return self._hook(obj)


class _Unpickler(pickle.Unpickler):
    """``keep_classes``: a class that comes back by value and already exists in this process
    (cloudpickle's class tracking recognises a notebook class that went to the slice) is
    taken as it is. cloudpickle would otherwise set the pickled class dict on it, replacing
    the notebook's methods with copies whose globals are a snapshot, so that a later change to
    a notebook global would no longer reach them."""

    def __init__(
        self, file: io.BytesIO, load: Callable[[PersistentId], Any], keep_classes: bool = False
    ) -> None:
        super().__init__(file)
        self._load = load
        self._existing: set[int] = set()  # ids of tracked classes found, not made, here
        self._keep_classes = keep_classes and _TRACKED is not None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"malformed persistent id {pid!r}")
        return self._load(pid)

    def find_class(self, module: str, name: str) -> Any:
        # partials of module functions, not closures or bound methods: the unpickler keeps
        # what find_class returns in its memo, and a reference back to it would be a cycle
        # that keeps the result's handles alive until the garbage collector runs.
        if self._keep_classes and module == "cloudpickle.cloudpickle":
            if name in ("_make_skeleton_class", "_make_skeleton_enum"):
                make = getattr(cloudpickle.cloudpickle, name)
                return functools.partial(_make_tracked, make, self._existing)
            if name == "_class_setstate":
                return functools.partial(_setstate_unless_existing, self._existing)
        return super().find_class(module, name)


def _make_tracked(make: Callable[..., Any], existing: set[int], *args: Any) -> Any:
    """cloudpickle's class maker, noting a class it found already tracked in this process."""
    # (..., class_tracker_id, extra): the tracker id is the second to last argument
    known = _TRACKED.get(args[-2]) if _TRACKED is not None and args[-2] else None
    made = make(*args)
    if known is not None and made is known:
        existing.add(id(made))
    return made


def _setstate_unless_existing(existing: set[int], obj: Any, state: Any) -> Any:
    if id(obj) in existing:
        return obj
    return cloudpickle.cloudpickle._class_setstate(obj, state)


# cloudpickle's registry of classes pickled by value (private: without it, nothing is kept)
_TRACKED: Any = getattr(cloudpickle.cloudpickle, "_DYNAMIC_CLASS_TRACKER_BY_ID", None)


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
        # id(function) and id(code) -> (weak reference, entry): a lookup is a dict get and a
        # dereference, no Python call (WeakKeyDictionary.get is one, making a weak reference
        # each time); a hit is one whose reference still gives that very object.
        self._entries: dict[int, tuple[weakref.ref[Any], _Entry]] = {}
        self._by_code: dict[int, tuple[weakref.ref[Any], _Entry]] = {}
        self._lock = threading.Lock()

    def rehearse(self, fn: types.FunctionType) -> None:
        """``dumps(fn)``'s look-up and check of a cached entry, and nothing else (no pickle, no
        change): the client runs it while it waits, to keep that path warm (remote.py)."""
        hit = self._entries.get(id(fn))
        if hit is not None and hit[0]() is fn:
            hit[1].still_valid(fn)

    def dumps(self, fn: Any) -> bytes:
        if type(fn) is not types.FunctionType:
            return dumps_function(fn)
        code = fn.__code__
        with self._lock:
            hit = self._entries.get(id(fn))
            if hit is None or hit[0]() is not fn:
                hit = self._by_code.get(id(code))
                if hit is not None and hit[0]() is not code:
                    hit = None
        if hit is not None and hit[1].still_valid(fn):
            return hit[1].data
        data = dumps_function(fn)
        fresh = _entry_for(fn, data)
        with self._lock:
            if fresh is None:
                self._entries.pop(id(fn), None)
                self._by_code.pop(id(code), None)
            else:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                    self._by_code.clear()
                self._entries[id(fn)] = (weakref.ref(fn), fresh)
                if not fresh.by_reference:  # by name: only that very function resolves
                    self._by_code[id(code)] = (weakref.ref(code), fresh)
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
            and all(map(operator.is_, same, self.same))
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
# id(code) -> (weak reference, names), as FunctionPickles keeps its entries
_code_names: dict[int, tuple[weakref.ref[Any], tuple[str, ...]]] = {}
_CODE_NAMES_MAX = 4096


def _names(code: types.CodeType) -> tuple[str, ...]:
    """Every name the code (and code nested in it) refers to, and the base globals: a
    superset of the globals cloudpickle captures."""
    hit = _code_names.get(id(code))
    if hit is not None and hit[0]() is code:
        return hit[1]
    found = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.update(dict.fromkeys(_names(const)))
    found.update(dict.fromkeys(_BASE_GLOBALS))
    if len(_code_names) >= _CODE_NAMES_MAX:
        _code_names.clear()
    names = tuple(found)
    _code_names[id(code)] = (weakref.ref(code), names)
    return names


Snapshot = tuple[tuple[Any, ...], tuple[Any, ...], list[Any]]


def _snapshot(fn: types.FunctionType) -> Snapshot | None:
    """What a by-value pickle of ``fn`` is made of: (objects, values, captured values), or
    None if the function has attributes or annotations that are not strings."""
    annotations = fn.__annotations__
    if fn.__dict__ or (annotations and any(type(v) is not str for v in annotations.values())):
        return None
    glob = fn.__globals__
    names = _names(fn.__code__)
    captured = list(map(glob.get, names, itertools.repeat(_MISSING, len(names))))
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


def loads(data: bytes, load: Callable[[PersistentId], Any], *, keep_classes: bool = False) -> Any:
    """Unpickle with the persistent-id loader; ``keep_classes`` (the client, for results): see
    ``_Unpickler``."""
    return _Unpickler(io.BytesIO(data), load, keep_classes).load()


class Parts(dict):  # type: ignore[type-arg]
    """A mapping whose values travel each in a pickle of its own (``("parts", ...)``).

    One value that cannot be pickled (the executor keeps it on the slice as a handle) or
    unpickled (a class the kernel cannot import) then costs only itself: the receiver gets an
    ``Unloadable`` for that key and everything else. A ``%%gpufunc`` cell's outputs travel so.
    """


@dataclass(frozen=True)
class Unloadable:
    """A ``Parts`` value that could not be unpickled here, and why (one line)."""

    reason: str

    def __repr__(self) -> str:
        return f"<not loadable here: {self.reason}>"


def load_parts(
    pickles: dict[str, bytes], load: Callable[[PersistentId], Any], *, keep_classes: bool = False
) -> Parts:
    """The receiving end of ``("parts", pickles)``: each value unpickled on its own."""
    parts = Parts()
    for key, data in pickles.items():
        try:
            parts[key] = loads(data, load, keep_classes=keep_classes)
        except Exception as exc:
            parts[key] = Unloadable(f"{type(exc).__name__}: {exc}")
    return parts


def find_unpicklable(
    values: dict[str, Any], hook: Callable[[Any], PersistentId | None]
) -> tuple[str, str] | None:
    """The first of ``values`` that cannot be pickled at all (an open file, a lock, a socket),
    as (key, why). ``hook`` stands in for the persistent ids of arrays and handles, so that
    nothing is copied. Called after pickling failed, to name the culprit."""
    for key, value in values.items():
        try:
            _CloudPickler(io.BytesIO(), hook).dump(value)
        except Exception as exc:
            return key, str(exc) or type(exc).__name__
    return None
