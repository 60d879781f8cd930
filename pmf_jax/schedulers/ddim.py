"""DDIM (Song et al. 2021), deterministic (η = 0) (diffusers ``DDIMScheduler``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers.base import THRESHOLDING_FIXED, THRESHOLDING_INERT, Plan, Scheduler, option, predict_x0


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(Scheduler):
    """Deterministic DDIM: x_{t'} = sqrt(ᾱ_t') x0 + sqrt(1 − ᾱ_t') ε, both predicted at t.

    Like diffusers, the previous timestep is t' = t − T // n whatever the spacing (for ``trailing`` or
    ``linspace`` grids that is not always the next grid point), and after the last step ᾱ_t' is 1 when
    ``set_alpha_to_one`` else ᾱ_0. ε is taken before x0 is clipped (``use_clipped_model_output=False``).
    """
    DIFFUSERS_CLASS: ClassVar[str] = "DDIMScheduler"
    FIXED: ClassVar[Mapping[str, Any]] = THRESHOLDING_FIXED
    INERT: ClassVar[Tuple[str, ...]] = THRESHOLDING_INERT

    timestep_spacing: str = option("leading", "trailing", "linspace")
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    def _plan(self, num_steps: int) -> Plan:
        acp = self.alphas_cumprod.astype(np.float64)
        ts = betas_lib.spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, num_steps, self.steps_offset)
        prev = ts - self.num_train_timesteps // num_steps
        final = 1.0 if self.set_alpha_to_one else acp[0]
        acp_t = acp[ts]
        acp_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
        return Plan(ts, {"alpha": np.sqrt(acp_t), "sigma": np.sqrt(1 - acp_t),
                         "alpha_prev": np.sqrt(acp_prev), "sigma_prev": np.sqrt(1 - acp_prev)})

    def _update(self, coef: Dict, memory, model_output, sample, noise):
        alpha, sigma = coef["alpha"], coef["sigma"]
        x0 = predict_x0(self.prediction_type, model_output, sample, alpha, sigma)
        if self.prediction_type == "epsilon":
            eps = model_output
        elif self.prediction_type == "v_prediction":
            eps = alpha * model_output + sigma * sample
        else:
            eps = (sample - alpha * x0) / sigma
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return memory, coef["alpha_prev"] * x0 + coef["sigma_prev"] * eps
