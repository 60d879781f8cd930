"""Reading pickled torch weight files (``.bin``/``.ckpt``), only when the caller opted in with ``allow_pickle``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from pmf_jax.errors import PMFInputError


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    """PMFInputError for a pickle file read without ``allow_pickle`` (a Python caller reads the argument's name, a
    ``pmf`` user the flag's)."""
    if allow_pickle:
        return

    def refusal(option: str) -> str:
        return (f"{path} is a pickle file, which can run arbitrary code when loaded; refusing it. Convert it to "
                f"safetensors, or pass {option} if you trust its source")

    raise PMFInputError(refusal("allow_pickle=True"), cli_message=refusal("--allow-pickle"))


def load_pickle(path: Path):
    """What ``torch.load`` unpickles from ``path`` (on the CPU); PMFInputError when it cannot."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise PMFInputError(f"cannot read pickle weights {path}: {err}") from err


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy (bfloat16, which numpy lacks, as float32)."""
    import torch

    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def load_pickle_state_dict(path: Path) -> Dict[str, np.ndarray]:
    state = load_pickle(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: to_numpy(v) for k, v in state.items() if hasattr(v, "detach")}
