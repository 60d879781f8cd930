"""The machinery both sampling pipelines share: pure programs per static setting, jitted data parallel, replicated
parameters, batch padding to the device count, the denoising loop, the progress bar and a compilation counter.

Three programs per static setting (:meth:`SamplingPipeline.programs`; jitted on the batch mesh by
:meth:`SamplingPipeline.jitted_programs`):
  * ``prologue(params, batch, scalars) -> (carry, extras)``: initial noise, scheduler state, what every step reuses
    (image latents, a reference bank written once);
  * ``loop(params, batch, scalars, extras, carry, start, stop) -> carry``: steps ``[start, stop)`` as one
    ``lax.fori_loop`` (:meth:`~pmf_jax.schedulers.Scheduler.denoise`); without a progress bar it runs once over all
    steps, so the whole denoising loop is one dispatch of one compiled program; with a progress bar the *same*
    program runs one step per call (identical numbers, and no host callback in the program: JAX's persistent cache
    refuses programs with callbacks, so a ``jax.debug.callback`` bar would make every CLI run recompile); a pipeline
    whose :meth:`SamplingPipeline.after_step` gives a hook for a static setting gets it called after every step (a
    masked edit's blend), the others run the scheduler's loop untouched;
  * ``epilogue(params, carry) -> output``: VAE decode (or the latents).

What is static (new programs): the scheduler and its number of steps, the guidance layout (rows), the reference
settings, the output kind, the batch size and resolution. What is traced (no recompilation): the parameters, prompts
(their embeddings), the seed, every guidance scale and the ControlNet scale.

Before the first run of a static setting and batch shape, :meth:`SamplingPipeline.check_memory` compiles the three
programs ahead of time (the run then reuses them) and compares what they hold with the device's memory
(:mod:`pmf_jax.pipelines.memory`): a call that cannot fit is a one-line error that suggests a size that fits, not an
out-of-memory crash halfway.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Hashable, NamedTuple, Optional, Tuple

import jax
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines import common
from pmf_jax.pipelines.finite_output import check_finite_output
from pmf_jax.pipelines.images import to_pil
from pmf_jax.schedulers import SCHEDULERS, Scheduler, make_scheduler
from pmf_jax.schedulers import noise as noise_lib

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass(frozen=True)
class SamplingStatic:
    """What one set of compiled programs is specialised on (hashable); the pipelines extend it."""

    scheduler: Scheduler
    steps: int
    latent_shape: Tuple[int, int, int]          # (h, w, C)
    output_type: str


class Programs(NamedTuple):
    """The three programs of one static setting (pure functions, or their jitted versions)."""

    prologue: Callable   # (params, batch, scalars) -> ((scheduler state, x), extras)
    loop: Callable       # (params, batch, scalars, extras, carry, start, stop) -> carry
    epilogue: Callable   # (params, carry) -> images [N, H, W, 3] in [0, 1], or the latents [N, h, w, C]


class SamplingPipeline:
    """Base class. Subclasses set ``self.params`` (a dict of parameter trees) and ``self.vae``, and implement, as
    pure functions of a :class:`SamplingStatic` and a batch (a pytree dataclass with ``seeds`` [N] uint32, ``rows``
    [N] int32 and optional ``latents`` [N, h, w, C]):
    ``precompute(static, params, batch, scalars) -> extras`` (what every step reuses) and
    ``model_fn(static, params, batch, scalars, extras, x, t) -> the guided model output [N, h, w, C]``."""

    def __init__(self, scheduler_config: Optional[Dict[str, Any]] = None):
        #: The diffusers scheduler config (noise schedule) every sampler is built from; edit it to change e.g.
        #: ``timestep_spacing``.
        self.scheduler_config = dict(scheduler_config or {})
        self.params: Dict[str, Any] = {}
        self._jitted: Dict[Hashable, Programs] = {}
        self._placed = None
        self._traces = 0
        self._memory_checked = set()

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

    # ------------------------------------------------------------------------------------------------ parameters
    def set_params(self, params: Dict[str, Any]) -> None:
        """Replaces the parameter trees (same structure, shapes and dtypes: the compiled programs are reused)."""
        self.params = dict(params)
        self._placed = None

    def placed_params(self):
        """The parameters as the programs take them: replicated over the batch mesh (placed once, then reused)."""
        if self._placed is None:
            self._placed = common.place_replicated(self.params, common.batch_mesh())
        return self._placed

    # ------------------------------------------------------------------------------------------------- programs
    def precompute(self, static, params, batch, scalars):  # pragma: no cover - abstract
        raise NotImplementedError

    def model_fn(self, static, params, batch, scalars, extras, x, t):  # pragma: no cover - abstract
        raise NotImplementedError

    def prologue(self, static, params, batch, scalars):
        """-> ((scheduler state, x_T · init_noise_sigma), extras); x_T [N, h, w, C] from stream 0 of each image's
        key (:mod:`pmf_jax.schedulers.noise`) unless the batch holds ``latents``."""
        keys = noise_lib.row_keys(batch.seeds, batch.rows)
        x_T = (batch.latents if batch.latents is not None
               else noise_lib.row_normal(keys, noise_lib.INITIAL_STREAM, static.latent_shape))
        state = static.scheduler.init_state(static.steps, x_T)
        x = (x_T * state.init_noise_sigma).astype(x_T.dtype)
        return (state, x), self.precompute(static, params, batch, scalars)

    def after_step(self, static) -> Optional[Callable]:
        """The per-step seam of the loop: None (the default: the loop is the scheduler's own ``fori_loop``, untouched),
        or ``hook(params, batch, scalars, extras, carry) -> carry``, called after every step with ``carry`` =
        (scheduler state advanced past the step, x [N, h, w, C]); what it returns starts the next step (e.g. a
        masked edit blending the kept region back in: :class:`~pmf_jax.pipelines.EnhancePipeline`). Decided per
        static setting; whatever it reads is traced (batch, scalars, extras), so it compiles once like the rest."""
        return None

    def loop(self, static, params, batch, scalars, extras, carry, start, stop):
        """Denoising steps [start, stop) (traced bounds) of :meth:`model_fn` -> the carry; with an
        :meth:`after_step` hook, each step is the scheduler's own one-step loop followed by the hook."""
        keys = noise_lib.row_keys(batch.seeds, batch.rows)

        def model(x, t):
            return self.model_fn(static, params, batch, scalars, extras, x, t)

        hook = self.after_step(static)
        if hook is None:
            return static.scheduler.denoise(model, carry, start, stop, keys=keys)

        def body(i, carry):  # step i exactly as denoise runs it (its noise stream included), then the hook
            carry = static.scheduler.denoise(model, carry, i, i + 1, keys=keys)
            return hook(params, batch, scalars, extras, carry)

        return jax.lax.fori_loop(start, stop, body, carry)

    def epilogue(self, static, params, carry):
        """-> images [N, H, W, 3] in [0, 1] (VAE decode), or the latents [N, h, w, C] for output_type "latent"."""
        x = carry[1]
        if static.output_type == "latent":
            return x
        return common.vae_decode(self.vae, params["vae"], x)

    def programs(self, static) -> Programs:
        """The three pure programs of ``static`` (jit them with your own mesh, e.g. for ahead-of-time compiles)."""

        def prologue(params, batch, scalars):
            return self.prologue(static, params, batch, scalars)

        def loop(params, batch, scalars, extras, carry, start, stop):
            return self.loop(static, params, batch, scalars, extras, carry, start, stop)

        def epilogue(params, carry):
            return self.epilogue(static, params, carry)

        return Programs(prologue, loop, epilogue)

    def jitted_programs(self, static) -> Programs:
        """The programs of ``static`` jitted on the batch mesh (built once per static setting)."""
        if static not in self._jitted:
            mesh = common.batch_mesh()
            self._jitted[static] = Programs(*(common.jit_on_mesh(self._counted(fn), mesh)
                                              for fn in self.programs(static)))
        return self._jitted[static]

    def _counted(self, fn):
        def traced(*args):  # runs once per new program (a trace), never in the compiled code
            self._traces += 1
            return fn(*args)

        traced.__name__ = fn.__name__
        return traced

    def compiled_programs(self) -> int:
        """How many programs have been traced and compiled so far (all static settings and shapes together)."""
        return self._traces

    # --------------------------------------------------------------------------------------------------- running
    def run_programs(self, static, batch, scalars: Dict[str, Any], *, progress: bool = False,
                     desc: str = "sampling") -> np.ndarray:
        """Pads ``batch`` (host arrays [N, ...]) to the device count, places it, runs the programs of ``static``;
        returns the N outputs (host array; PMFInputError if one holds NaN or Inf). ``scalars``: the traced scalars
        (guidance scales). ``progress``: True: a progress bar; a callable ``(steps done, steps)``: called after each
        step instead (e.g. a server reporting to its page); either way the same loop program runs one step per
        call."""
        from pmf_jax.parallel import num_batch_shards

        mesh = common.batch_mesh()
        batch, n = common.pad_batch(batch, num_batch_shards(mesh))
        params, batch = self.placed_params(), common.place_batch(batch, mesh)
        scalars = common.place_replicated(scalars, mesh)
        self.check_memory(static, params, batch, scalars, n)
        prologue, loop, epilogue = self.jitted_programs(static)
        try:
            carry, extras = prologue(params, batch, scalars)
            steps = static.steps
            if progress:
                from pmf_jax.progress import bar as progress_bar

                on_step = progress if callable(progress) else None
                with contextlib.nullcontext() if on_step else progress_bar(total=steps, desc=desc, unit="step",
                                                                           leave=False) as bar:
                    for i in range(steps):
                        carry = jax.block_until_ready(loop(params, batch, scalars, extras, carry, np.int32(i),
                                                           np.int32(i + 1)))
                        if on_step:
                            on_step(i + 1, steps)
                        else:
                            bar.update(1)
            else:
                carry = loop(params, batch, scalars, extras, carry, np.int32(0), np.int32(steps))
            out = np.asarray(jax.device_get(epilogue(params, carry)))
        except jax.errors.JaxRuntimeError as err:
            raise _out_of_memory(err) from None
        check_finite_output(out[:n], desc)
        return out[:n]

    def check_memory(self, static, params, batch, scalars, num_images: int) -> None:
        """Compiles the programs of ``static`` for these (placed) inputs ahead of time — the run reuses them — and
        raises a one-line :class:`~pmf_jax.errors.PMFInputError` when the largest one needs more memory per device
        than there is (:mod:`pmf_jax.pipelines.memory`). Once per static setting and batch shape."""
        from pmf_jax.pipelines import memory

        key = (static, jax.tree_util.tree_structure(batch),
               tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(batch)))
        if key in self._memory_checked:
            return
        programs = self.jitted_programs(static)
        step = jax.ShapeDtypeStruct((), np.int32)
        try:
            prologue = programs.prologue.lower(params, batch, scalars).compile()
            carry, extras = prologue.out_info
            loop = programs.loop.lower(params, batch, scalars, extras, carry, step, step).compile()
            epilogue = programs.epilogue.lower(params, loop.out_info).compile()
        except jax.errors.JaxRuntimeError as err:
            raise _out_of_memory(err) from None
        need = max(memory.program_bytes(c, jax.default_backend()) for c in (prologue, loop, epilogue))
        nbytes = lambda tree: sum(a.nbytes for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
        # each device holds all the (replicated) parameters and its share of the batch
        fixed = nbytes(params)
        resident = fixed + nbytes(batch) // max(1, jax.local_device_count())
        have, where = memory.available_bytes(jax.local_devices(), resident)
        factor = common.vae_factor(self.vae)
        size = (static.latent_shape[0] * factor, static.latent_shape[1] * factor)
        memory.check_fits(need, have, where, size=size, num_images=num_images, fixed=fixed,
                          multiple=int(np.lcm(8, factor)))
        self._memory_checked.add(key)

    @staticmethod
    def format_output(out: np.ndarray, output_type: str):
        if output_type == "pil":
            return [to_pil(image) for image in out]
        return out


def _out_of_memory(err: Exception) -> Exception:
    """An XLA error at run time: RESOURCE_EXHAUSTED (the memory check's estimate fell short) as one line; others as
    they are."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return err
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return PMFInputError(f"sampling ran out of device memory ({first[:200]}); try a smaller --height/--width or "
                         f"fewer images")


__all__ = ["OUTPUT_TYPES", "Programs", "SamplingPipeline", "SamplingStatic"]
