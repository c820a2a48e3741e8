"""Rich output from the slice: IPython's display machinery on the executor, sent to the caller.

``display()``, ``clear_output()``, ``DisplayHandle.update()``, IPython.display objects, and
matplotlib's inline backend all publish through ``InteractiveShell.instance().display_pub``;
without a shell they print ``<IPython.core.display.HTML object>`` or an escape sequence. The
executor runs no IPython shell, so this module gives it a minimal one (``SliceShell``): IPython's
own ``DisplayFormatter`` makes the mimebundles, and its publisher hands each one to the data
plane, which sends it as a ``display`` message of the running call. The client replays it
through its own shell's publisher: in a notebook, real ``display_data``,
``update_display_data`` and ``clear_output`` messages, in order with the printed output.

Nothing here imports IPython: importing it costs about 0.1 s, which a call that never displays
should not pay. A finder on ``sys.meta_path`` waits for the first ``import IPython`` on the
executor (the user's ``from IPython.display import ...``, or matplotlib loading its inline
backend) and installs the shell as soon as that import has run. The shell is not a real
``InteractiveShell`` (no history, no magics, no ``__main__`` swap, no files written): its
``__init__`` sets up only what display, matplotlib_inline and tqdm look for.

matplotlib: ``MPLBACKEND`` is set to the inline backend (when matplotlib_inline is installed),
which configures itself on the shell on import and registers a ``post_execute`` hook;
``after_call`` fires it, so figures made by a call are shown (and closed) when it ends, before
its results are pickled (a closed figure does not re-register with pyplot where it is
unpickled). tqdm.auto picks its text bar on the slice (the shell's config names no
``IPKernelApp``): the slice has no comm to the notebook for a widget bar, and the text bar's
carriage returns redraw one line in the notebook.
"""

from __future__ import annotations

import base64
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

Publish = Callable[[str, dict[str, Any]], None]  # (kind, content) of the running call
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


class DisplayBridge:
    """Owns the executor's display set-up: the import finder, the shell once IPython is in,
    and the matplotlib backend setting."""

    def __init__(self, publish: Publish) -> None:
        self.publish = publish
        self.shell: Any = None
        self.closed = False
        self.set_backend = False
        if "MPLBACKEND" not in os.environ and importlib.util.find_spec("matplotlib_inline"):
            os.environ["MPLBACKEND"] = INLINE_BACKEND
            self.set_backend = True
        self.finder: _AfterImport | None = None
        if "IPython" in sys.modules:
            self._install()
        else:
            self.finder = _AfterImport("IPython", self._install)
            sys.meta_path.insert(0, self.finder)

    def _install(self) -> None:
        if self.shell is None and not self.closed:
            self.shell = _make_shell(self.publish)

    def close(self) -> None:
        """Undo what this bridge set in its process: the import finder, the shell as
        ``InteractiveShell.instance()``, the matplotlib backend. An executor process ends
        instead; a data plane made inside another process (the tests', a probe's) must not
        leave that process's ``display()`` publishing into a closed executor."""
        self.closed = True
        if self.finder is not None and self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        if self.shell is not None:  # (traitlets: only where the instance is still ours)
            type(self.shell).clear_instance()
            self.shell = None
        if self.set_backend and os.environ.get("MPLBACKEND") == INLINE_BACKEND:
            del os.environ["MPLBACKEND"]

    def after_call(self) -> None:
        """The end of a call, as the end of a cell is for IPython: ``post_execute`` hooks run
        (matplotlib_inline shows the figures the call made). Their errors go to stderr."""
        if self.shell is not None:
            try:
                self.shell.events.trigger("post_execute")
            except Exception:
                traceback.print_exc()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then`` once the module ``name`` has been imported (once, then it steps aside).

    It finds the module's spec through the other finders and wraps that loader's
    ``exec_module``: the module itself is imported exactly as it would have been."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        then = self.then

        def exec_then(module: Any) -> None:
            exec_module(module)
            try:
                then()
            except Exception:  # display stays as IPython has it without a shell
                traceback.print_exc()

        loader.exec_module = exec_then  # type: ignore[method-assign]
        return spec


def _plain(value: Any) -> Any:
    """A mimebundle or its metadata as msgpack can carry it: bytes as base64 (as Jupyter sends
    binary mimetypes), NumPy scalars as numbers, anything else unknown as its str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _plain(item())
        except Exception:  # an .item() that is not NumPy's: its str below serves
            pass
    return str(value)


def _make_shell(publish: Publish) -> Any:
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.events import EventManager, available_events
    from IPython.core.formatters import DisplayFormatter
    from IPython.core.interactiveshell import InteractiveShell

    class SlicePublisher(DisplayPublisher):
        """Sends each display to the caller of the running call."""

        def publish(  # type: ignore[override]
            self,
            data: dict[str, Any],
            metadata: dict[str, Any] | None = None,
            source: Any = None,
            *,
            transient: dict[str, Any] | None = None,
            update: bool = False,
            **kwargs: Any,
        ) -> None:
            publish(
                "update_display_data" if update else "display_data",
                {
                    "data": _plain(data),
                    "metadata": _plain(metadata or {}),
                    "transient": _plain(transient or {}),
                },
            )

        def clear_output(self, wait: bool = False) -> None:
            publish("clear_output", {"wait": bool(wait)})

    class SliceShell(InteractiveShell):
        """Just enough of an InteractiveShell for display, matplotlib_inline and tqdm."""

        def __init__(self) -> None:
            # Configurable's __init__ only: InteractiveShell's would swap __main__, open a
            # history database, install hooks and write a profile directory.
            super(InteractiveShell, self).__init__()
            self.configurables: list[Any] = []
            self.events = EventManager(self, available_events)
            self.display_formatter = DisplayFormatter(parent=self)
            self.display_pub = SlicePublisher(parent=self, shell=self)
            self.user_ns: dict[str, Any] = {}

        def showtraceback(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            traceback.print_exc()

    shell = SliceShell()
    for cls in (InteractiveShell, SliceShell):  # what InteractiveShell.instance() would set
        cls._instance = shell
    return shell


__all__ = ["DisplayBridge"]
