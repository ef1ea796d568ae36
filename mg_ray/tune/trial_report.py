"""How a trial's Train run reports to Tune: through a queue in the trial's own process.

Ray's `TuneReportCallback` runs in the Train controller's process and puts each report into a
queue actor that the trial's Tune session polls: one more actor (a Python process, about 2
CPU-seconds) per trial. A study's Train controller runs in the trial's actor
(`MgRayTorchTrainer` with `should_abort`), so `TuneReporter` gives the session a queue in that
same process instead, and Tune's own thread takes the reports from it exactly as it takes them
from the actor. The controller never waits for Tune: a report waiting for a stopped trial would
block the controller, and with it the abort.

The session's queue is a private part of Ray 2.60's Tune session (`_inter_actor_queue`), pinned
down by tests/tune/test_trial_abort.py.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from ray.train import UserCallback
from ray.util import queue as ray_queue

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the name Ray's TuneReportCallback gives it


class _SessionQueue:
    """What Tune's session asks of its inter-actor queue (`get`, raising `ray.util.queue.Empty`),
    in this process. Counts Tune's calls, so `TuneReporter.flush` knows when a taken report has
    gone all the way to Tune: the session calls `get` again only after that. Only the session's
    thread calls `get`."""

    def __init__(self) -> None:
        self._items: queue.Queue[dict[str, Any]] = queue.Queue()
        self.gets = 0            # calls of get() so far
        self.last_taken_at = -1  # the call that took the last report

    def put(self, item: dict[str, Any]) -> None:
        self._items.put(item)

    def get(self, block: bool = True, timeout: float | None = None) -> dict[str, Any]:
        self.gets += 1
        try:
            item = self._items.get(block, timeout)
        except queue.Empty:
            raise ray_queue.Empty from None
        self.last_taken_at = self.gets
        return item

    def delivered(self) -> bool:
        return self._items.empty() and self.gets > self.last_taken_at


class TuneReporter(UserCallback):
    """A Ray Train callback that hands rank 0's metrics (and the checkpoint's path) to the Tune
    trial of this process, in order. Create it in the trial's function."""

    def __init__(self) -> None:
        from ray.train._internal.session import get_session

        self._queue = _SessionQueue()
        get_session()._inter_actor_queue = self._queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = dict(metrics[0])
        if checkpoint:
            reported[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._queue.put(reported)

    def flush(self, give_up: Callable[[], bool]) -> bool:
        """Wait until Tune has every report, before the trial's function returns: a report taken
        after that would wait for good behind the function's own last one. False when
        `give_up()` (polled every 0.05 s) came first: Tune stopped the trial, and takes no more."""
        while not self._queue.delivered():
            if give_up():
                return False
            time.sleep(0.05)
        return True

    def __getstate__(self) -> dict:
        # Ray ships the run config, callbacks included, to the workers, where this callback is
        # never called: only the class travels.
        return {}
