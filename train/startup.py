"""What the trainer does before its first step, said as it happens: each phase is logged when it begins, with the
seconds since the process started, and whether compiling the train step hit the persistent compilation cache.

Before these lines a run printed nothing for 30-70 s on 2 CPU cores (imports, dataset, model init, compile).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import jax

from pmf_jax import storage
from pmf_jax.errors import PMFInputError
from train.logs import log

_IMPORTED = time.perf_counter()


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux ``/proc``; elsewhere since this module was imported)."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # field 22 of /proc/self/stat (starttime, clock ticks after boot); the name field before ")" may hold spaces
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def phase(message: str) -> None:
    """Logs ``start-up  12.3 s: message`` (seconds since the process started)."""
    log(f"start-up {seconds_since_process_start():6.1f} s: {message}")


class CacheOutcome:
    """Counts JAX's persistent-cache events while compiling: ``str()`` says hit (with the seconds spent reading the
    entry), miss or off."""

    def __init__(self):
        self.requests = self.hits = 0
        self.load_s = 0.0

    def __call__(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            self.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_retrieval_time_sec":
            self.load_s += seconds

    def __str__(self) -> str:
        if not self.requests:
            return "compilation cache off"
        if self.hits == self.requests:
            return f"compilation cache hit, read in {self.load_s:.1f} s"
        return "compilation cache miss"


@contextmanager
def watch_compilation_cache():
    """``with watch_compilation_cache() as outcome: jitted.lower(...).compile()`` -> ``str(outcome)``."""
    outcome = CacheOutcome()
    jax.monitoring.register_event_listener(outcome)
    jax.monitoring.register_event_duration_secs_listener(outcome.duration)
    try:
        yield outcome
    finally:
        jax.monitoring.unregister_event_listener(outcome)
        jax.monitoring.unregister_event_duration_listener(outcome.duration)


def check_output_dir(path, key: str = "train.output_dir") -> None:
    """Raises PMFInputError unless ``path`` is a folder, or can be created as one, that this process may write: a
    local folder, or a URL whose storage server answers, whose bucket exists and that accepts a probe object.

    Checked before anything is built or written, so a bad ``train.output_dir`` is one line, not a traceback after
    the models were built.
    """
    path = storage.as_path(path)
    if not storage.is_url(path) and path.exists() and not path.is_dir():
        raise PMFInputError(f"{key}={path} is a file, not a folder")
    storage.check_writable(path, key)
