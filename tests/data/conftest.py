"""Data tests use the suite-wide `tiny_dataset` fixture (tests/conftest.py)."""

from tests.conftest import TINY_SETTINGS

__all__ = ["TINY_SETTINGS"]
