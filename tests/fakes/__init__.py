"""Test doubles shared by the test modules (kept out of conftest.py, which is not ours)."""

from __future__ import annotations

from .fake_pynvml import (
    H100_80GB_HBM3_MEMORY_TOTAL,
    H100_80GB_PROFILES,
    FakeGpu,
    FakeNode,
    FakeNvml,
    FakeProcess,
    make_fake_pynvml,
    make_fake_pynvml_without_driver,
)

__all__ = [
    "H100_80GB_HBM3_MEMORY_TOTAL",
    "H100_80GB_PROFILES",
    "FakeGpu",
    "FakeNode",
    "FakeNvml",
    "FakeProcess",
    "make_fake_pynvml",
    "make_fake_pynvml_without_driver",
]
