"""One driver per study: a lock file beside the study's Tune experiment.

Two drivers of one study (the same name and storage) would run the same trials into the same
Tune experiment, Optuna study and MLflow runs. The first to start holds
`<storage>/<name>.study-driver.json` (`.pipeline-driver.json` for a pipeline: host, pid, the
process's start time, since when); a second one
is refused at once with a one-line `StudyLocked` naming the first, before it touches any store.
The file is removed on every ending the process lives through; a SIGKILL leaves it behind, and
the next driver on the same host takes over a lock whose process is gone (the pid no longer
runs, or runs a process started later). A lock held from another host is never taken over:
that host's driver may live (the message says how to clear it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil


class StudyLocked(RuntimeError):
    """Another driver runs this study (or pipeline) now."""


def lock_path(storage: Path, name: str, kind: str) -> Path:
    return Path(storage) / f"{name}.{kind}-driver.json"


def this_driver() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def held_by_this_process(holder: dict[str, Any] | None) -> bool:
    return bool(holder) and (holder.get("pid"), holder.get("host")) == (
        os.getpid(),
        socket.gethostname(),
    )


def is_stale(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - holder["started"]) > 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return True


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half written: treated as held by an unknown driver


def acquire(path: Path, what: str) -> None:
    """Create the lock file (atomically: O_EXCL) or raise StudyLocked naming its holder."""
    me = this_driver()
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is None:
                continue  # released meanwhile
            if holder and is_stale(holder):
                print(
                    f"note: {what}: taking over the lock of driver pid {holder['pid']} on "
                    f"{holder['host']} (since {holder.get('since', '?')}), which is gone"
                )
                path.unlink(missing_ok=True)
                continue
            raise StudyLocked(
                f"{what} is already running: driver pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} since {holder.get('since', '?')} (lock {path}). "
                "Wait for it or stop it (Ctrl-C, `ray job stop`); if that driver is gone, "
                "delete the lock file"
            ) from None
        with os.fdopen(fd, "w") as out:
            json.dump(me, out)
        return
    raise StudyLocked(f"{what}: could not take the lock {path}; another driver keeps taking it")


def release(path: Path) -> None:
    """Remove the lock file if it is still this driver's."""
    if held_by_this_process(read_holder(path)):
        path.unlink(missing_ok=True)


@contextmanager
def driver_lock(storage: Path, name: str, kind: str = "study") -> Iterator[None]:
    """Hold the lock of the study (`kind` "study") or pipeline ("pipeline") called `name` under
    `storage` while the block runs; a process that holds it already enters again."""
    path = lock_path(storage, name, kind)
    what = f"{kind} {name!r}"
    if held_by_this_process(read_holder(path)):
        yield
        return
    acquire(path, what)
    try:
        yield
    finally:
        release(path)
