"""Shared data fixtures: a tiny synthetic dataset written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

# 3 subjects (one each for train, val and test) x 10 classes x 1 clip = 30 clips of 40 frames.
# 40 frames is enough for 32-frame pose sampling without looping; 160x120 is the default size.
TINY_SETTINGS = {
    "seed": 0,
    "subjects": 3,
    "clips_per_class": 1,
    "frames": 40,
    "width": 160,
    "height": 120,
    "workers": 1,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny synthetic dataset in the mg-ray format (read-only: do not modify it;
    copy it first if a test needs to break something)."""
    from mg_ray.data import synth

    return synth.generate(tmp_path_factory.mktemp("data") / "tiny", **TINY_SETTINGS)
