"""The machinery both sampling pipelines share: jitted data-parallel programs per static setting, replicated
parameters, batch padding to the device count, the denoising loop, the progress bar and a compilation counter.

Three programs per static setting:
  * ``prologue(params, batch, scalars) -> (carry, extras)``: initial noise, scheduler state, what every step reuses
    (image latents, a reference bank written once);
  * ``loop(params, batch, scalars, extras, carry, start, stop) -> carry``: steps ``[start, stop)`` as one
    ``lax.fori_loop``; without a progress bar it runs once over all steps, so the whole denoising loop is one
    dispatch of one compiled program; with a progress bar the *same* program runs one step per call (identical
    numbers, and no host callback in the program: JAX's persistent cache refuses programs with callbacks, so a
    ``jax.debug.callback`` bar would make every CLI run recompile);
  * ``epilogue(params, x) -> output``: VAE decode (or the latents).

What is static (new programs): the scheduler and its number of steps, the guidance layout (rows), the reference
settings, the output kind, the batch size and resolution. What is traced (no recompilation): prompts (their
embeddings), the seed, every guidance scale and the ControlNet scale.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import jax
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines import common
from pmf_jax.pipelines.images import to_pil
from pmf_jax.schedulers import SCHEDULERS, make_scheduler

OUTPUT_TYPES = ("pil", "np", "latent")


class SamplingPipeline:
    """Base class. Subclasses set ``self.params`` (a dict of parameter trees) and implement, as pure functions of
    a hashable ``static`` (with fields ``scheduler``, ``steps``, ``latent_shape``, ``output_type``):
    ``_extras(static, params, batch, scalars) -> extras`` and
    ``_model_fn(static, params, batch, scalars, extras, x, t) -> guided model output [N, h, w, C]``;
    and set ``self.vae``."""

    def __init__(self, scheduler_config: Optional[Dict[str, Any]] = None, compilation_cache=None):
        #: The diffusers scheduler config (noise schedule) every sampler is built from; edit it to change e.g.
        #: ``timestep_spacing``.
        self.scheduler_config = dict(scheduler_config or {})
        self.params: Dict[str, Any] = {}
        self.compilation_cache = common.enable_compilation_cache(compilation_cache)
        self._programs: Dict[Hashable, Tuple[Callable, Callable, Callable]] = {}
        self._placed = None

    # -------------------------------------------------------------------------------------------------- settings
    def make_scheduler(self, name: str):
        if name not in SCHEDULERS:
            raise PMFInputError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULERS)})")
        return make_scheduler(name, self.scheduler_config)

    @staticmethod
    def check_common(num_inference_steps, num_images, output_type):
        def positive(v):
            return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1

        if not positive(num_inference_steps):
            raise PMFInputError(f"num_inference_steps={num_inference_steps!r} must be a positive integer")
        if not positive(num_images):
            raise PMFInputError(f"num_images={num_images!r} must be a positive integer")
        if output_type not in OUTPUT_TYPES:
            raise PMFInputError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")

    @staticmethod
    def check_latents(latents, num_images: int, shape) -> Optional[np.ndarray]:
        if latents is None:
            return None
        latents = np.asarray(latents, np.float32)
        if latents.shape != (num_images,) + tuple(shape):
            raise PMFInputError(f"latents have shape {latents.shape}, expected {(num_images,) + tuple(shape)}")
        return latents

    # ------------------------------------------------------------------------------------------------- programs
    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (all static settings and shapes together)."""
        return sum(p._cache_size() for programs in self._programs.values() for p in programs)

    def _get_programs(self, static):
        if static not in self._programs:
            mesh = common.batch_mesh()
            self._programs[static] = tuple(common.jit_on_mesh(fn, mesh) for fn in (
                lambda *a: self._prologue(static, *a), lambda *a: self._loop(static, *a),
                lambda *a: self._epilogue(static, *a)))
        return self._programs[static]

    def _prologue(self, static, params, batch, scalars):
        """-> ((scheduler state, x_T · init_noise_sigma), extras)."""
        keys = common.row_keys(batch["seeds"], batch["rows"])
        x_T = batch["latents"] if "latents" in batch else common.row_normal(keys, 0, static.latent_shape)
        state = static.scheduler.init_state(static.steps, x_T)
        x = (x_T * state.init_noise_sigma).astype(x_T.dtype)
        return (state, x), self._extras(static, params, batch, scalars)

    def _loop(self, static, params, batch, scalars, extras, carry, start, stop):
        """Denoising steps [start, stop) (traced bounds): x = step(model(scale_model_input(x), t_i), x)."""
        sched = static.scheduler
        keys = common.row_keys(batch["seeds"], batch["rows"])

        def body(i, carry):
            state, x = carry
            out = self._model_fn(static, params, batch, scalars, extras, sched.scale_model_input(state, x),
                                 state.timesteps[i])
            # stochastic samplers (DDPM): step i draws from stream 1 + i of each image's key
            noise = common.row_normal(keys, 1 + i, x.shape[1:], x.dtype) if sched.NEEDS_NOISE else None
            return sched.step(state, out, x, noise=noise)

        return jax.lax.fori_loop(start, stop, body, carry)

    def _epilogue(self, static, params, carry):
        x = carry[1]
        if static.output_type == "latent":
            return x
        return common.vae_decode(self.vae, params["vae"], x)

    def _extras(self, static, params, batch, scalars):  # pragma: no cover - abstract
        raise NotImplementedError

    def _model_fn(self, static, params, batch, scalars, extras, x, t):  # pragma: no cover - abstract
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------------- running
    def _run(self, static, batch: Dict[str, np.ndarray], scalars: Dict[str, Any], *, progress: bool,
             desc: str) -> np.ndarray:
        """Pads the batch to the device count, places it, runs the programs for ``static``; returns N rows.

        ``batch`` holds [N, ...] host arrays, among them ``seeds`` [N] uint32 and ``rows`` [N] int32
        (:func:`~pmf_jax.pipelines.common.as_seed_list`); ``scalars`` the traced scalars (guidance scales)."""
        from pmf_jax.parallel import num_batch_shards

        mesh = common.batch_mesh()
        batch, n = common.pad_batch(batch, num_batch_shards(mesh))
        if self._placed is None:
            self._placed = common.place_replicated(self.params, mesh)
        params, batch = self._placed, common.place_batch(batch, mesh)
        scalars = common.place_replicated(scalars, mesh)
        prologue, loop, epilogue = self._get_programs(static)
        carry, extras = prologue(params, batch, scalars)
        steps = static.steps
        if progress:
            from tqdm.auto import tqdm

            with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:
                for i in range(steps):
                    carry = jax.block_until_ready(loop(params, batch, scalars, extras, carry, np.int32(i),
                                                       np.int32(i + 1)))
                    bar.update(1)
        else:
            carry = loop(params, batch, scalars, extras, carry, np.int32(0), np.int32(steps))
        out = np.asarray(jax.device_get(epilogue(params, carry)))
        return out[:n]

    @staticmethod
    def _format(out: np.ndarray, output_type: str):
        if output_type == "pil":
            return [to_pil(image) for image in out]
        return out


__all__ = ["OUTPUT_TYPES", "SamplingPipeline"]
