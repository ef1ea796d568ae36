"""Environment settings the project gives Ray and Tune, in one place, each with its reason.

Only documented variables (Ray's "Environment variables used by Ray Tune" page). A value the user
has set always wins: `apply_defaults()` only fills in what is unset, in the study driver's process,
before the `Tuner` is created (where Tune reads them).
"""

from __future__ import annotations

import os

DEFAULTS: dict[str, tuple[str, str]] = {
    "TUNE_GLOBAL_CHECKPOINT_S": (
        "0",
        "save the experiment state on every step (Tune's default: every 10+ s). A study driver "
        "killed between two saves forgets the trials that started since, and the resumed study "
        "runs their slots again; the state of a study of tens of trials is a few kB.",
    ),
}


def apply_defaults() -> None:
    for name, (value, _why) in DEFAULTS.items():
        os.environ.setdefault(name, value)
