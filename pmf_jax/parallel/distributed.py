"""Multi-process runs (one process per host, e.g. a Cloud TPU pod): joining the cluster, checking that every
process runs the same config and code, and the preemption sync point.

Launch variables (read by :func:`initialize_from_environment`; nothing is done when none is set):

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: passed on to
  ``jax.distributed.initialize``; ``PMF_DISTRIBUTED=1`` alone lets JAX find the cluster (Cloud TPU pods, SLURM).
* ``PMF_INIT_TIMEOUT`` (s, default 900): how long a process waits for the others to join.
* ``PMF_HEARTBEAT_TIMEOUT`` (s, default 100, JAX's): a process that sent no heartbeat for this long is dead; the
  coordination service then terminates every other process (exit status non-zero, 134), so a run whose peer died
  stops within about this bound instead of hanging in a collective. A process that dies is noticed sooner when a
  collective fails on its closed connection.
* ``PMF_SHUTDOWN_TIMEOUT`` (s, default 60): how long a finished process waits at the exit barrier for the others.

On CPU the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``), so a multi-process run
can be tested on one machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Dict

import jax

from pmf_jax.errors import PMFInputError

LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "PMF_DISTRIBUTED")
CHECK_TIMEOUT_MS = 300_000
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("pmf_jax", "train")


def requested(environ=os.environ) -> bool:
    """True when the launch variables ask for a multi-process run."""
    return bool(environ.get("JAX_COORDINATOR_ADDRESS")) or environ.get("PMF_DISTRIBUTED") == "1"


def _int_env(environ, name: str, default: int) -> int:
    text = environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise PMFInputError(f"${name}={text!r} must be a whole number of seconds") from None


def initialize_from_environment(environ=os.environ) -> bool:
    """``jax.distributed.initialize`` with the launch variables (module docstring) when they ask for it, once;
    returns whether this is a multi-process run. Must run before anything touches a JAX device."""
    if not requested(environ):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {"initialization_timeout": _int_env(environ, "PMF_INIT_TIMEOUT", 900),
              "heartbeat_timeout_seconds": _int_env(environ, "PMF_HEARTBEAT_TIMEOUT", 100),
              "shutdown_timeout_seconds": _int_env(environ, "PMF_SHUTDOWN_TIMEOUT", 60)}
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = environ["JAX_COORDINATOR_ADDRESS"]
    if environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = _int_env(environ, "JAX_NUM_PROCESSES", 1)
    if environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = _int_env(environ, "JAX_PROCESS_ID", 0)
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms.split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def code_version() -> str:
    """sha256 of the Python sources of pmf_jax and train (names and bytes): two processes with the same value run
    the same code."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((_PACKAGE_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _flatten(tree, prefix: str = "") -> Dict[str, str]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True)}


def _differences(mine: dict, theirs: dict, limit: int = 3) -> str:
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    shown = [f"{k}={theirs.get(k, '(absent)')} vs {mine.get(k, '(absent)')}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_same_run(settings: dict, what: str = "config") -> None:
    """Every process publishes its ``settings`` (a nested dict, e.g. the config) and :func:`code_version`; each
    compares every other process's with its own. Raises PMFInputError (on every process) naming the first process
    that differs and the differing keys (``key=value on process i vs value here``) or the code versions.

    A no-op in a single-process run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    mine = {"settings": _flatten(settings), "code": code_version()}
    me = jax.process_index()
    client.key_value_set(f"pmf_jax/same_run/{what}/{me}", json.dumps(mine))
    problems = []
    for other in range(jax.process_count()):
        if other == me:
            continue
        theirs = json.loads(client.blocking_key_value_get(f"pmf_jax/same_run/{what}/{other}", CHECK_TIMEOUT_MS))
        if theirs["settings"] != mine["settings"]:
            problems.append(f"process {other} has {_differences(mine['settings'], theirs['settings'])} here")
        if theirs["code"] != mine["code"]:
            problems.append(f"process {other} runs code version {theirs['code'][:12]} vs {mine['code'][:12]} "
                            f"here (a different checkout of pmf_jax)")
    if problems:
        raise PMFInputError(f"the processes of this run differ (process {me} of {jax.process_count()}): "
                            f"{what} of {'; '.join(problems)}; start every process with the same {what} and code")


def all_gather_text(name: str, text: str, timeout_s: int = 600) -> list:
    """Every process's ``text`` (a list indexed by process), through the coordination service's key-value store
    (no device collective; ``name`` must be new for each call). Single process: ``[text]``."""
    if jax.process_count() == 1:
        return [text]
    from jax._src import distributed

    client = distributed.global_state.client
    client.key_value_set(f"pmf_jax/gather/{name}/{jax.process_index()}", text)
    return [text if k == jax.process_index() else
            client.blocking_key_value_get(f"pmf_jax/gather/{name}/{k}", timeout_s * 1000)
            for k in range(jax.process_count())]


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches the barrier ``name`` (the coordination service's barrier, no device
    collective); a no-op in a single-process run.

    Used before the first step: a process that compiled slowly (a compilation-cache miss where the other hit) would
    otherwise leave the others waiting inside the first collective, whose setup on CPU (gloo) gives up after 30 s.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"pmf_jax/{name}", timeout_s * 1000)


class Preemption:
    """Whether the run must save and stop at this step: SIGTERM (a preempted VM, ``kill``).

    Multi-process: JAX's preemption notifier catches SIGTERM on any process and the preemption sync point
    (``reached_preemption_sync_point``) answers True on every process at the same step, so all of them save that
    step. Single process: a SIGTERM handler sets a flag read at the next step.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._sigterm = threading.Event()
        self._previous = None

    def install(self) -> "Preemption":
        # multi-process: JAX's notifier has the SIGTERM handler; a Python one would replace it
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._sigterm.set())
        return self

    def reached(self, step: int) -> bool:
        """Call once per step, on every process, with the step just completed."""
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._sigterm.is_set()

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def process_summary() -> str:
    return f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local devices of " \
           f"{jax.device_count()}"


__all__ = ["LAUNCH_VARIABLES", "Preemption", "all_gather_text", "barrier", "check_same_run", "code_version",
           "initialize_from_environment", "process_summary", "requested"]
