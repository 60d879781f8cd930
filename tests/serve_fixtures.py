"""`pmf serve` as a real subprocess on a free 127.0.0.1 port, serving the tiny pixel-space export of
convert_fixtures (64x64, what `make demo` exports, with random weights), shared by the API and browser tests::

    from serve_fixtures import served  # noqa: F401  (the fixture, with tiny_export and tiny_run)

The server compiles its default request (64x64, STEPS ddim steps, 1 image) at start; the tests' requests use those
settings, so they reuse that program. Its upload limit is UPLOAD_MB and its pixel limit PIXEL_LIMIT (small, so that
the tests can cross them cheaply). One example source, ``person.png``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)

STEPS = 20          # long enough that 20 concurrent requests find the queue full
QUEUE_SIZE = 4
UPLOAD_MB = 1
PIXEL_LIMIT = 300_000
START_TIMEOUT_S = 300


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: list            # the server's stdout and stderr lines so far
    source: Path            # a 64x64 person picture
    started_s: float        # process start to "serving"


def person_png(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A person-like picture: a light background, a head, a coloured shirt, dark trousers."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    s = size / 64
    shirt = tuple(int(v) for v in rng.integers(40, 220, 3))
    draw.ellipse([28 * s, 4 * s, 36 * s, 13 * s], fill=(224, 180, 150))
    draw.rectangle([24 * s, 14 * s, 40 * s, 36 * s], fill=shirt)
    draw.rectangle([19 * s, 15 * s, 23 * s, 34 * s], fill=shirt)
    draw.rectangle([41 * s, 15 * s, 45 * s, 34 * s], fill=shirt)
    draw.rectangle([25 * s, 36 * s, 31 * s, 60 * s], fill=(40, 40, 70))
    draw.rectangle([33 * s, 36 * s, 39 * s, 60 * s], fill=(40, 40, 70))
    image.save(path)
    return path


def _read_lines(stream, lines: list) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@pytest.fixture(scope="session")
def served(tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    examples = root / "examples"
    examples.mkdir()
    person_png(examples / "person.png", seed=1)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PMF_MAX_IMAGE_PIXELS=str(PIXEL_LIMIT))
    command = [sys.executable, "-m", "pmf_jax.cli", "serve", "--model", str(tiny_export), "--steps", str(STEPS),
               "--port", "0", "--queue-size", str(QUEUE_SIZE), "--max-upload-mb", str(UPLOAD_MB),
               "--examples", str(examples)]
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=root)
    lines: list = []
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    url = None
    while url is None and time.monotonic() - start < START_TIMEOUT_S and process.poll() is None:
        url = next((line.split("serving ")[1].split()[0] for line in lines if "serving http" in line), None)
        time.sleep(0.1)
    if url is None:
        process.kill()
        pytest.fail("pmf serve did not start:\n" + "\n".join(lines))
    server = Server(url.rstrip("/"), process, lines, person_png(root / "source.png"), time.monotonic() - start)
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
