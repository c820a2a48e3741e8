"""What a notebook shows when a GPU cell fails (mig_kernel/jupyter/errors.py), in a real kernel.

The user's own code failing on the slice: a short traceback of their lines, named as the
notebook names the cell. Anything else (syntax, timeout, interrupt, a handle whose executor is
gone, the memory cap, a broker that is down): at most three lines, no mig-kernel, IPython or
ZeroMQ frames, unless ``%gpu debug on`` (or MIG_KERNEL_DEBUG=1) asks for them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mig_kernel.testing import BrokerProcess
from tests.support.kernels import CellResult, Kernel, Kernels

LAYOUT = "H100-80GB:2x1g.10gb"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
INTERNALS = ("mig_kernel", "site-packages", "zmq", "interactiveshell")


def shown(cell: CellResult) -> list[str]:
    """The traceback lines a notebook shows for the cell's error, without colours."""
    assert cell.error is not None, "the cell did not fail"
    return [ANSI.sub("", line) for text in cell.error["traceback"] for line in text.split("\n")]


def brief(cell: CellResult) -> list[str]:
    lines = shown(cell)
    assert 1 <= len(lines) <= 3, lines
    assert not any(word in line for line in lines for word in INTERNALS if word != "mig_kernel")
    assert not any("File " in line for line in lines), lines
    return lines


@pytest.fixture
def node(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[BrokerProcess, Kernels]]:
    broker = make_broker(layout=LAYOUT)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    kernels = Kernels(tmp_path / "kernels")
    yield broker, kernels
    kernels.stop_all()


def count_of(kernel: Kernel) -> int:
    return int(kernel.run("get_ipython().execution_count").results[0]) + 1


def test_errors_that_are_not_the_users_code_are_brief(node) -> None:
    _, kernels = node
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))

    # A syntax error points at the cell's line as IPython does for an ordinary cell.
    n = count_of(kernel)
    syntax = shown(kernel.run("%%gpufunc\na = 1\nx = (\n"))
    assert syntax[0] == f"  Cell In[{n}], line 3"
    assert syntax[1].strip() == "x = (" and syntax[-1] == "SyntaxError: '(' was never closed"
    assert len(syntax) == 4

    # The user's own error: their lines only, the cell named and numbered as in the editor.
    n = count_of(kernel)
    own = shown(kernel.run("%%gpufunc\na = 1\nb = a / 0\n"))
    assert own[0] == "Traceback on the slice (most recent call last):"
    assert own[1].startswith(f"  Cell In[{n}], line 3") and own[2].strip() == "b = a / 0"
    assert own[-1] == "ZeroDivisionError: division by zero"
    assert not any("mig_kernel" in line for line in own)

    # The memory cap, met while keeping a result: what happened and what to do.
    cap = brief(kernel.run("%%gpufunc\nbig = xp.zeros(12 * 2**30, dtype=xp.uint8)"))
    assert cap[0].startswith("MemoryError: slice memory cap exceeded: cap 9.75 GiB, in use")
    assert "del x" in cap[-1]
    # ... and met by a temporary, at the allocation: the cell's line is named.
    n = count_of(kernel)
    temp = brief(kernel.run("%%gpufunc\nx = 1\ns = float(xp.ones(2**31).sum())"))
    assert temp[0].endswith("this needs 16.00 GiB more")
    assert temp[1] == f"at Cell In[{n}], line 3, in <module>: s = float(xp.ones(2**31).sum())"

    # An interrupt: the call stops on the slice, the data stays.
    kernel.run("%%gpufunc\nkept = xp.arange(5)")
    msg_id = kernel.start_cell("%%gpufunc\nimport time\nfor i in range(600):\n    time.sleep(0.05)")
    time.sleep(1.0)
    kernel.interrupt()
    reply = kernel.wait_reply(msg_id)["content"]
    interrupt = [ANSI.sub("", line) for line in reply["traceback"]]
    assert interrupt == [
        "KeyboardInterrupt: the GPU cell was stopped on the slice",
        "the slice (1g.10gb on gpu0-s0) and its device data are kept",
    ] or interrupt[1].startswith("the slice (1g.10gb on gpu0-s1)")
    assert kernel.run("print(kept.get().sum())").stdout == "10\n"

    # A timeout: the executor is replaced, the data is lost, the next cell runs.
    timeout = brief(kernel.run("%%gpufunc --timeout 0.5\nimport time\ntime.sleep(5)"))
    assert timeout[0].startswith("TimeoutError: the call exceeded its timeout")
    assert "lost" in timeout[0] and "--timeout" in timeout[1]
    after = kernel.run("%%gpufunc\nprint('next')")
    assert after.stdout == "next\n", after

    # A handle of the executor that is gone.
    stale = brief(kernel.run("kept.get()"))
    assert stale[0].startswith("ExecutorLost: ") and "gone" in stale[0]

    # Under debug the frames are back (a bug report needs them); off again, brief again.
    assert "debug on" in kernel.run("%gpu debug on").stdout
    full = shown(kernel.run("kept.get()"))
    assert len(full) > 3 and any("mig_kernel" in line for line in full)
    kernel.run("%gpu debug off")
    assert len(brief(kernel.run("kept.get()"))) <= 3

    # An ordinary cell's error is IPython's own, as in any kernel.
    plain = shown(kernel.run("def f():\n    return 1 / 0\nf()"))
    assert plain[-1] == "ZeroDivisionError: division by zero" and len(plain) > 3


def test_a_broker_that_is_down_is_one_line(node) -> None:
    broker, kernels = node
    kernel = kernels.start(kernels.spec("mig-lazy", "1g.10gb", acquire="lazy"))
    broker.stop()
    down = brief(kernel.run("%%gpufunc\nx = 1"))
    assert down[0].startswith("BrokerUnavailable: ") and "mig-kernel broker" in down[0]
    decorated = brief(kernel.run("import mig_kernel\nmig_kernel.gpufunc(lambda: 1)()"))
    assert decorated[0].startswith("BrokerUnavailable: ")


def test_debug_from_the_environment(node) -> None:
    _, kernels = node
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"), env={"MIG_KERNEL_DEBUG": "1"})
    assert "debug on" in kernel.run("%gpu debug").stdout
    full = shown(kernel.run("%%gpufunc --timeout 0.5\nimport time\ntime.sleep(5)"))
    assert any("mig_kernel" in line for line in full)
