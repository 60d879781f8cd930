"""Noise schedules shared by the schedulers: betas, ᾱ (alphas_cumprod), σ tables, timestep spacing, Karras sigmas.

Everything here runs once on the host in numpy when a schedule is planned; nothing is traced.

The training tables follow diffusers' dtypes on purpose: betas and ᾱ are float32 arrays, with the cumulative product
accumulated in float64 and rounded to float32 (what ``torch.cumprod`` does for float32 on CPU), and the σ tables that
diffusers keeps in float32 are rounded to float32 at the same points. The float32 values are what SD1.5-family models
were trained and are sampled with; everything derived from them (solver coefficients) is computed in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from pmf_jax.errors import PMFInputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas: Optional[Sequence[float]] = None) -> np.ndarray:
    """β_t for t = 0..T-1 as float32 [T].

    ``trained_betas`` (an explicit list) wins over ``schedule``, as in diffusers.
    """
    T = num_train_timesteps
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, T).astype(np.float32)
    if schedule == "scaled_linear":  # linear in sqrt(β) (the SD1.5 schedule); squared in float32 like diffusers
        return np.square(np.linspace(beta_start ** 0.5, beta_end ** 0.5, T).astype(np.float32))
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine schedule, β capped at 0.999
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], np.float32)
    raise PMFInputError(f"beta_schedule={schedule!r} is not implemented (choose one of {', '.join(BETA_SCHEDULES)})")


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales β so that ᾱ_{T-1} = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules ...", Algorithm 1).

    sqrt(ᾱ) is shifted and scaled so its last value is 0 and its first is unchanged. float32 [T] -> float32 [T].
    """
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = np.square(sqrt_ab)
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def make_alphas_cumprod(betas: np.ndarray, rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """ᾱ_t = Π_{s≤t} (1 − β_s) as float32 [T]."""
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return _cumprod_f32(np.float32(1) - betas)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), the noise level of the variance-exploding view, float32 [T] (ascending in t)."""
    return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0, *,
                     one_extra: bool = False) -> np.ndarray:
    """The inference timesteps, descending, int64 [num_steps] (diffusers ``set_timesteps``).

    Args:
      spacing: ``leading`` (multiples of T // n, plus ``steps_offset``; SD1.5), ``trailing`` (ends at T-1; Lin et
        al. Table 2) or ``linspace`` (evenly from 0 to T-1, rounded).
      one_extra: the multistep solvers (DPM-Solver, UniPC) space n + 1 points for ``leading``/``linspace`` and drop
        the last (the 0 end), so their grid never lands on t = 0.
    """
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        points = n + 1 if one_extra else n
        ts = np.linspace(0, T - 1, points).round()[::-1]
        return (ts[:-1] if one_extra else ts).astype(np.int64)
    if spacing == "leading":
        points = n + 1 if one_extra else n
        ts = (np.arange(points) * (T // points)).round()[::-1]
        ts = (ts[:-1] if one_extra else ts).astype(np.int64) + steps_offset
        if ts[0] >= T:
            raise PMFInputError(f"steps_offset={steps_offset} with {n} leading-spaced steps gives timestep {ts[0]}, "
                                f"beyond num_train_timesteps={T}: use fewer steps")
        return ts
    if spacing == "trailing":
        # [:n]: for some n (61, 103, 121, 122 with T = 1000) float rounding in arange yields one more point,
        # ≈ 0, and diffusers then runs n + 1 steps, the last at t = −1 (which indexes ᾱ from the end). We keep n.
        return np.round(np.arange(T, 0, -T / n)[:n]).astype(np.int64) - 1
    raise PMFInputError(f"timestep_spacing={spacing!r} is not implemented "
                        f"(choose one of {', '.join(TIMESTEP_SPACINGS)})")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, float64 [n]."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, train_sigma: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each σ, interpolating linearly in log σ between neighbours, float64 [n]."""
    log_train = np.log(train_sigma)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # index of the last training σ that is ≤ σ, kept one below the end so that a neighbour above exists
    low = np.cumsum(log_sigma[None, :] - log_train[:, None] >= 0, axis=0).argmax(axis=0)
    low = np.minimum(low, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def alpha_sigma_lambda(sigmas: np.ndarray):
    """Variance-preserving (α_t, σ_t) and log-SNR λ_t = log α_t − log σ_t for VE noise levels σ, float64.

    α = 1/sqrt(σ² + 1), σ_t = σ α. At σ = 0 (the final step of ``final_sigmas_type='zero'``) λ = +inf.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)
    sigma_t = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)
    return alpha, sigma_t, lam
