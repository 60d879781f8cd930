"""Run logging: JSONL metrics, TensorBoard events (scalars and image grids), and the process index on every line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

import jax
import numpy as np


def log(message: str) -> None:
    """print() with the process index, so multi-host logs can be told apart."""
    print(f"[process {jax.process_index()}/{jax.process_count()}] {message}", flush=True)


class MetricWriter:
    """Writes ``metrics.jsonl`` and TensorBoard event files under the run directory (process 0 only)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.active and tensorboard:
            try:
                from flax.metrics import tensorboard as flax_tb

                self._tb = flax_tb.SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError as err:  # tensorflow (the data extra) provides the event writer
                log(f"TensorBoard logging off: {err}")

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.scalar(key, float(value), step)
            self._tb.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8 or float in [0, 1]."""
        if self.active and self._tb is not None:
            self._tb.image(name, np.asarray(image), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def image_grid(rows: list) -> np.ndarray:
    """rows: list of [B, H, W, 3] arrays in [-1, 1] or [0, 1] (one column each) -> uint8 [B·H, n·W, 3]."""
    cols = []
    for images in rows:
        images = np.asarray(images, np.float32)
        if images.min() < 0:
            images = (images + 1) / 2
        cols.append(np.concatenate(list(np.clip(images, 0, 1)), axis=0))
    return (np.concatenate(cols, axis=1) * 255).round().astype(np.uint8)


class Throughput:
    def __init__(self):
        self._t, self._n = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self._n += images

    def rate(self) -> Optional[float]:
        elapsed = time.perf_counter() - self._t
        rate = self._n / elapsed if elapsed > 0 and self._n else None
        self._t, self._n = time.perf_counter(), 0
        return rate
