"""The array module of a simulated slice: NumPy, with device arrays told apart from host ones.

On a GPU slice the line between device and host data is the type: ``cupy.ndarray`` is device
memory, ``numpy.ndarray`` host memory, and only the former stays on the slice as a
``RemoteArray``. On a sim slice both would be NumPy arrays, and then every array a cell made
(with NumPy, inside a pandas frame, in a matplotlib figure) would become a handle. So a sim
slice draws the same line with a type of its own:

- ``SimDeviceArray`` (an ``ndarray`` subclass) is a sim slice's device array: what ``xp``
  makes (``xp.asarray``, ``xp.zeros``, ``xp.fft.fft``, ...), what the executor staged to the
  device (arguments, restored spills), and what any NumPy operation makes from one (device in,
  device out, as with CuPy; reductions give 0-d device arrays, as CuPy's do);
- any other NumPy array is host data, as ``numpy.ndarray`` is next to CuPy.

``SimDeviceArray`` pickles as a plain ``ndarray``: where one is pickled by value (inside a host
library's object, see the data plane) it arrives as host data.
"""

from __future__ import annotations

import functools
import importlib
import operator
import types
from collections.abc import Callable
from typing import Any

import numpy

_CONTAINERS = (tuple, list)


class SimDeviceArray(numpy.ndarray):
    """A device array of a simulated slice (NumPy memory standing in for the GPU's)."""

    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> numpy.ndarray:
        """A host copy, as ``cupy.ndarray.get`` gives (``stream`` is accepted and ignored)."""
        if out is not None:
            numpy.copyto(out, self)
            return out
        return numpy.array(self, order=order, subok=False)

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        # A reduction gives a 0-d device array, as in CuPy, rather than a NumPy scalar.
        return super().__array_wrap__(array, context, False)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        # NumPy's own implementation, then device in -> device out (np.fft.fft(a), np.mean(a)).
        return to_device(super().__array_function__(func, types_, args, kwargs))

    def __reduce__(self) -> Any:
        return numpy.asarray(self).__reduce__()


def to_device(value: Any) -> Any:
    """Arrays in ``value`` (itself, or the items of a tuple, list or named tuple of results)
    as device arrays, without copying; NumPy scalars as 0-d device arrays."""
    kind = type(value)
    if kind is numpy.ndarray:
        return value.view(SimDeviceArray)
    if isinstance(value, numpy.generic):
        return numpy.asarray(value).view(SimDeviceArray)
    if isinstance(value, _CONTAINERS) and any(isinstance(v, numpy.ndarray) for v in value):
        items = [to_device(v) for v in value]
        if hasattr(value, "_fields"):  # named tuple (SVDResult, ...)
            return kind(*items)
        return kind(items)
    return value


class _DeviceObject:
    """An object made by ``xp`` whose methods make arrays (a random ``Generator``): its
    callables return device arrays; pickled, it is the NumPy object it wraps."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_obj":  # pickle and copy probe these
            raise AttributeError(name)
        attr = getattr(self._obj, name)
        return _device_function(attr) if callable(attr) else attr

    def __repr__(self) -> str:
        return repr(self._obj)

    def __reduce__(self) -> Any:
        return operator.itemgetter(0), ((self._obj,),)  # the NumPy object where it arrives


class _DeviceUfunc(_DeviceObject):
    """A NumPy ufunc whose results (and those of ``reduce``, ``outer``...) are device arrays."""

    def __init__(self, ufunc: numpy.ufunc) -> None:
        super().__init__(ufunc)
        functools.update_wrapper(self, ufunc)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return to_device(self._obj(*args, **kwargs))


_RANDOM_STATES = (numpy.random.Generator, numpy.random.RandomState)


def _device_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if isinstance(result, _RANDOM_STATES):
            return _DeviceObject(result)
        return to_device(result)

    return call


class SimXP(types.ModuleType):
    """``xp`` on a sim slice: NumPy's namespace (and its submodules), whose functions return
    device arrays; plus what CuPy code expects (``asnumpy``, ``get_array_module``, arrays with
    ``.get()``). ``xp.ndarray`` is ``SimDeviceArray``, so ``isinstance(a, xp.ndarray)`` asks
    "is this device data", as it does with CuPy. ``__name__`` stays ``numpy``."""

    def __init__(self, module: types.ModuleType = numpy, pool_empty: Any = None) -> None:
        super().__init__(module.__name__, module.__doc__)
        self._module = module
        self._pool_empty = pool_empty or numpy.empty  # where device copies are allocated
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return getattr(self._module, name)
        if name in self._cache:
            return self._cache[name]
        attr = getattr(self._module, name)
        if isinstance(attr, types.ModuleType) and attr.__name__.startswith("numpy."):
            made: Any = SimXP(attr, self._pool_empty)
        elif isinstance(attr, numpy.ufunc):
            made = _DeviceUfunc(attr)
        elif callable(attr) and not isinstance(attr, type):  # functions of any kind, not types
            made = _device_function(attr)
        else:
            made = attr
        self._cache[name] = made
        return made

    def __dir__(self) -> list[str]:
        return dir(self._module)

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (simulated slice)>"

    def __reduce__(self) -> Any:
        # Wherever a function defined on the slice carries ``xp`` along, it is NumPy there.
        return importlib.import_module, (self.__name__,)

    # -- what differs from NumPy ------------------------------------------------------------
    ndarray = SimDeviceArray

    def asarray(self, a: Any, dtype: Any = None, order: Any = None, **kwargs: Any) -> Any:
        """Device data as it is; anything else copied to the device (as ``cupy.asarray``)."""
        if isinstance(a, SimDeviceArray) and (dtype is None or numpy.dtype(dtype) == a.dtype):
            return a
        return self.array(a, dtype=dtype, order=order or "K", **kwargs)

    def array(
        self, a: Any, dtype: Any = None, copy: Any = True, order: Any = "K", **kw: Any
    ) -> Any:
        if isinstance(a, SimDeviceArray) and copy is False:
            return a
        host = numpy.asarray(a, dtype=dtype, order=None if order == "K" else order)
        device = self._pool_empty(host.shape, host.dtype)
        numpy.copyto(device, host)
        return device if isinstance(device, SimDeviceArray) else device.view(SimDeviceArray)

    def ascontiguousarray(self, a: Any, dtype: Any = None, **kwargs: Any) -> Any:
        if isinstance(a, SimDeviceArray) and a.flags.c_contiguous and dtype is None:
            return a
        return self.array(numpy.ascontiguousarray(a, dtype=dtype), **kwargs)

    @staticmethod
    def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> numpy.ndarray:
        """A host copy (``cupy.asnumpy``)."""
        if isinstance(a, SimDeviceArray):
            return a.get(order=order, out=out)
        return numpy.asarray(a, order=order)

    def get_array_module(self, *args: Any) -> Any:
        """``xp`` if any argument is device data, else ``numpy`` (``cupy.get_array_module``)."""
        return self if any(isinstance(a, SimDeviceArray) for a in args) else numpy


__all__ = ["SimDeviceArray", "SimXP", "to_device"]
