"""DPM-Solver++(2M) (Lu et al. 2022), multistep in the data prediction (diffusers ``DPMSolverMultistepScheduler``
with ``algorithm_type='dpmsolver++'``, ``solver_type='midpoint'``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import numpy as np

from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers.base import THRESHOLDING_FIXED, THRESHOLDING_INERT, Plan, Scheduler, option, predict_x0
from pmf_jax.schedulers.euler import zero_snr_sigma_table


def multistep_sigmas(scheduler, num_steps: int, train_sigma: np.ndarray, sigma_min=None, sigma_max=None):
    """(timesteps int64 [n], σ float64 [n + 1]) for DPM-Solver and UniPC (``set_timesteps`` without the σ tail).

    The grid has n + 1 points with the 0 end dropped (``one_extra``). Karras σ span the full training range
    (or ``sigma_min``/``sigma_max``) and are mapped back to (rounded) timesteps.
    """
    s = scheduler
    ts = betas_lib.spaced_timesteps(s.timestep_spacing, s.num_train_timesteps, num_steps, s.steps_offset,
                                    one_extra=True)
    if s.use_karras_sigmas:
        lo = sigma_min if sigma_min is not None else train_sigma[0]
        hi = sigma_max if sigma_max is not None else train_sigma[-1]
        sigmas = betas_lib.karras_sigmas(lo, hi, num_steps)
        ts = betas_lib.sigma_to_t(sigmas, train_sigma)
        return ts, sigmas
    return ts, np.interp(ts, np.arange(s.num_train_timesteps), train_sigma)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ 2M: with α, σ the VP coefficients of the grid's noise levels, λ = log(α/σ) and h = λ_t − λ_s,

      x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) (D0 + D1/2),   D0 = x0_s,   D1 = (x0_s − x0_prev) / r,

    r = h_prev / h. The first step, and the last one when σ_last = 0 (``final_sigmas_type='zero'``) or when
    ``lower_order_final`` and n < 15 (or ``euler_at_final``), are first order (D1 = 0). ``solver_order=1`` is
    first order throughout (DDIM in λ).
    """
    DIFFUSERS_CLASS: ClassVar[str] = "DPMSolverMultistepScheduler"
    FIXED: ClassVar[Mapping[str, Any]] = dict(
        THRESHOLDING_FIXED, algorithm_type="dpmsolver++", solver_type="midpoint", use_exponential_sigmas=False,
        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-float("inf"),
        variance_type=None, use_dynamic_shifting=False)
    INERT: ClassVar[Tuple[str, ...]] = THRESHOLDING_INERT + ("flow_shift", "time_shift_type")
    # diffusers rewrites these when another scheduler's config is loaded (e.g. from UniPC's solver_type "bh2")
    ALIASES: ClassVar[Mapping[str, Mapping[Any, Any]]] = {
        "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
        "algorithm_type": {"deis": "dpmsolver++"}}
    MEMORY: ClassVar[int] = 1   # the previous step's x0

    solver_order: int = option(2, 1)
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = option("zero", "sigma_min")

    def _plan(self, num_steps: int) -> Plan:
        train_sigma = zero_snr_sigma_table(self)
        ts, sigmas = multistep_sigmas(self, num_steps, train_sigma)
        if self.use_karras_sigmas and self.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()   # diffusers rounds except for the cosine schedule (then truncates to int)
        last = train_sigma[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.append(sigmas, last).astype(np.float32)
        ts = ts.astype(np.int64)
        n = len(ts)

        alpha, sigma, lam = betas_lib.alpha_sigma_lambda(sigmas)
        s, t = np.arange(n), np.arange(n) + 1          # each step goes from grid point s to t
        h = lam[t] - lam[s]
        final_first_order = self.euler_at_final or (self.lower_order_final and n < 15) \
            or self.final_sigmas_type == "zero"
        second = (s > 0) & (self.solver_order == 2) & ~((s == n - 1) & final_first_order)
        h_prev = lam[s] - lam[np.maximum(s - 1, 0)]
        with np.errstate(divide="ignore", invalid="ignore"):
            d1_scale = np.where(second, 0.5 * h / h_prev, 0.0)   # (1/2)(1/r)
        return Plan(ts, {
            "alpha_s": alpha[s], "sigma_s": sigma[s],          # converting the model output at s to x0
            "ratio": sigma[t] / sigma[s],
            "phi": alpha[t] * np.expm1(-h),                    # α_t (e^{−h} − 1); −α_t at σ_t = 0, where x_t = x0
            "d1_scale": d1_scale,
        })

    def _update(self, coef: Dict, memory, model_output, sample, noise):
        x0 = predict_x0(self.prediction_type, model_output, sample, coef["alpha_s"], coef["sigma_s"])
        (x0_prev,) = memory
        d = x0 + coef["d1_scale"] * (x0 - x0_prev)
        return (x0,), coef["ratio"] * sample - coef["phi"] * d
