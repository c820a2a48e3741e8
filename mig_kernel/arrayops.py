"""What ``RemoteArray``'s operators run on the slice: one small function per kind of operation.

Each is shipped by reference (this module is importable on the executor) with its operands:
``RemoteArray`` operands arrive as the device arrays they name, NumPy operands are staged to
the device as arguments are. On a GPU slice the NumPy ufunc or function dispatches to CuPy
through CuPy's ``__array_ufunc__`` / ``__array_function__``, as it would in a CuPy program; on a
sim slice NumPy runs it on the slice's device arrays. A result that is a NumPy scalar becomes a
0-d device array, as CuPy gives it, so that ``h.max()`` is a RemoteArray on either kind.

``xp`` is not defined here: the executor puts the slice's array module into the globals of the
functions it runs (design.md: ``xp`` without import), which for these is this module's.
"""

from __future__ import annotations

from typing import Any

import numpy


def _device(value: Any) -> Any:
    if isinstance(value, numpy.generic):
        return xp.asarray(value)  # type: ignore[name-defined]  # noqa: F821 (the slice's)
    return value


def ufunc(func: numpy.ufunc, method: str, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func.method(*inputs, **kwargs)``: ``np.sqrt(h)``, ``h + 1``, ``np.add.reduce(h)``."""
    return _device(getattr(func, method)(*inputs, **kwargs))


def function(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A NumPy function with a RemoteArray among its arguments: ``np.mean(h)``."""
    return _device(func(*args, **kwargs))


def method(array: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``h.max(axis=0)``, ``h.reshape(2, -1)``, ``h.astype('f4')``."""
    return _device(getattr(array, name)(*args, **kwargs))


def attribute(array: Any, name: str) -> Any:
    """``h.T``, ``h.real``, ``h.imag``."""
    return _device(getattr(array, name))


def getitem(array: Any, key: Any) -> Any:
    return _device(array[key])


def setitem(array: Any, key: Any, value: Any) -> None:
    array[key] = value


def preview(array: Any, count: int) -> tuple[Any, Any]:
    """The first and last ``count`` values of the flattened array, as host arrays (the last
    is None when the first already holds them all): what ``repr`` shows."""
    flat = array.reshape(-1)
    if flat.size <= 2 * count:
        return _host(flat), None
    return _host(flat[:count]), _host(flat[-count:])


def _host(array: Any) -> numpy.ndarray:
    get = getattr(array, "get", None)
    return numpy.asarray(get() if callable(get) else array)
