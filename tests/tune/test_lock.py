"""One driver per study (`mg_ray.tune.lock`): a live holder refuses a second driver with a line
that names it; a holder whose process is gone on this host is taken over; a holder on another
host is never taken over; the holder itself enters again, and the lock goes with its block."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from mg_ray.tune.lock import StudyLocked, driver_lock, lock_path


def hold(path, pid: int, host: str | None = None) -> None:
    """Write the lock of driver `pid` (its real start time) as another process would."""
    path.write_text(
        json.dumps(
            {
                "host": host or socket.gethostname(),
                "pid": pid,
                "started": psutil.Process(pid).create_time(),
                "since": "2026-12-05 10:00:00 UTC",
            }
        )
    )


@pytest.fixture
def other_driver():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_driver_refuses_a_second_one_and_the_lock_goes_with_the_first(
    tmp_path, other_driver
):
    path = lock_path(tmp_path, "s1", "study")
    hold(path, other_driver.pid)
    with pytest.raises(StudyLocked) as refused, driver_lock(tmp_path, "s1"):
        pytest.fail("entered a study another driver holds")
    message = str(refused.value)
    assert f"study 's1' is already running: driver pid {other_driver.pid}" in message
    assert socket.gethostname() in message and "since 2026-12-05 10:00:00" in message
    assert str(path) in message and "\n" not in message

    path.unlink()  # the other driver ended
    with driver_lock(tmp_path, "s1"):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
        with driver_lock(tmp_path, "s1"):  # the holder enters again (a pipeline's stage)
            pass
        assert path.exists()
        with driver_lock(tmp_path, "s1", "pipeline"):  # a pipeline of that name is another lock
            assert lock_path(tmp_path, "s1", "pipeline").exists()
    assert not path.exists() and not lock_path(tmp_path, "s1", "pipeline").exists()


def test_the_lock_of_a_driver_that_is_gone_is_taken_over(tmp_path, other_driver, capsys):
    path = lock_path(tmp_path, "s2", "study")
    hold(path, other_driver.pid)
    other_driver.kill()
    other_driver.wait()
    with driver_lock(tmp_path, "s2"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of driver pid {other_driver.pid}" in capsys.readouterr().out


def test_a_reused_pid_is_not_its_driver(tmp_path):
    """A pid that now runs a process started after the lock was taken is not the holder."""
    path = lock_path(tmp_path, "s3", "study")
    hold(path, os.getpid())
    holder = json.loads(path.read_text())
    path.write_text(json.dumps({**holder, "pid": os.getppid(), "started": holder["started"] + 5}))
    with driver_lock(tmp_path, "s3"):
        pass


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    path = lock_path(tmp_path, "s4", "study")
    hold(path, os.getpid(), host="some-other-host")
    with pytest.raises(StudyLocked, match="on host some-other-host"), driver_lock(tmp_path, "s4"):
        pass
    assert path.exists()  # not ours to remove
