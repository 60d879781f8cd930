"""Metrics whose networks may be missing: where their weights are looked for, and how a metric says it cannot run.

Nothing here downloads. LPIPS (AlexNet), FID (Inception) and CLIP score need pretrained weights; each is looked for
in, in order:

1. the folder given by the caller (``pmf eval score --weights-dir DIR``),
2. the folder in the ``PMF_METRIC_WEIGHTS`` environment variable,
3. PyTorch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints``) — where torchvision,
   lpips and pytorch-fid put these files when they download them on a machine with network access.

A metric whose file (or package) is absent raises :class:`MetricUnavailable` with the reason and the fix; the scorer
reports it as unavailable and computes the other metrics. When none of the requested metrics can run,
:func:`check_any_available` makes that an input error (``pmf eval score`` exits 2), not an empty report.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from pmf_jax.errors import PMFInputError

WEIGHTS_ENV = "PMF_METRIC_WEIGHTS"


class MetricUnavailable(Exception):
    """A metric cannot run here; ``reason`` says why and what would fix it."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} unavailable: {reason}")
        self.metric = metric
        self.reason = reason


def torch_hub_checkpoints() -> Optional[Path]:
    """``$TORCH_HOME/hub/checkpoints`` as torch resolves it (without importing torch when it is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints"


def weight_dirs(weights_dir: Optional[os.PathLike] = None) -> List[Path]:
    """The folders searched for metric weights, in order (see the module docstring)."""
    dirs = [Path(weights_dir).expanduser()] if weights_dir else []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    hub = torch_hub_checkpoints()
    if hub is not None:
        dirs.append(hub)
    return dirs


def find_weights(metric: str, filename: str, url: str, weights_dir: Optional[os.PathLike] = None) -> Path:
    """The path of ``filename`` in the first of :func:`weight_dirs` that has it.

    Raises:
      MetricUnavailable: not found anywhere; the reason lists the folders and where to get the file.
    """
    dirs = weight_dirs(weights_dir)
    for folder in dirs:
        if (folder / filename).is_file():
            return folder / filename
    searched = ", ".join(str(d) for d in dirs) or "(no folder)"
    raise MetricUnavailable(
        metric,
        f"weights file {filename} not found in {searched}; no download is attempted — fetch it where there is "
        f"network access ({url}) and put it in one of these folders, or pass --weights-dir",
    )


def require_modules(metric: str, modules: Sequence[str], extra: str = "eval") -> None:
    """Imports ``modules``; a missing one makes ``metric`` unavailable (install the project's ``extra``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise MetricUnavailable(
                metric, f"Python package {name!r} is not installed ({err}); pip install 'pmf_jax[{extra}]'"
            ) from None


def check_any_available(results: Mapping[str, Mapping]) -> None:
    """``results``: metric -> ``{"available": bool, "reason": str}``. Raises :class:`PMFInputError` listing every
    reason when none is available (nothing that was asked for can be computed)."""
    if results and not any(entry["available"] for entry in results.values()):
        reasons = "; ".join(f"{metric}: {entry.get('reason', 'unavailable')}" for metric, entry in results.items())
        raise PMFInputError(f"none of the requested metrics can be computed ({reasons})")
