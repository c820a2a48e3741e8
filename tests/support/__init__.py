"""Test helpers that run inside real broker processes (importable via PYTHONPATH)."""
