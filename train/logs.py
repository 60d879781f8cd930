"""Run logging: JSONL metrics, TensorBoard events (scalars and image grids), and the process index on every line."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Dict, Optional

import jax
import numpy as np

from pmf_jax import storage


def log(message: str) -> None:
    """print() with the process index, so multi-host logs can be told apart."""
    print(f"[process {jax.process_index()}/{jax.process_count()}] {message}", flush=True)


def warn(message: str) -> None:
    """A ``warning:`` line on stderr, with the process index."""
    print(f"[process {jax.process_index()}/{jax.process_count()}] warning: {message}", file=sys.stderr, flush=True)


class MetricWriter:
    """Writes ``metrics.jsonl`` and TensorBoard event files under the run directory (process 0 only).

    The run directory may be a URL (``gs://bucket/run``). Object stores cannot append: there ``metrics.jsonl`` is
    rewritten whole at each row (one object write, so a reader sees the old or the new file; the text is read from
    the store once, then kept), and TensorBoard writes into a local folder whose event files are uploaded to
    ``<run>/tensorboard/`` after each flush.
    """

    def __init__(self, run_dir, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.run_dir = storage.as_path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.remote = storage.is_url(self.run_dir)
        self._remote_text = None  # a store's metrics.jsonl as this writer last read or wrote it
        self._tb = None
        self._tb_dir = self.run_dir / "tensorboard"
        if self.active and tensorboard:
            try:
                from flax.metrics import tensorboard as flax_tb

                local = tempfile.mkdtemp(prefix="pmf-tensorboard-") if self.remote else os.fspath(self._tb_dir)
                self._tb_local = storage.as_path(local)
                self._tb = flax_tb.SummaryWriter(local)
            except ImportError as err:  # tensorflow (the data extra) provides the event writer
                log(f"TensorBoard logging off: {err}")

    def _read(self) -> str:
        if self._remote_text is not None:
            return self._remote_text
        text = self.path.read_text() if self.path.is_file() else ""
        if self.remote:
            self._remote_text = text
        return text

    def _write(self, text: str) -> None:
        """Replaces metrics.jsonl with ``text`` (a rename locally, one object write on a store)."""
        if self.remote:
            self.path.write_text(text)
            self._remote_text = text
            return
        partial = self.path.parent / (self.path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, self.path)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        line = json.dumps(row) + "\n"
        if self.remote:
            self._write(self._read() + line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.scalar(key, float(value), step)
            self._flush_tensorboard()

    def _flush_tensorboard(self) -> None:
        self._tb.flush()
        if self.remote:
            for event_file in self._tb_local.iterdir():
                storage.upload_file(event_file, self._tb_dir / event_file.name)

    def drop_rows_after(self, step: int) -> None:
        """Keeps the rows of steps <= ``step`` (the restored checkpoint): the rows a killed run logged after its last
        checkpoint are logged again by the resumed run."""
        if not self.active or not self.path.is_file():
            return
        rows = self._read().splitlines(keepends=True)
        kept = [row for row in rows if _row_step(row) is not None and _row_step(row) <= step]
        if len(kept) != len(rows):
            self._write("".join(kept))

    def last_step(self) -> Optional[int]:
        """The step of the last row (rows are only written for finite losses), or None."""
        rows = read_metrics(self.run_dir)
        return rows[-1]["step"] if rows else None

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: [H, W, 3] uint8 or float in [0, 1]."""
        if self.active and self._tb is not None:
            self._tb.image(name, np.asarray(image), step)
            self._flush_tensorboard()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            if self.remote:
                for event_file in self._tb_local.iterdir():
                    storage.upload_file(event_file, self._tb_dir / event_file.name)


def _row_step(row: str) -> Optional[int]:
    """The step of a metrics.jsonl row; None for a torn last row (the process was killed while writing it)."""
    try:
        return int(json.loads(row)["step"]) if row.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir) -> list:
    path = storage.as_path(run_dir) / "metrics.jsonl"
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
