"""Euler (Karras et al. 2022, Algorithm 2 without churn) in σ space (diffusers ``EulerDiscreteScheduler``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional

import numpy as np

from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers.base import Plan, Scheduler, SchedulerState, option


def zero_snr_sigma_table(scheduler: Scheduler) -> np.ndarray:
    """Training σ_t (float32 [T]) for the σ-space schedulers.

    With ``rescale_betas_zero_snr`` ᾱ_{T-1} is 0 and σ_{T-1} infinite, so diffusers sets ᾱ_{T-1} = 2^-24.
    """
    acp = scheduler.alphas_cumprod.copy()
    if scheduler.rescale_betas_zero_snr:
        acp[-1] = 2.0 ** -24
    return betas_lib.train_sigmas(acp)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(Scheduler):
    """First-order Euler on the probability-flow ODE dx/dσ = (x − x0) / σ, with x = x_VP · sqrt(σ² + 1).

    The sample lives in the variance-exploding scale: ``init_noise_sigma`` is σ_max (sqrt(σ_max² + 1) for
    ``leading`` spacing, as in diffusers) and the model sees x / sqrt(σ² + 1) (``scale_model_input``).
    Timesteps are float32 and, for ``linspace`` spacing or Karras σ, not whole numbers (the UNet embeds them as
    given). No churn (s_churn = 0), so sampling is deterministic.
    """
    DIFFUSERS_CLASS: ClassVar[str] = "EulerDiscreteScheduler"
    FIXED: ClassVar[Mapping[str, Any]] = {"interpolation_type": "linear", "use_exponential_sigmas": False,
                                          "use_beta_sigmas": False, "timestep_type": "discrete"}
    ALIASES: ClassVar[Mapping[str, Mapping[Any, Any]]] = {"prediction_type": {"original_sample": "sample"}}

    use_karras_sigmas: bool = False
    sigma_min: Optional[float] = None   # Karras range; default: the grid's own σ range
    sigma_max: Optional[float] = None
    final_sigmas_type: str = option("zero", "sigma_min")

    def _plan(self, num_steps: int) -> Plan:
        T = self.num_train_timesteps
        train_sigma = zero_snr_sigma_table(self)
        if self.timestep_spacing == "linspace":  # not rounded: fractional timesteps
            ts = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
        else:
            ts = betas_lib.spaced_timesteps(self.timestep_spacing, T, num_steps, self.steps_offset).astype(np.float32)
        sigmas = np.interp(ts, np.arange(T), train_sigma)
        if self.use_karras_sigmas:  # Euler's Karras range is the spaced grid's, not the full training range
            lo = self.sigma_min if self.sigma_min is not None else sigmas[-1]
            hi = self.sigma_max if self.sigma_max is not None else sigmas[0]
            sigmas = betas_lib.karras_sigmas(lo, hi, num_steps)
            ts = betas_lib.sigma_to_t(sigmas, train_sigma).astype(np.float32)
        last = train_sigma[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.append(sigmas, last).astype(np.float32).astype(np.float64)
        top = sigmas.max()
        init_noise_sigma = top if self.timestep_spacing in ("linspace", "trailing") else np.sqrt(top ** 2 + 1)
        return Plan(ts, {"sigma": sigmas[:-1], "sigma_next": sigmas[1:],
                         "input_div": np.sqrt(sigmas[:-1] ** 2 + 1)}, float(init_noise_sigma))

    def scale_model_input(self, state: SchedulerState, sample):
        """x / sqrt(σ² + 1): the model was trained on variance-preserving inputs. [B, H, W, C]."""
        div = state.tables["input_div"][state.step_index]
        return (sample.astype(div.dtype) / div).astype(sample.dtype)

    def _update(self, coef: Dict, memory, model_output, sample, noise):
        sigma = coef["sigma"]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (sample - x0) / sigma
        return memory, sample + derivative * (coef["sigma_next"] - sigma)
