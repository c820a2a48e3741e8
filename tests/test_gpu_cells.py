"""GPU cells behave like ordinary cells: notebooks written the usual way, run with nbclient in a
mig-python3 kernel, with their heavy cells moved to ``%%gpufunc``.

Notebook objects go in as the notebook sees them (functions, classes, instances, partials,
closures), only what a cell assigns comes back (its imports stay on the slice), results keep
their type (pandas frames equal to the native ones, dataclasses, figures), rich output arrives
as Jupyter messages, and RemoteArray follows NumPy's rules as a CuPy array does.

Every test runs on a sim slice, and again on a GPU slice (CuPy) where there is a GPU: the
``node`` fixture is parametrized by backend, so the two runs share this module.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.testing import BrokerProcess, all_free
from tests.support.notebooks import run_cells, text_of
from tests.test_gpu import REASON

pytest.importorskip("pandas", reason="the test extra (pandas, matplotlib, tqdm) is not installed")
pytest.importorskip("matplotlib", reason="the test extra is not installed")
pytest.importorskip("tqdm", reason="the test extra is not installed")

REPO = Path(__file__).resolve().parents[1]
ON_GPU = pytest.param(
    "gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
)


@pytest.fixture(scope="module", params=["sim", ON_GPU])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A broker (sim: two 1g.10gb slices; gpu: two memory-capped shares of the GPU) for the
    whole module; yields its connection file."""
    state = tmp_path_factory.mktemp(request.param) / "state"
    if request.param == "sim":
        args = ["--backend", "sim", "--sim-layout", "H100-80GB:2x1g.10gb"]
    else:
        args = ["--backend", "nvml", "--share", "2"]
    broker = BrokerProcess(state, args, pythonpath=(str(REPO),))
    broker.start()
    try:
        broker.wait_for(all_free, timeout=180)
        yield broker.connection_file
    finally:
        broker.stop()


@pytest.fixture
def notebook(
    node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., dict[str, list[Any]]]:
    """Runs a notebook of cells (id -> source) on the node; returns id -> outputs."""
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(node))

    def run(cells: dict[str, str], fails: tuple[str, ...] = ()) -> dict[str, list[Any]]:
        return run_cells(cells, tmp_path, monkeypatch, fails=fails)

    return run


def only_error(outputs: list[Any]) -> Any:
    [error] = [o for o in outputs if o.output_type == "error"]
    return error


def test_notebook_objects_go_in_by_value_and_only_assignments_come_back(notebook) -> None:
    out = notebook(
        {
            "setup": """\
import dataclasses, functools, os, threading
import numpy as np
import mig_kernel

SCALE = 3.0

def normalize(a):
    a = np.asarray(a, dtype=float)
    return (a - a.mean()) / a.std()

square = lambda v: v * v

@dataclasses.dataclass
class Params:
    scale: float
    name: str = "p"

    def scaled(self, v):
        return v * self.scale * SCALE

class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self

def make_adder(k):
    def add(v):
        return v + k + SCALE
    return add

add2 = make_adder(2)
times = functools.partial(np.multiply, 10)

def on_device(a):  # xp: the slice's, as in a GPU cell
    return xp.asarray(a) * 2
p = Params(2.0)
x = np.arange(5.0)
stale = 1""",
            "gpu": """\
%%gpufunc
n = normalize(x)
sq = [square(v) for v in range(3)]
scaled = p.scaled(2.0)
p2 = dataclasses.replace(p, name="slice")
c = Counter().add(5)
added = add2(1.0)
t = times(x)
kind = type(x).__name__
doubled = on_device(x)
import json
import numpy as np
from functools import reduce
total = int(np.arange(4).sum())
del stale""",
            "check": """\
assert type(n) is np.ndarray and np.allclose(n, normalize(x))
assert sq == [0, 1, 4] and scaled == p.scaled(2.0) == 12.0
assert isinstance(p2, Params) and p2 == Params(2.0, "slice")
assert isinstance(c, Counter) and c.n == 5
assert added == 6.0 and np.array_equal(t, x * 10) and kind == "ndarray"
assert isinstance(doubled, mig_kernel.RemoteArray) and doubled.get().tolist() == [0, 2, 4, 6, 8]
assert total == 6 and "stale" not in dir()
assert "json" not in dir() and "reduce" not in dir()  # imports stay on the slice
assert np.arange(3).tolist() == [0, 1, 2] and np.__name__ == "numpy"
SCALE = 4.0
assert p.scaled(1.0) == 8.0  # the notebook's class still reads the notebook's globals
print("inputs OK")""",
            "locks": "fh = open(os.devnull, 'w')\nlock = threading.Lock()",
            "file": "%%gpufunc\nfh.write('x')",
            "lock": "%%gpufunc\nwith lock:\n    pass",
        },
        fails=("file", "lock"),
    )
    assert text_of(out["check"]) == "inputs OK\n"
    for cell, name, what in (("file", "fh", "TextIOWrapper"), ("lock", "lock", "lock")):
        error = only_error(out[cell])
        [line] = error["traceback"]
        assert f"reads {name!r} (" in line and "which cannot be sent to the slice" in line, line
        assert what in line and "create them inside the GPU cell" in line


def test_results_keep_their_type(notebook) -> None:
    out = notebook(
        {
            "setup": """\
import dataclasses
import numpy as np
import pandas as pd
import mig_kernel

def make_frame(n):
    index = pd.Index([f"row{i}" for i in range(n)], name="key")
    return pd.DataFrame(
        {
            "v": np.arange(n, dtype=float) * 1.5,
            "cat": pd.Categorical(["a", "b", "a", "c", "b"][:n]),
            "when": pd.date_range("2024-01-01", periods=n, freq="h"),
            "label": [f"L{i}" for i in range(n)],
        },
        index=index,
    )

@dataclasses.dataclass
class Box:
    data: object
    note: str""",
            "gpu": """\
%%gpufunc
df = make_frame(5)
s = df["v"] * 2
g = df.groupby("cat", observed=True)["v"].sum()
host = np.linspace(0, 1, 4)
dev = xp.arange(4.0) * 2
stats = [float(xp.asarray(host).sum()), "ok"]
box = Box(dev, "device inside")
from_dev = pd.Series(xp.asnumpy(dev))
df""",
            "check": """\
native = make_frame(5)
pd.testing.assert_frame_equal(df, native)
pd.testing.assert_series_equal(s, native["v"] * 2)
pd.testing.assert_series_equal(g, native.groupby("cat", observed=True)["v"].sum())
assert type(host) is np.ndarray and np.array_equal(host, np.linspace(0, 1, 4))
assert isinstance(dev, mig_kernel.RemoteArray) and dev.get().tolist() == [0, 2, 4, 6]
assert abs(stats[0] - 2.0) < 1e-12 and stats[1] == "ok", stats  # CuPy sums in another order
assert isinstance(box, Box) and isinstance(box.data, mig_kernel.RemoteArray)
pd.testing.assert_series_equal(from_dev, pd.Series(np.arange(4.0) * 2))
print("results OK")""",
            "to-host": """\
%%gpufunc --to-host
box2 = Box(xp.arange(3.0), "to host")
nested = {"a": [xp.ones(2)], "b": (xp.zeros(1), 5)}""",
            "check-to-host": """\
assert type(box2.data) is np.ndarray and box2.data.tolist() == [0.0, 1.0, 2.0]
assert type(nested["a"][0]) is np.ndarray and nested["b"][1] == 5
print("to-host OK")""",
        }
    )
    [result] = [o for o in out["gpu"] if o.output_type == "execute_result"]
    assert "text/html" in result.data and "row4" in result.data["text/html"]
    assert text_of(out["check"]) == "results OK\n"
    assert text_of(out["check-to-host"]) == "to-host OK\n"


def test_rich_output_arrives_as_jupyter_messages(notebook) -> None:
    out = notebook(
        {
            "display": """\
%%gpufunc
from IPython.display import HTML, Math, display
print("before")
display(HTML("<b>bold</b>"))
display(Math(r"\\frac{1}{2}"))
handle = display("first", display_id=True)
handle.update("second")
print("after")""",
            "clear": """\
%%gpufunc
from IPython.display import clear_output
print("gone")
clear_output()
print("kept")""",
            "plot": """\
%%gpufunc
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot([1, 2, 3], [1, 4, 9])
ax.set_title("on the slice")""",
            "plot-check": "print(type(fig).__name__, fig.axes[0].get_title())",
            "progress": """\
%%gpufunc
from tqdm.auto import tqdm
total = 0
for i in tqdm(range(50), mininterval=0):
    total += i""",
            "value": "%%gpufunc\nimport pandas as pd\npd.DataFrame({'a': [1, 2]})",
        }
    )
    shown = out["display"]
    kinds = [(o.output_type, o.get("name") or sorted(o.get("data", {}))) for o in shown]
    assert kinds == [
        ("stream", "stdout"),
        ("display_data", ["text/html", "text/plain"]),
        ("display_data", ["text/latex", "text/plain"]),
        ("display_data", ["text/plain"]),
        ("stream", "stdout"),
    ], kinds
    assert shown[1].data["text/html"] == "<b>bold</b>"
    assert shown[3].data["text/plain"] == "'second'"  # updated in place by its display id
    assert text_of(out["clear"]) == "kept\n"

    [image] = [o for o in out["plot"] if o.output_type == "display_data"]
    assert base64.b64decode(image.data["image/png"]).startswith(b"\x89PNG")
    assert text_of(out["plot-check"]) == "Figure on the slice\n"  # shown once, not again here

    progress = "".join(o.text for o in out["progress"] if o.output_type == "stream")
    assert "50/50" in progress and "\r" in progress
    [value] = [o for o in out["value"] if o.output_type == "execute_result"]
    assert "<table" in value.data["text/html"]


def test_remote_arrays_follow_numpys_rules(notebook) -> None:
    out = notebook(
        {
            "setup": "import numpy as np\nimport mig_kernel\na = np.arange(12.0).reshape(3, 4) - 5",
            "gpu": "%%gpufunc\nh = xp.asarray(a)",
            "asarray": "np.asarray(h)",
            "ops": """\
checks = {
    "add": ((h + 1).get(), a + 1),
    "radd": ((1 + h).get(), 1 + a),
    "with numpy": ((h * a).get(), a * a),
    "neg": ((-h).get(), -a),
    "pow": ((h**2).get(), a**2),
    "compare": ((h > 0).get(), a > 0),
    "equal": ((h == 3).get(), a == 3),
    "slice": (h[:2].get(), a[:2]),
    "fancy": (h[:, [0, 2]].get(), a[:, [0, 2]]),
    "mask": (h[h > 0].get(), a[a > 0]),
    "max": (h.max().get(), a.max()),
    "sum axis": (h.sum(axis=0).get(), a.sum(axis=0)),
    "np.mean": (np.mean(h).get(), np.mean(a)),
    "ufunc": (np.sqrt(abs(h)).get(), np.sqrt(abs(a))),
    "T": (h.T.get(), a.T),
    "reshape": (h.reshape(4, 3).get(), a.reshape(4, 3)),
    "chain": (((h - h.mean()) / h.std()).get(), (a - a.mean()) / a.std()),
    "concatenate": (np.concatenate([h, h]).get(), np.concatenate([a, a])),
}
for name, (got, want) in checks.items():
    assert type(got) is np.ndarray, name
    np.testing.assert_allclose(got, want, err_msg=name)
assert isinstance(h + 1, mig_kernel.RemoteArray) and isinstance(h.max(), mig_kernel.RemoteArray)
assert float(h.max()) == 6.0 and len(h) == 3 and h.shape == (3, 4)
print("remote arrays OK")""",
            "repr": "h",
        },
        fails=("asarray",),
    )
    error = only_error(out["asarray"])
    assert error["ename"] == "TypeError" and ".get()" in error["evalue"]
    assert text_of(out["ops"]) == "remote arrays OK\n"
    [shown] = [o.data["text/plain"] for o in out["repr"] if o.output_type == "execute_result"]
    assert shown.startswith("RemoteArray(shape=(3, 4), dtype=float64, slice=")
    assert shown.endswith(": [-5., -4., -3., ..., 4., 5., 6.])"), shown
