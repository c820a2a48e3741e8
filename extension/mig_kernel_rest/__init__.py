"""mig-kernel's jupyter_server extension: the REST API under ``<base_url>mig/api/`` that the
JupyterLab extension (labextension/) reads.

Its source is the top-level ``extension/`` folder of the checkout (design.md's layout, next to
``labextension/``); the wheel ships it as the package ``mig_kernel_rest`` (pyproject's
``packages``), and an editable install puts ``extension/`` on the path. ``mig_kernel`` names
this module in its ``_jupyter_server_extension_points``, so ``jpserver_extensions`` enables it
as ``mig_kernel``. Importing this package imports nothing of jupyter_server: the handlers load
with the extension.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "mig_kernel_rest"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import load

    load(serverapp)
