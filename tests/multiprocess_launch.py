"""Launching a 2-process run on localhost, as the README launches a pod: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; each process gets 4 virtual CPU devices and its own log file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_environment(root: Path, heartbeat_s: int = 5) -> dict:
    """``os.environ`` for the processes: CPU only, a compilation cache of their own under ``root``, a short
    heartbeat (``PMF_HEARTBEAT_TIMEOUT``), the checkout importable; this process's device count is not passed on."""
    child = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    child.update(JAX_PLATFORMS="cpu", PMF_JAX_CACHE_DIR=str(Path(root) / "jax_cache"),
                 PMF_HEARTBEAT_TIMEOUT=str(heartbeat_s), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return child


def one_block_unet(root: Path) -> Path:
    """Writes ``root/one_block_unet.json`` (train_fixtures.ONE_BLOCK_UNET: the smallest UNet that is still the real
    model) and returns its path."""
    import train_fixtures

    path = Path(root) / "one_block_unet.json"
    path.write_text(json.dumps(train_fixtures.ONE_BLOCK_UNET))
    return path


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
