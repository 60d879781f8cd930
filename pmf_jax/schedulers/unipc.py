"""UniPC (Zhao et al. 2023), predictor-corrector multistep in the data prediction, B(h) = e^h − 1 ("bh2")
(diffusers ``UniPCMultistepScheduler``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers.base import THRESHOLDING_FIXED, THRESHOLDING_INERT, Plan, Scheduler, option, predict_x0
from pmf_jax.schedulers.dpmpp_2m import multistep_sigmas
from pmf_jax.schedulers.euler import zero_snr_sigma_table


@dataclasses.dataclass(frozen=True)
class UniPCMultistepScheduler(Scheduler):
    """UniPC-p with the UniC corrector, order ≤ 2.

    Step i (grid point s = i → t = i + 1; α, σ VP coefficients, λ = log(α/σ), h = λ_t − λ_s, B = e^{−h} − 1):
      1. m_i = x0 predicted from the model output at x_i;
      2. corrector (i > 0, i − 1 not in ``disable_corrector``): redo step i − 1 now that m_i is known,
         x_i ← (σ_i/σ_{i−1}) x_{i−1} − α_i B m_{i−1} − α_i B (ρ_d D_{i−2} + ρ_t (m_i − m_{i−1})),
         D_{i−2} = (m_{i−2} − m_{i−1}) / r, with ρ = (0, 1/2) for a first-order step and the solution of the
         UniC linear system for a second-order one;
      3. predictor: x_{i+1} = (σ_t/σ_s) x_i − α_t B m_i − α_t B ρ_p (m_{i−1} − m_i) / r, ρ_p = 1/2 at order 2.
    Step i has order min(solver_order, i + 1, n − i if ``lower_order_final``).
    """
    DIFFUSERS_CLASS: ClassVar[str] = "UniPCMultistepScheduler"
    FIXED: ClassVar[Mapping[str, Any]] = dict(
        THRESHOLDING_FIXED, predict_x0=True, solver_type="bh2", solver_p=None, use_exponential_sigmas=False,
        use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False, shift_terminal=None)
    INERT: ClassVar[Tuple[str, ...]] = THRESHOLDING_INERT + ("flow_shift", "time_shift_type")
    # diffusers rewrites a DPM-Solver solver_type to bh2 when loading that config
    ALIASES: ClassVar[Mapping[str, Mapping[Any, Any]]] = {
        "solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}
    MEMORY: ClassVar[int] = 3   # (corrected x_{i−1}, m_{i−1}, m_{i−2})

    solver_order: int = option(2, 1)
    lower_order_final: bool = True
    disable_corrector: Tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    final_sigmas_type: str = option("zero", "sigma_min")
    sigma_min: Optional[float] = None   # Karras range; default: the full training range
    sigma_max: Optional[float] = None

    def _validate(self) -> None:
        super()._validate()
        if self.solver_order == 2 and not self.lower_order_final and self.final_sigmas_type == "zero":
            # a second-order last step onto σ = 0 divides by λ_t = inf: diffusers returns inf/NaN there
            raise PMFInputError("UniPC with lower_order_final=false needs final_sigmas_type='sigma_min' "
                                "(a second-order step onto sigma=0 is not finite)")

    def _plan(self, num_steps: int) -> Plan:
        train_sigma = zero_snr_sigma_table(self)
        ts, sigmas = multistep_sigmas(self, num_steps, train_sigma, self.sigma_min, self.sigma_max)
        if self.use_karras_sigmas:
            ts = ts.round()
        if self.final_sigmas_type == "zero":
            last = 0.0
        else:  # UniPC ends Karras grids at their own σ_min, other grids at the training σ_0
            last = sigmas[-1] if self.use_karras_sigmas else train_sigma[0]
        sigmas = np.append(sigmas, last).astype(np.float32)
        ts = ts.astype(np.int64)
        n = len(ts)

        alpha, sigma, lam = betas_lib.alpha_sigma_lambda(sigmas)
        s = np.arange(n)
        t = s + 1
        h = lam[t] - lam[s]
        order = np.minimum(np.minimum(self.solver_order, s + 1), n - s if self.lower_order_final else n)
        with np.errstate(divide="ignore", invalid="ignore"):
            rk = np.where(order == 2, (lam[np.maximum(s - 1, 0)] - lam[s]) / h, 1.0)
        b = np.expm1(-h)                                   # B(h) for bh2 (h φ1(h) in the data prediction)
        ratio, phi_m0 = sigma[t] / sigma[s], alpha[t] * b  # x_t = ratio x_s − phi_m0 m_s − alpha_t B (...)
        rho_p = np.where(order == 2, 0.5, 0.0)

        # corrector of step i reuses step i−1's predictor quantities; rows 0 and disabled rows are unused
        use_c = (s > 0) & ~np.isin(s - 1, np.asarray(self.disable_corrector, dtype=np.int64))
        prev = np.maximum(s - 1, 0)
        rho_d, rho_t = np.zeros(n), np.full(n, 0.5)
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in np.nonzero(use_c & (order[prev] == 2))[0]:
                rho_d[i], rho_t[i] = _unic_rhos(-h[i - 1], rk[i - 1])
        return Plan(ts, {
            "alpha_s": alpha[s], "sigma_s": sigma[s],
            "p_ratio": ratio, "p_phi": phi_m0, "p_rk": rk, "p_rho": rho_p,
            "use_c": use_c.astype(np.float64), "c_ratio": ratio[prev], "c_phi": phi_m0[prev], "c_rk": rk[prev],
            "c_rho_d": rho_d, "c_rho_t": rho_t,
        })

    def _update(self, coef: Dict, memory, model_output, sample, noise):
        x_last, m_prev, m_prev2 = memory
        m = predict_x0(self.prediction_type, model_output, sample, coef["alpha_s"], coef["sigma_s"])
        # UniC: phi_m0 = α_t B, so α_t B (…) terms share it
        corr = coef["c_rho_d"] * (m_prev2 - m_prev) / coef["c_rk"] + coef["c_rho_t"] * (m - m_prev)
        corrected = coef["c_ratio"] * x_last - coef["c_phi"] * m_prev - coef["c_phi"] * corr
        x = jnp.where(coef["use_c"] > 0, corrected, sample)
        # UniP
        pred = coef["p_rho"] * (m_prev - m) / coef["p_rk"]
        x_next = coef["p_ratio"] * x - coef["p_phi"] * m - coef["p_phi"] * pred
        return (x, m, m_prev), x_next


def _unic_rhos(hh: float, rk: float) -> Tuple[float, float]:
    """Second-order UniC weights (ρ_d, ρ_t): solves [[1, 1], [r, 1]] ρ = (g1, g2) / B(h), bh2, hh = −h.

    g1 = φ̃1/hh − 1 and g2 = 2 (g1/hh − 1/2) with φ̃1 = e^{hh} − 1 (Zhao et al. 2023, Algorithm 2 with B = φ̃1).
    """
    b_h = np.expm1(hh)
    g1 = b_h / hh - 1
    g2 = 2 * (g1 / hh - 0.5)
    rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([g1, g2]) / b_h)
    return float(rhos[0]), float(rhos[1])
