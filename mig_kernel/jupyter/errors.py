"""How errors look in a notebook on a mig kernel: one to three lines unless they are the user's.

A GPU cell fails for two kinds of reasons. The user's own code on the slice raised: that is
shown as IPython shows an ordinary cell's error, a traceback of the user's lines only ("Traceback
on the slice", the cell named ``Cell In[7]`` with the line number the editor shows). Anything
else (the broker refused or is down, the cell ran past its ``--timeout``, the slice's memory cap,
an interrupt, a handle whose executor is gone, a cell that does not parse) is not about code the
user wrote, and a traceback through mig-kernel, IPython and ZeroMQ frames only hides the one
line that matters. Those are shown as what happened and, where it helps, what became of the
slice's data or what to do.

``%gpu debug on`` (or ``MIG_KERNEL_DEBUG=1`` in the kernel's environment) turns this off:
IPython's full traceback, with the remote one as a note, which a bug report needs.

The renderer is IPython's custom exception handler (``InteractiveShell.set_custom_exc``) for
every exception; it passes whatever is not mig-kernel's on to IPython's own ``showtraceback``,
so ordinary cells look exactly as before.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import Any

from IPython.core.error import UsageError

from ..wire.errors import InternalError, MigKernelError
from ..wire.reach import describe_failure

ENV_DEBUG = "MIG_KERNEL_DEBUG"
PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep  # .../mig_kernel/
CELLS_KEPT = 1000  # GPU cells whose names the renderer remembers
CAP_EXCEEDED = "slice memory cap exceeded"  # executor/runtime.py's message, GPU and sim alike
TRACEBACK_HEADER = "Traceback (most recent call last):"
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+)(?P<rest>.*)$')
_CHAINED = re.compile(
    r"^(During handling of the above exception, another exception occurred:|"
    r"The above exception was the direct cause of the following exception:)$"
)

_debug = os.environ.get(ENV_DEBUG, "").strip().lower() not in ("", "0", "no", "off", "false")
# GPU cell file name -> (the name IPython gives the cell, lines before the cell's body)
_cells: OrderedDict[str, tuple[str, int]] = OrderedDict()
_serial = 0


def debug() -> bool:
    return _debug


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def register_cell(execution_count: int, cell: str, source: str) -> str:
    """The file name a GPU cell's body is compiled under, remembered so its tracebacks and
    syntax errors can name the cell as the notebook does (``Cell In[7], line 3``: the
    ``%%gpufunc`` line is line 1 of the cell; IPython drops leading blank lines of the body).
    Unique per call, so the executor's line cache never mixes two cells."""
    global _serial
    _serial += 1
    filename = f"<gpufunc In[{execution_count}] #{_serial}>"
    offset = 1 + _leading_blank(cell) - _leading_blank(source)
    _cells[filename] = (f"Cell In[{execution_count}]", offset)
    while len(_cells) > CELLS_KEPT:
        _cells.popitem(last=False)
    return filename


def _leading_blank(text: str) -> int:
    count = 0
    for line in text.splitlines():
        if line.strip():
            break
        count += 1
    return count


# ------------------------------------------------------------------------------- rendering
def install(shell: Any) -> None:
    """Show mig-kernel's errors briefly in this shell (see the module docstring)."""
    shell.set_custom_exc((BaseException,), _handler)


def _handler(
    shell: Any,
    etype: type[BaseException],
    value: BaseException,
    tb: TracebackType | None,
    tb_offset: int | None = None,
) -> list[str]:
    """IPython's custom exception hook: our lines for mig-kernel's errors, IPython's own
    rendering (as if no hook were set) for everything else and under debug."""
    lines = None if _debug else render(value, tb)
    if lines is None:
        if _debug and hasattr(value, "_render_traceback_"):  # ours: the frames, not the brief
            stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
            shell._showtraceback(etype, value, stb)
        else:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
    else:
        # As showtraceback does, so that %debug and %tb still find the whole exception.
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
        if sys.version_info >= (3, 12):
            sys.last_exc = value
        shell._showtraceback(etype, value, lines)
    return []  # shown already; IPython ignores the handler's answer


def render(value: BaseException, tb: TracebackType | None) -> list[str] | None:
    """The lines to show for ``value``, or None when it is not mig-kernel's to show (an
    ordinary cell's error, a usage error, an internal error whose traceback a report needs)."""
    if isinstance(value, UsageError):
        return None
    if isinstance(value, SyntaxError) and value.filename in _cells:
        return _syntax_error(value)
    if hasattr(value, "remote_traceback"):  # it came from the executor
        return _remote_error(value, value.remote_traceback)
    if not _through_us(tb):
        return None
    brief = getattr(value, "_render_traceback_", None)  # the magics' own wording of a refusal
    if callable(brief):
        return list(brief())
    if isinstance(value, KeyboardInterrupt):
        return _interrupt(tb)
    if isinstance(value, InternalError):
        return None
    first = f"{type(value).__name__}: {_one_line(value)}"
    if isinstance(value, MigKernelError):
        return [first, *_hint(value)]
    # Raised inside mig-kernel, not by a refusal: an argument it cannot send, a local wait
    # that ran out. Where it came from is ours to know; the user gets the switch.
    return [first, "mig-kernel: `%gpu debug on` shows where this came from"]


def _one_line(value: BaseException) -> str:
    if isinstance(value, MigKernelError) or (isinstance(value, OSError) and value.strerror):
        return describe_failure(value)
    return " ".join(str(value).split())


def _through_us(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return True
        tb = tb.tb_next
    return False


def _cell_place(filename: str, line: int) -> str | None:
    cell = _cells.get(filename)
    return None if cell is None else f"{cell[0]}, line {line + cell[1]}"


def _syntax_error(value: SyntaxError) -> list[str]:
    """As IPython shows a syntax error of an ordinary cell: where, the line, the caret."""
    place = _cell_place(value.filename or "", value.lineno or 1)
    lines = traceback.format_exception_only(type(value), value)
    shown = []
    for chunk in lines:
        for line in chunk.rstrip("\n").split("\n"):
            match = _FRAME.match(line)
            shown.append(f"  {place}" if match and place else line)
    if place is not None:  # the exception's own text (evalue) names the cell too
        cell = _cells[value.filename or ""]
        value.filename, value.lineno = cell[0], (value.lineno or 1) + cell[1]
    return shown


def _remote_error(value: BaseException, remote: str) -> list[str]:
    """An exception raised on the slice: the user's frames of it, or one line when the user's
    code is not where it came from (a memory cap met while keeping a result, a timeout)."""
    frames, tail = _user_frames(remote)
    message = f"{type(value).__name__}: {_one_line(value)}"
    if str(value).startswith(CAP_EXCEEDED) or (
        isinstance(value, MemoryError) and CAP_EXCEEDED in remote
    ):
        own = [f for f in frames if "site-packages" not in f[0] and len(f) > 1]
        where = [f"at {own[-1][0].strip()}: {own[-1][1].strip()}"] if own else []
        return [
            f"MemoryError: {_last_line(tail) or _one_line(value)}",
            *where,
            "free device arrays you no longer need (del x), or lease a larger slice "
            "(%%gpufunc --profile P)",
        ][:3]
    if not frames:
        return [message, *_hint(value)]
    lines = ["Traceback on the slice (most recent call last):"]
    for frame in frames:
        lines.extend(frame)
    return [*lines, *tail]


def _last_line(tail: list[str]) -> str:
    for line in reversed(tail):
        if line.startswith(("MemoryError:", "cupy")) or CAP_EXCEEDED in line:
            return line.split(": ", 1)[1] if ": " in line else line
    return ""


def _user_frames(remote: str) -> tuple[list[list[str]], list[str]]:
    """The frames of the last exception in a traceback text that are not mig-kernel's (or
    those of the libraries it calls: cloudpickle, the importer), each as its lines with a GPU
    cell's file name replaced as the notebook names the cell; and the exception's own lines."""
    lines = remote.rstrip("\n").split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _CHAINED.match(line):
            start = i + 1
    lines = lines[start:]
    frames: list[list[str]] = []
    tail: list[str] = []
    current: list[str] | None = None
    keep = False
    for line in lines:
        match = _FRAME.match(line)
        if match:
            current = [line]
            path = match["file"]
            keep = not (
                path.startswith(PACKAGE_DIR)
                or f"{os.sep}cloudpickle{os.sep}" in path
                or path.startswith("<frozen ")
            )
            place = _cell_place(path, int(match["line"]))
            if place is not None:
                current = [f"  {place}{match['rest']}"]
            if keep:
                frames.append(current)
        elif line.startswith("    ") and current is not None and not tail:
            if keep:
                current.append(line)
        elif line.strip() and line != TRACEBACK_HEADER and not line.startswith("  File "):
            tail.append(line)
            current = None
    return frames, [t for t in tail if not t.startswith("Remote traceback")]


def _hint(value: BaseException) -> list[str]:
    """One line on what became of the slice's data, or what to do, where the message lacks it."""
    text = str(value)
    if isinstance(value, TimeoutError) and "timeout" in text and "lost" in text:
        return ["raise --timeout, or split the work into shorter calls"]
    if "belongs to an executor that is gone" in text:
        return ["compute it again in a GPU cell: handles do not outlive the executor they were on"]
    return []


def _interrupt(tb: TracebackType | None) -> list[str]:
    """An interrupt while mig-kernel waited: in the queue (the request is withdrawn) or for a
    call on the slice (stopped there; whether the slice's data survived)."""
    if _in_function(tb, "client.py", "acquire"):
        return ["KeyboardInterrupt: stopped waiting for a GPU slice; the request left the queue"]
    from ..current import holder

    session = holder().current()
    if session is None:
        return ["KeyboardInterrupt"]
    lost = session.executor_lost
    if lost:
        return ["KeyboardInterrupt", f"the slice's device data is lost: {lost}"]
    return [
        "KeyboardInterrupt: the GPU cell was stopped on the slice",
        f"the slice ({session.profile} on {session.slice['id']}) and its device data are kept",
    ]


def _in_function(tb: TracebackType | None, file: str, function: str) -> bool:
    """Whether the traceback passes through ``function`` of mig-kernel's ``file``."""
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename
        if code.co_name == function and path == os.path.join(PACKAGE_DIR, file):
            return True
        tb = tb.tb_next
    return False
