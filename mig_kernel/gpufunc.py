"""``@mig_kernel.gpufunc``: a plain function that runs on the process's slice when called."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])


def _on_executor() -> bool:
    """True inside an executor: a decorated function called by another one (or by itself)
    runs there directly instead of asking for a slice from the slice."""
    return "mig_kernel.executor.dataplane" in sys.modules


@overload
def gpufunc(fn: F) -> F: ...
@overload
def gpufunc(
    fn: None = None,
    *,
    profile: str | None = None,
    to_host: bool = False,
    timeout: float | None = None,
) -> Callable[[F], F]: ...
def gpufunc(
    fn: Callable[..., Any] | None = None,
    *,
    profile: str | None = None,
    to_host: bool = False,
    timeout: float | None = None,
) -> Any:
    """Decorate a function so that calling it runs it on this process's slice (the kernel's
    in a notebook), with ``Session.run``'s semantics: array arguments go through shared
    memory, device results come back as RemoteArray (numpy with ``to_host=True``), ``xp`` is
    the slice's array module. The undecorated function is ``.local``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _on_executor():
                return func(*args, **kwargs)
            from .current import current_session

            session = current_session(profile)
            return session.run(func, *args, to_host=to_host, timeout=timeout, **kwargs)

        call.local = func  # type: ignore[attr-defined]
        return call

    return decorate(fn) if fn is not None else decorate
