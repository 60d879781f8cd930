"""``scaling.png``: the sweep (predicted images/s, log-log, and weak-scaling efficiency vs devices) when there is
one, else the roofline terms of each planned program (compute, memory, communication time; the measured step time
beside them after ``--measure``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


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


TERMS = (("compute_s", "compute", "tab:blue"), ("memory_s", "memory", "tab:orange"),
         ("communication_s", "communication", "tab:green"))


def plot_roofline(programs: Sequence[Tuple[str, Dict, Optional[float]]], path: Path, title: str = "") -> Path:
    """``programs``: (label, prediction, measured seconds or None) per program; a prediction is
    :meth:`pmf_jax.scaling.roofline.Prediction.as_dict` (``compute_s``, ``memory_s``, ``communication_s``,
    ``step_s``, ``limit``). Draws one group of horizontal bars (ms, log axis) per program, the limiting term marked;
    writes ``path`` (PNG) and returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.2 + 1.1 * len(programs)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / (len(TERMS) + 1)
    labels, positions, named = [], [], set()
    for i, (label, prediction, measured) in enumerate(programs):
        rows = [(name, prediction[key], color) for key, name, color in TERMS]
        if measured is not None:
            rows.append(("measured", measured, "tab:red"))
        for j, (name, seconds, color) in enumerate(rows):
            y = i - 0.4 + (j + 0.5) * height
            if seconds <= 0:  # e.g. no collectives on one device: no bar (a log axis has no zero)
                continue
            ax.barh(y, seconds * 1e3, height=height * 0.9, color=color, label=None if name in named else name)
            named.add(name)
            if name == prediction.get("limit"):
                ax.annotate("limit", (seconds * 1e3, y), textcoords="offset points", xytext=(4, -3), fontsize=7)
        labels.append(f"{label}\n{prediction['step_s'] * 1e3:.3g} ms")
        positions.append(i)
    ax.set_xscale("log")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per call (ms; a missing bar: zero)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
