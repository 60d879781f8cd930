"""Reading pickled torch weight files (``.bin``/``.ckpt``), only when the caller opted in with ``allow_pickle``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from pmf_jax.errors import PMFInputError


def load_pickle_state_dict(path: Path) -> Dict[str, np.ndarray]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise PMFInputError(f"cannot read pickle weights {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in state.items() if hasattr(v, "detach")}
