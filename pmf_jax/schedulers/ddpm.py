"""DDPM (Ho et al. 2020): ancestral sampling, the scheduler training noise comes from (diffusers ``DDPMScheduler``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers.base import THRESHOLDING_FIXED, THRESHOLDING_INERT, Plan, Scheduler, option, predict_x0


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(Scheduler):
    """Ancestral DDPM sampling; ``step`` needs standard normal ``noise`` (``sample`` draws it from ``key``).

    Per step t -> t' (the next timestep of the grid, or −1 after the last, where ᾱ = 1):
      x0 = predicted from the model output (clipped to ±clip_sample_range when ``clip_sample``),
      x_{t'} = sqrt(ᾱ_t') β̃ / (1 − ᾱ_t) x0 + sqrt(α̃) (1 − ᾱ_t') / (1 − ᾱ_t) x_t + std ε,
    with α̃ = ᾱ_t / ᾱ_t', β̃ = 1 − α̃ and std² = (1 − ᾱ_t') / (1 − ᾱ_t) β̃ (``fixed_small``) or β̃
    (``fixed_large``). As in diffusers no noise is added when t == 0 — but it is at t = 1, the last step of an
    SD1.5 grid (``steps_offset=1``).
    """
    DIFFUSERS_CLASS: ClassVar[str] = "DDPMScheduler"
    FIXED: ClassVar[Mapping[str, Any]] = THRESHOLDING_FIXED
    INERT: ClassVar[Tuple[str, ...]] = THRESHOLDING_INERT
    NEEDS_NOISE: ClassVar[bool] = True

    timestep_spacing: str = option("leading", "trailing", "linspace")
    # fixed_small_log is fixed_small computed through exp(0.5 log var): the same numbers
    variance_type: str = option("fixed_small", "fixed_small_log", "fixed_large")
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def _plan(self, num_steps: int) -> Plan:
        acp = self.alphas_cumprod.astype(np.float64)
        ts = betas_lib.spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, num_steps, self.steps_offset)
        prev = np.append(ts[1:], -1)
        acp_t = acp[ts]
        acp_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0)
        alpha_step = acp_t / acp_prev            # α̃, the one-step α between t' and t
        beta_step = 1 - alpha_step
        var = np.maximum((1 - acp_prev) / (1 - acp_t) * beta_step, 1e-20)
        if self.variance_type == "fixed_large":
            var = beta_step
        return Plan(ts, {
            "alpha": np.sqrt(acp_t), "sigma": np.sqrt(1 - acp_t),
            "coef_x0": np.sqrt(acp_prev) * beta_step / (1 - acp_t),
            "coef_xt": np.sqrt(alpha_step) * (1 - acp_prev) / (1 - acp_t),
            "std": np.where(ts > 0, np.sqrt(var), 0.0),
        })

    def _update(self, coef: Dict, memory, model_output, sample, noise):
        x0 = predict_x0(self.prediction_type, model_output, sample, coef["alpha"], coef["sigma"])
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = coef["coef_x0"] * x0 + coef["coef_xt"] * sample + coef["std"] * noise
        return memory, prev
