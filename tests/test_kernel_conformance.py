"""The Jupyter project's kernel conformance suite (jupyter_kernel_test) against ``mig-python3``:
once with ipykernel's own samples (a mig kernel is a Python kernel first), and once with the
same kinds of samples written as ``%%gpufunc`` cells, whose output must reach the frontend as
the same messages (stream, display_data, execute_result, error, clear_output).

Each class starts a kernel of its own on a broker of its own (sim), from a kernelspec in a
temporary Jupyter path; jupyter_kernel_test's ``setUpClass`` starts the kernel by name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mig_kernel.testing import BrokerProcess, all_free
from tests.support.notebooks import KERNEL

jkt = pytest.importorskip("jupyter_kernel_test", reason="jupyter_kernel_test is not installed")

REPO = Path(__file__).resolve().parents[1]


class _OnSimSlice(jkt.KernelTests):
    """Runs the suite's kernel against a sim broker of the class's own."""

    __test__ = False  # a base: pytest collects TestCase subclasses whatever their name
    kernel_name = KERNEL
    language_name = "python"
    file_extension = ".py"
    _saved: ClassVar[dict[str, str | None]] = {}
    _tmp: ClassVar[Any] = None
    _broker: ClassVar[BrokerProcess | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        import json

        from mig_kernel.jupyter.kernelspec import kernel_json

        cls._tmp = tempfile.TemporaryDirectory(prefix="mig-kernel-jkt-")
        root = Path(cls._tmp.name)
        cls._broker = BrokerProcess(
            root / "state",
            ["--backend", "sim", "--sim-layout", "H100-80GB:2x1g.10gb"],
            pythonpath=(str(REPO),),
        )
        cls._broker.start()
        cls._broker.wait_for(all_free)
        spec = root / "jupyter" / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps(kernel_json(None, "Python 3 (MIG slice)")))
        env = {"MIG_KERNEL_BROKER": str(cls._broker.connection_file)}
        env["JUPYTER_PATH"] = str(root / "jupyter")
        cls._saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            super().setUpClass()
        except BaseException:
            cls._cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._cleanup()

    @classmethod
    def _cleanup(cls) -> None:
        for name, value in cls._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if cls._broker is not None:
            cls._broker.stop()
        if cls._tmp is not None:
            cls._tmp.cleanup()


class TestIPyKernelSamples(_OnSimSlice):
    """ipykernel's samples (jupyter_kernel_test's test_ipykernel.py), unchanged."""

    __test__ = True

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples: ClassVar[list[str]] = [
        "1",
        "print('hello, world')",
        "def f(x):\n  return x*2\n\n\n",
    ]
    incomplete_code_samples: ClassVar[list[str]] = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples: ClassVar[list[str]] = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data: ClassVar[list[dict[str, str]]] = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


GPU = "%%gpufunc\n"


class TestGpuCellSamples(_OnSimSlice):
    """The same kinds of samples as GPU cells: what they print, display, clear, evaluate or
    raise on the slice must reach the frontend as the messages an ordinary cell sends. (The
    suite's completion, pager, inspection and history tests are about the kernel, not cells:
    the class above runs them.)"""

    __test__ = True

    code_hello_world = GPU + "print('hello, world')"
    code_stderr = GPU + "import sys; print('test', file=sys.stderr)"
    code_generate_error = GPU + "raise"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": GPU + "1+2+3", "result": "6"},
        {"code": GPU + "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": GPU + "int(xp.arange(4).sum())", "result": "6"},
    ]
    code_display_data: ClassVar[list[dict[str, str]]] = [
        {
            "code": GPU + "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": GPU
            + "from IPython.display import Math, display; display(Math('\\frac{1}{2}'))",
            "mime": "text/latex",
        },
        {
            "code": GPU + "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
            "mime": "image/png",
        },
    ]
    code_clear_output = GPU + "from IPython.display import clear_output; clear_output()"
