"""The generation queue of ``pmf serve``: one worker thread runs one generation at a time (the pipeline already spreads
each batch over every local device), at most ``capacity`` more wait, and a request that finds the queue full is
refused at once (:class:`QueueFull`: the server answers 503 with a Retry-After) rather than left to time out.

Each job may carry an id chosen by the page, under which its progress (queued / running with the step / done) can be
read while its request is open (:meth:`GenerationQueue.status`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import queue
import threading
import time
from typing import Callable, Optional

KEEP_FINISHED = 256  # finished jobs whose status stays readable


class QueueFull(Exception):
    """The queue holds its capacity of waiting jobs; ``retry_after`` (seconds) estimates when one will be free."""

    def __init__(self, retry_after: int):
        super().__init__(f"the generation queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class GenerationQueue:
    """Runs ``work(on_step)`` callables one at a time on a worker thread, in arrival order.

    Args:
      capacity: how many jobs may wait while one runs (>= 0).
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity={capacity} must be >= 0")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._jobs: "queue.Queue" = queue.Queue()
        self._waiting = 0
        self._running: Optional[str] = None
        self._status: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
        self._seconds = collections.deque(maxlen=20)  # recent generation times, for Retry-After
        self.served = 0
        self.refused = 0
        self._worker = threading.Thread(target=self._work, name="pmf-serve-generation", daemon=True)
        self._worker.start()

    def submit(self, work: Callable[[Callable[[int, int], None]], object],
               job_id: Optional[str] = None) -> concurrent.futures.Future:
        """Queues ``work``; returns a future of its result. Raises :class:`QueueFull` when ``capacity`` jobs wait,
        ValueError when ``job_id`` is one of a job still queued or running."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if job_id is not None and self._status.get(job_id, {}).get("state") in ("queued", "running"):
                raise ValueError(f"job {job_id!r} is already queued or running")
            if self._waiting >= self.capacity:
                self.refused += 1
                raise QueueFull(self._retry_after())
            self._waiting += 1
            if job_id is not None:
                self._remember(job_id, {"state": "queued", "step": 0, "steps": 0})
        self._jobs.put((work, job_id, future))
        return future

    def status(self, job_id: str) -> dict:
        """``{"state": "queued" | "running" | "done" | "failed" | "unknown", "step", "steps", "ahead"}``: ahead is
        how many jobs run or wait before a queued one."""
        with self._lock:
            info = dict(self._status.get(job_id, {"state": "unknown", "step": 0, "steps": 0}))
            if info["state"] == "queued":
                queued = [k for k, v in self._status.items() if v["state"] == "queued"]
                info["ahead"] = queued.index(job_id) + (self._running is not None)
            return info

    def health(self) -> dict:
        with self._lock:
            return {"running": self._running is not None, "waiting": self._waiting, "capacity": self.capacity,
                    "served": self.served, "refused": self.refused}

    # ------------------------------------------------------------------------------------------------------ worker
    def _retry_after(self) -> int:
        mean = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
        return max(1, math.ceil(mean * (self._waiting + 1)))

    def _remember(self, job_id: str, info: dict) -> None:
        self._status[job_id] = info
        self._status.move_to_end(job_id)
        finished = [k for k, v in self._status.items() if v["state"] in ("done", "failed")]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._status[key]

    def _work(self) -> None:
        while True:
            work, job_id, future = self._jobs.get()
            with self._lock:
                self._waiting -= 1
                self._running = job_id or ""
                if job_id is not None:
                    self._status[job_id]["state"] = "running"

            def on_step(done: int, total: int) -> None:
                if job_id is not None:
                    with self._lock:
                        self._status[job_id].update(step=int(done), steps=int(total))

            start = time.monotonic()
            state = "done"
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work(on_step))
                except BaseException as err:  # noqa: BLE001 - handed to the request that waits for it
                    state = "failed"
                    future.set_exception(err)
            with self._lock:
                self._seconds.append(time.monotonic() - start)
                self._running = None
                self.served += state == "done"
                if job_id is not None:
                    self._status[job_id]["state"] = state


__all__ = ["GenerationQueue", "KEEP_FINISHED", "QueueFull"]
