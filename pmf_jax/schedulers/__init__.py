"""Diffusion schedulers as pure JAX functions over a pytree state, configured by diffusers ``scheduler_config.json``.

    s = make_scheduler("dpmpp_2m", config_dict)     # or from_pretrained("runwayml/stable-diffusion-v1-5", "unipc")
    x0 = jax.jit(lambda x: s.sample(model_fn, x, 25))(x_T)

Config rule (how a config written for another scheduler class is taken, like diffusers
``XScheduler.from_config(other.config)``): keys starting with ``_`` are metadata and skipped; a key that the chosen
scheduler has is applied (and checked); a key that only another of the five schedulers or ``PNDMScheduler`` has
(e.g. ``skip_prk_steps``, ``set_alpha_to_one`` for UniPC) is ignored; a key that none of them has is an error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Type

from pmf_jax.errors import PMFInputError
from pmf_jax.schedulers.base import Scheduler, SchedulerState
from pmf_jax.schedulers.ddim import DDIMScheduler
from pmf_jax.schedulers.ddpm import DDPMScheduler
from pmf_jax.schedulers.dpmpp_2m import DPMSolverMultistepScheduler
from pmf_jax.schedulers.euler import EulerDiscreteScheduler
from pmf_jax.schedulers.unipc import UniPCMultistepScheduler

logger = logging.getLogger(__name__)

SCHEDULERS: Dict[str, Type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

# diffusers class name (``_class_name``) -> our name, for from_pretrained without an explicit name
DIFFUSERS_NAMES: Dict[str, str] = {cls.DIFFUSERS_CLASS: name for name, cls in SCHEDULERS.items()}

# PNDMScheduler is not implemented but SD1.x ships its config; these are its keys the five above lack
PNDM_ONLY_KEYS = frozenset({"skip_prk_steps"})

KNOWN_KEYS = frozenset().union(*(cls.config_keys() for cls in SCHEDULERS.values())) | PNDM_ONLY_KEYS


def make_scheduler(name: str, config: Optional[Mapping[str, Any]] = None) -> Scheduler:
    """The scheduler ``name`` (a key of :data:`SCHEDULERS`) configured by a diffusers scheduler config dict.

    See the module docstring for how keys of other scheduler classes are treated.

    Raises:
      PMFInputError: unknown name, keys no known scheduler has, bad values, or options we do not implement.
    """
    if name not in SCHEDULERS:
        raise PMFInputError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULERS)})")
    cls = SCHEDULERS[name]
    config = dict(config or {})
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KNOWN_KEYS)
    if unknown:
        raise PMFInputError(f"unknown scheduler config keys: {', '.join(unknown)} (not a key of any of "
                            f"{', '.join(sorted(DIFFUSERS_NAMES))}, PNDMScheduler)")
    own = cls.config_keys()
    ignored = sorted(k for k in config if not k.startswith("_") and k not in own)
    if ignored:
        logger.info("scheduler %s ignores config keys of other schedulers: %s", name, ", ".join(ignored))
    return cls.from_config({k: v for k, v in config.items() if k in own})


def from_pretrained(path_or_repo_id: str | os.PathLike, name: Optional[str] = None,
                    subfolder: Optional[str] = "scheduler") -> Scheduler:
    """Reads ``<path>/scheduler/scheduler_config.json`` (a local folder or a cached Hub repo).

    Args:
      path_or_repo_id: a diffusers pipeline folder (or the scheduler folder itself) or a Hub repo id in the cache.
      name: which scheduler to build; default: the one the config's ``_class_name`` names (SD1.5 names PNDM,
        which is not implemented, so pass a name there).
    """
    from pmf_jax.io.hub import resolve_folder

    root = Path(path_or_repo_id).expanduser()
    if (root / "scheduler_config.json").is_file():
        folder = root
    else:
        folder = resolve_folder(path_or_repo_id, subfolder)
    path = folder / "scheduler_config.json"
    if not path.is_file():
        raise PMFInputError(f"{folder} has no scheduler_config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON: {err}") from err
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in DIFFUSERS_NAMES:
            raise PMFInputError(f"{path} is a {class_name}, which is not implemented: pass name= one of "
                                f"{', '.join(SCHEDULERS)} to use its noise schedule with another sampler")
        name = DIFFUSERS_NAMES[class_name]
    return make_scheduler(name, config)


__all__ = ["SCHEDULERS", "Scheduler", "SchedulerState", "make_scheduler", "from_pretrained", "DDPMScheduler",
           "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
