"""Launching a 2-process run on localhost, as the README launches a pod: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; each process gets 4 virtual CPU devices and its own log file."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(argv, env: dict, cwd: Path, name: str, extra=((), ()), pythonpath=(None, None)) -> list:
    """Starts processes 0 and 1 of ``argv + extra[i]`` with environment ``env`` (PYTHONPATH replaced by
    ``pythonpath[i]`` where given); returns ``[(Popen, log path)]``, logs ``cwd/<name>.<i>.log``."""
    port = free_port()
    procs = []
    for i in (0, 1):
        child = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        if pythonpath[i]:
            child["PYTHONPATH"] = str(pythonpath[i])
        log = Path(cwd) / f"{name}.{i}.log"
        procs.append((subprocess.Popen([*map(str, argv), *map(str, extra[i])], env=child, cwd=cwd,
                                       stdout=log.open("w"), stderr=subprocess.STDOUT), log))
    return procs
