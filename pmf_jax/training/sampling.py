"""Sampling from a training run's parameters straight from its components (previews during training, quick checks).

The whole denoising loop is one jit (``scheduler.sample``); the reference UNet writes the bank once per step (at the
step's timestep, or once for ``reference_timestep="zero"`` since the bank then does not depend on t).
"""

from __future__ import annotations

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp

from pmf_jax.reference import ReferenceConfig, write_inputs
from pmf_jax.schedulers import make_scheduler


@functools.partial(jax.jit, static_argnames=("components", "reference_cfg", "scheduler_name", "steps",
                                             "use_reference", "prediction_type"))
def sample(params: Dict[str, Any], frozen: Dict[str, Any], source, pose, key, *, components, reference_cfg: ReferenceConfig,
           scheduler_name: str = "ddim", steps: int = 25, use_reference: bool = True, prediction_type: str = "epsilon"):
    """source [B, H, W, 3] in [-1, 1], pose [B, H, W, 3] in [0, 1] -> generated [B, H, W, 3] in [-1, 1].

    ``use_reference=False`` samples with the reference bank disabled (every row attends plainly), the baseline the
    demo compares against.
    """
    c = components
    sched = make_scheduler(scheduler_name, dict(_config_of(c.noise_scheduler), prediction_type=prediction_type))
    ref_latents = c.encode(frozen["autoencoder"], source).astype(jnp.float32)
    b = source.shape[0]
    context = jnp.broadcast_to(frozen["context"], (b, *frozen["context"].shape[1:]))
    ref_mix = None if use_reference else jnp.ones((b,), jnp.float32)

    def write(t):
        x, tt = write_inputs(reference_cfg, ref_latents, jnp.broadcast_to(t, (b,)))
        return c.reference_unet.apply({"params": params["reference_unet"]}, x, tt, context,
                                      method=c.reference_unet.write_reference)

    fixed_bank = write(jnp.zeros((), jnp.int32)) if reference_cfg.reference_timestep == "zero" else None

    def model_fn(x, t):
        tt = jnp.broadcast_to(t, (b,))
        bank = fixed_bank if fixed_bank is not None else write(t)
        residuals = {}
        if c.controlnet is not None:
            read = dict(reference=bank, reference_config=reference_cfg, ref_mix=ref_mix) \
                if reference_cfg.controlnet_reads_reference else {}
            down, mid = c.controlnet.apply({"params": params["controlnet"]}, x, tt, context, pose, **read)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return c.unet.apply({"params": params["unet"]}, x, tt, context, reference=bank, reference_config=reference_cfg,
                            ref_mix=ref_mix, **residuals).astype(jnp.float32)

    x_T = jax.random.normal(key, ref_latents.shape, jnp.float32)
    latents = sched.sample(model_fn, x_T, steps)
    return jnp.clip(c.decode(frozen["autoencoder"], latents), -1.0, 1.0)


def _config_of(scheduler) -> dict:
    """The noise schedule of the training scheduler, to configure the sampler alike."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "steps_offset",
            "timestep_spacing")
    return {k: getattr(scheduler, k) for k in keys if hasattr(scheduler, k)}
