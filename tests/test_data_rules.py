"""What crosses between the caller and a slice, and as what (sim slices; the notebook-level view
of the same rules is tests/test_gpu_cells.py, on sim and on a GPU):

- device arrays (a sim slice's ``SimDeviceArray``, made by ``xp`` or staged) come back as
  RemoteArray, host objects (NumPy arrays made with NumPy, pandas objects, dataclasses) as
  themselves; pandas never holds a handle;
- argument arrays go to the device through lists, tuples and dicts, and stay host arrays inside
  any other object;
- RemoteArray follows CuPy's conventions; ``to_host`` reaches arrays inside any object;
- ``Parts`` travel value by value; rich output without a shell prints its text.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading

import numpy as np
import pytest

import mig_kernel
from mig_kernel import RemoteArray, RemoteObject
from mig_kernel.wire import payload

pd = pytest.importorskip("pandas", reason="pandas (test extra) is not installed")


@dataclasses.dataclass
class Holder:
    data: object
    note: str = ""


@pytest.fixture
def session(make_broker):
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    s = mig_kernel.connect(broker=broker.connection_file)
    yield s
    s.close()


def test_device_arrays_are_handles_and_host_objects_come_back(session) -> None:
    def compute():
        import pandas as pd

        dev = xp.arange(4.0)  # noqa: F821
        frame = pd.DataFrame({"d": dev, "h": np.arange(4)})
        frame["e"] = dev * 2  # pandas keeps what it is given: a sim device array
        return {
            "dev": dev,
            "host": np.arange(3),
            "frame": frame,
            "series": pd.Series(dev),
            "kinds": (type(dev).__name__, type(np.asarray(dev)).__name__),
        }

    out = session.run(compute)
    assert isinstance(out["dev"], RemoteArray)
    assert type(out["host"]) is np.ndarray
    expected = pd.DataFrame({"d": np.arange(4.0), "h": np.arange(4), "e": np.arange(4.0) * 2})
    pd.testing.assert_frame_equal(out["frame"], expected)
    assert all(type(block.values) is np.ndarray for block in out["frame"]._mgr.blocks)
    pd.testing.assert_series_equal(out["series"], pd.Series(np.arange(4.0)))
    assert out["kinds"] == ("SimDeviceArray", "ndarray")


def test_argument_arrays_go_to_the_device_through_containers_only(session) -> None:
    def kinds(a, nested, holder, frame):
        return (
            type(a).__name__,
            type(nested["x"][0]).__name__,
            type(holder.data).__name__,
            type(frame["v"].to_numpy()).__name__,
        )

    frame = pd.DataFrame({"v": np.arange(3.0)})
    got = session.run(kinds, np.ones(3), {"x": [np.ones(3)]}, Holder(np.ones(3)), frame)
    assert got == ("SimDeviceArray", "SimDeviceArray", "ndarray", "ndarray")


def test_remote_array_follows_cupys_conventions(session) -> None:
    h = session.run(lambda: xp.arange(6.0).reshape(2, 3))  # noqa: F821
    a = np.arange(6.0).reshape(2, 3)
    with pytest.raises(TypeError, match=r"\.get\(\)"):
        np.asarray(h)
    with pytest.raises(AttributeError, match=r"call \.get"):
        h.no_such_method  # noqa: B018
    np.testing.assert_array_equal((h * 2 + a).get(), a * 2 + a)
    np.testing.assert_array_equal(np.add.reduce(h, axis=1).get(), a.sum(axis=1))
    total = h.sum()
    assert isinstance(total, RemoteArray) and total.shape == () and float(total) == 15.0
    assert int(h[1, 2]) == 5 and bool(h[0, 0] == 0)
    assert [row.get().tolist() for row in h] == a.tolist()
    h[0] = -1  # in place, on the slice
    assert h.get()[0].tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="ambiguous"):
        bool(h)
    assert repr(h).startswith("RemoteArray(shape=(2, 3), dtype=float64, slice=gpu0-s")
    assert " ".join(repr(h).split()).endswith(": [-1., -1., -1., 3., 4., 5.])")


def test_to_host_reaches_arrays_inside_any_object(session) -> None:
    def make():
        a = xp.ones(2)  # noqa: F821
        return Holder(a, "in a dataclass"), [a], (lambda: 1)

    holder, items, func = session.run(make, to_host=True)
    assert type(holder.data) is np.ndarray and holder.data.tolist() == [1.0, 1.0]
    assert type(items[0]) is np.ndarray and items[0] is holder.data  # one array, one copy
    assert func() == 1


def test_parts_travel_value_by_value(session) -> None:
    def make():
        gen = (i for i in range(3))
        return payload.Parts({"gen": gen, "n": 1, "a": xp.zeros(2)})  # noqa: F821

    parts = session.run(make)
    assert type(parts) is payload.Parts and parts["n"] == 1
    assert isinstance(parts["gen"], RemoteObject)  # cannot leave the slice: a handle of its own
    assert isinstance(parts["a"], RemoteArray)
    assert session.run(lambda g: list(g), parts["gen"]) == [0, 1, 2]


def test_display_without_a_shell_prints_its_text(session, capsys) -> None:
    def show():
        from IPython.display import HTML, display

        display(HTML("<b>x</b>"))
        print("after")

    session.run(show)
    assert capsys.readouterr().out == "<IPython.core.display.HTML object>\nafter\n"


def test_a_data_plane_closed_in_this_process_leaves_display_as_it_was(capsys) -> None:
    """An executor's data plane made inside another process (a test's, a probe's) installs
    its display shell there; closed, it must give ``display()`` back, or the process's later
    displays go to a closed executor and are lost (the test above failed so after one)."""
    import os
    import sys

    import zmq
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import HTML, display

    from mig_kernel.executor.dataplane import DataPlane
    from mig_kernel.executor.runtime import Runtime

    before = (InteractiveShell.initialized(), os.environ.get("MPLBACKEND"), sys.stdout)
    context = zmq.Context()
    plane = DataPlane(Runtime(name="numpy", xp=np, warm_seconds=0.0), context, None, print)
    assert InteractiveShell.instance() is plane.display.shell  # the executor's, while it lives
    sys.stdout = plane.stdout  # as a call leaves it (dataplane.py ``_compute``)
    plane.close()
    context.term()
    assert (InteractiveShell.initialized(), os.environ.get("MPLBACKEND"), sys.stdout) == before
    display(HTML("<b>x</b>"))  # no shell here: its text, printed
    assert capsys.readouterr().out == "<IPython.core.display.HTML object>\n"


# --- payload, without an executor ------------------------------------------------------------


def _main_class() -> type:
    """A class as a notebook cell defines it: in ``__main__``, by value only."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "    def double(self):\n"
        "        return 2 * self.x\n",
        namespace,
    )
    return namespace["Point"]  # type: ignore[return-value]


def test_main_objects_are_pickled_by_value() -> None:
    point = _main_class()
    data = payload.dumps((point(3), point), lambda _o: None)
    assert b"__main__\x94\x8c\x05Point" not in data  # not a reference to __main__.Point
    copy, cls = payload.loads(data, lambda _p: None)
    assert cls is point and copy.double() == 6  # cloudpickle's class tracking: the same class


def test_a_class_coming_back_keeps_its_methods() -> None:
    point = _main_class()
    method = point.double
    data = payload.dumps(point(2), lambda _o: None)
    assert payload.loads(data, lambda _p: None, keep_classes=True).double() == 4
    assert point.double is method  # not replaced by a copy with snapshot globals
    payload.loads(data, lambda _p: None)
    assert point.double is not method  # cloudpickle's own behaviour, which the kernel avoids


def test_parts_that_cannot_load_are_reported_alone() -> None:
    good = pickle.dumps([1, 2])
    bad = pickle.dumps(Holder(1)).replace(b"tests.test_data_rules", b"tests.no_such_modules")
    parts = payload.load_parts({"good": good, "bad": bad}, lambda _p: None)
    assert parts["good"] == [1, 2]
    assert isinstance(parts["bad"], payload.Unloadable) and "no_such_modules" in parts["bad"].reason


def test_find_unpicklable_names_the_value_and_why() -> None:
    values = {"fine": [1], "lock": threading.Lock(), "later": 2}
    name, why = payload.find_unpicklable(values, lambda _o: None)  # type: ignore[misc]
    assert name == "lock" and "lock" in why
    arrays = {"a": np.ones(3)}
    assert payload.find_unpicklable(arrays, lambda o: ("x",) if o is arrays["a"] else None) is None
