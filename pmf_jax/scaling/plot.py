"""The sweep as a PNG: predicted images/s (left axis, log-log) and weak-scaling efficiency (right axis) vs devices."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List


def plot_sweep(sweep: List[Dict], path: Path, title: str = "") -> Path:
    """``sweep``: points with ``devices``, ``images_per_s``, ``efficiency`` (see
    :func:`pmf_jax.scaling.roofline.weak_scaling`). Writes ``path`` (PNG) and returns it."""
    # A Figure of its own with the Agg canvas: no pyplot, so a caller's matplotlib backend and figures are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    devices = [p["devices"] for p in sweep]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    left = fig.add_subplot()
    left.plot(devices, [p["images_per_s"] for p in sweep], "o-", color="tab:blue", label="images/s (predicted)")
    ideal = [sweep[0]["images_per_s"] * d / devices[0] for d in devices]
    left.plot(devices, ideal, ":", color="tab:blue", alpha=0.5, label="linear scaling")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("devices")
    left.set_ylabel("images / s", color="tab:blue")
    left.set_xticks(devices, [str(d) for d in devices])
    right = left.twinx()
    right.plot(devices, [100 * p["efficiency"] for p in sweep], "s--", color="tab:red", label="efficiency")
    right.set_ylabel("weak-scaling efficiency (%)", color="tab:red")
    right.set_ylim(0, 105)
    for p in sweep:
        label = {"communication": "comm."}.get(p["limit"], p["limit"])  # the limiting roofline term
        right.annotate(label, (p["devices"], 100 * p["efficiency"]), textcoords="offset points", xytext=(0, -12),
                       ha="center", fontsize=7, color="tab:red")
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    left.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
