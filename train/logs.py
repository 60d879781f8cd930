"""Run logging: JSONL metrics, TensorBoard events (scalars and image grids), and the process index on every line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import jax
import numpy as np


def log(message: str) -> None:
    """print() with the process index, so multi-host logs can be told apart."""
    print(f"[process {jax.process_index()}/{jax.process_count()}] {message}", flush=True)


def warn(message: str) -> None:
    """A ``warning:`` line on stderr, with the process index."""
    print(f"[process {jax.process_index()}/{jax.process_count()}] warning: {message}", file=sys.stderr, flush=True)


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

    def drop_rows_after(self, step: int) -> None:
        """Keeps the rows of steps <= ``step`` (the restored checkpoint): the rows a killed run logged after its last
        checkpoint are logged again by the resumed run."""
        if not self.active or not self.path.is_file():
            return
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if _row_step(row) is not None and _row_step(row) <= step]
        if len(kept) != len(rows):
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text("".join(kept))
            os.replace(partial, self.path)

    def last_step(self) -> Optional[int]:
        """The step of the last row (rows are only written for finite losses), or None."""
        rows = read_metrics(self.path.parent)
        return rows[-1]["step"] if rows else None

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8 or float in [0, 1]."""
        if self.active and self._tb is not None:
            self._tb.image(name, np.asarray(image), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _row_step(row: str) -> Optional[int]:
    """The step of a metrics.jsonl row; None for a torn last row (the process was killed while writing it)."""
    try:
        return int(json.loads(row)["step"]) if row.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


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
