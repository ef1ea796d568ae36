"""Stable locations for everything a run writes, and the check that they can be written.

`ray job submit --working-dir .` runs the entry point inside a temporary copy of the project, so
relative output paths would be lost with it. Every default output therefore lives under one home
folder: `$MG_RAY_HOME`, or `~/.mg-ray` when unset.

    <home>/datasets/synth      the embedded synthetic dataset
    <home>/mlflow.db           sqlite MLflow tracking + registry store
    <home>/mlartifacts/        MLflow artifact root for that store
    <home>/ray_results/        Ray Train / Tune storage (checkpoints, experiment state)
    <home>/optuna.db           Optuna study storage
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class StorageError(RuntimeError):
    """A folder or store that a run must write to cannot be created or written."""


def home() -> Path:
    return Path(os.environ.get("MG_RAY_HOME", "~/.mg-ray")).expanduser().resolve()


def synthetic_dataset() -> Path:
    return home() / "datasets" / "synth"


def mlflow_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (as in MLflow itself), else the sqlite store in home()."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    return home() / "mlartifacts"


def ray_storage() -> Path:
    return home() / "ray_results"


def optuna_storage_url() -> str:
    return f"sqlite:///{home() / 'optuna.db'}"


def sqlite_file(url: str) -> Path | None:
    """The file behind a `sqlite:///` URL, None for any other URL."""
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def ensure_writable(folder: Path, what: str) -> Path:
    """Create `folder` if needed and check that files can be written in it; raises StorageError
    naming `what`, the folder and the fix. Cheap: run it before Ray starts."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(
            f"{what}: cannot create folder {folder} ({err.strerror}). {_FIX}"
        ) from None
    try:  # a real write: permission bits say nothing for root, or on a read-only mount
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mg-ray-write-check-"):
            pass
    except OSError as err:
        raise StorageError(
            f"{what}: cannot write in folder {folder} ({err.strerror}). {_FIX}"
        ) from None
    return folder


def ensure_writable_file(path: Path, what: str) -> Path:
    """Like `ensure_writable` for a file that may not exist yet (a sqlite store)."""
    ensure_writable(path.parent, what)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StorageError(f"{what}: file {path} is not writable. {_FIX}")
    return path


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """One process (or thread) at a time on this host: an exclusive `flock` on `lock_file`,
    created if missing, released on leaving and by the process's death, even a SIGKILL."""
    # Read-only is enough for flock, and lets other users on the host open the same file.
    handle = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


_FIX = (
    "Set MG_RAY_HOME to a folder you can write (it holds the MLflow store, checkpoints and the "
    "Optuna study), or point MLFLOW_TRACKING_URI / --storage-path elsewhere."
)
