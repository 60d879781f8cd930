"""What every scheduler shares: config parsing, the state pytree, the sampling loop and the training-side helpers.

A scheduler is a frozen (hashable) dataclass whose fields are the diffusers ``scheduler_config.json`` keys it
implements, so it can be a static argument of ``jax.jit``. Sampling is split in two:

- **planning** (host, numpy, once per number of steps): the timesteps and every per-step coefficient the update
  needs, written into a :class:`SchedulerState` (``init_state``);
- **stepping** (traced, elementwise): ``step`` reads row ``state.step_index`` of those tables and combines the
  sample, the model output and the solver history held in the state.

So a whole loop is one ``jax.lax.fori_loop`` and nothing in it depends on Python-side counters.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.schedulers import betas as betas_lib
from pmf_jax.schedulers import noise as noise_lib

# diffusers keys of the schedulers that have dynamic thresholding (Imagen); we only implement it off, and its two
# parameters do nothing while it is off
THRESHOLDING_FIXED = {"thresholding": False}
THRESHOLDING_INERT = ("dynamic_thresholding_ratio", "sample_max_value")


def option(default, *choices):
    """A config field whose value must be one of ``choices`` (the default included)."""
    return dataclasses.field(default=default, metadata={"choices": (default,) + choices})


@flax.struct.dataclass
class SchedulerState:
    """The sampling state, a pytree (jit/scan carry).

    Attributes:
      timesteps: [n] what the model is called with at each step (int32; float32 for Euler, as in diffusers).
      tables: name -> [n] per-step coefficients in the compute dtype (float32, or float64 under x64).
      step_index: [] int32, the step ``step`` takes next.
      memory: solver history, each entry shaped like the sample (previous model outputs / samples).
      init_noise_sigma: [] the factor ``sample`` applies to unit-variance x_T before the first step.
    """
    timesteps: jax.Array
    tables: Dict[str, jax.Array]
    step_index: jax.Array
    memory: Tuple[jax.Array, ...]
    init_noise_sigma: jax.Array

    @property
    def timestep(self) -> jax.Array:
        """[] the timestep of the next step: pass it to the model."""
        return self.timesteps[self.step_index]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``_plan`` returns: host-side numpy tables for ``n`` steps."""
    timesteps: np.ndarray            # [n]
    tables: Dict[str, np.ndarray]   # name -> [n]
    init_noise_sigma: float = 1.0


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """Base class: the diffusers keys every scheduler has (the beta schedule and timestep grid).

    Subclasses set ``DIFFUSERS_CLASS``, redeclare fields whose diffusers default differs, list the diffusers keys
    they accept only at one value in ``FIXED`` and keys with no effect under those values in ``INERT``, and
    implement ``_plan`` (numpy, host) and ``_update`` (jax, traced).
    """
    DIFFUSERS_CLASS: ClassVar[str] = ""
    FIXED: ClassVar[Mapping[str, Any]] = {}
    INERT: ClassVar[Tuple[str, ...]] = ()
    ALIASES: ClassVar[Mapping[str, Mapping[Any, Any]]] = {}   # key -> {value diffusers rewrites: value it uses}
    MEMORY: ClassVar[int] = 0          # how many sample-shaped arrays of history the solver keeps
    NEEDS_NOISE: ClassVar[bool] = False

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = option("linear", "scaled_linear", "squaredcos_cap_v2")
    trained_betas: Optional[Tuple[float, ...]] = dataclasses.field(default=None, repr=False)  # [T] explicit β
    prediction_type: str = option("epsilon", "sample", "v_prediction")
    timestep_spacing: str = option("linspace", "leading", "trailing")
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    # ---- config -------------------------------------------------------------------------------------------------
    @classmethod
    def config_keys(cls) -> frozenset:
        """Every diffusers config key of ``DIFFUSERS_CLASS`` (implemented, fixed-value and inert ones)."""
        return frozenset(f.name for f in dataclasses.fields(cls)) | set(cls.FIXED) | set(cls.INERT)

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None):
        """Builds the scheduler from a ``scheduler_config.json`` dict of *this* class (strict).

        Keys starting with ``_`` are metadata and skipped. Unknown keys, values of the wrong type, values outside
        a key's choices, and values we do not implement for ``FIXED`` keys raise one :class:`PMFInputError`
        naming all of them. ``make_scheduler`` is the lenient entry point for configs of other classes.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs, problems = {}, []
        for key, value in (config or {}).items():
            if key.startswith("_") or key in cls.INERT:
                continue
            value = cls.ALIASES.get(key, {}).get(value, value) if _is_hashable(value) else value
            if key in cls.FIXED:
                if value != cls.FIXED[key]:
                    problems.append(f"{key}={value!r} (only {cls.FIXED[key]!r} is implemented)")
            elif key in fields:
                try:
                    kwargs[key] = _coerce(key, value, hints[key], fields[key].metadata.get("choices"))
                except PMFInputError as err:
                    problems.append(str(err))
            else:
                problems.append(f"{key!r} is not a {cls.DIFFUSERS_CLASS} config key")
        if problems:
            raise PMFInputError(f"scheduler config for {cls.DIFFUSERS_CLASS}: " + "; ".join(problems))
        return cls(**kwargs)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise PMFInputError(f"{f.name}={getattr(self, f.name)!r} is not implemented (choose one of "
                                    f"{', '.join(map(repr, choices))})")
        self._validate()

    def _validate(self) -> None:
        """Cross-key checks; subclasses extend."""
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise PMFInputError(f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps="
                                f"{self.num_train_timesteps}")
        if self.num_train_timesteps < 2:
            raise PMFInputError(f"num_train_timesteps={self.num_train_timesteps} must be at least 2")

    # ---- training tables ----------------------------------------------------------------------------------------
    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t, float32 [T] (before the zero-SNR clamp the σ-based schedulers apply)."""
        betas = betas_lib.make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
                                     self.trained_betas)
        return betas_lib.make_alphas_cumprod(betas, self.rescale_betas_zero_snr)

    def _gather(self, table: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
        """table[t] for t of shape [] or [B], broadcast against ``like`` [B, ...]; float32."""
        values = jnp.asarray(table, jnp.float32)[jnp.asarray(t)].reshape(-1)
        return values.reshape(values.shape + (1,) * (like.ndim - 1)) if like.ndim else values.reshape(())

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """Forward process x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (the training noising, for every scheduler).

        Args: x0, noise: [B, H, W, C] (any shape with the batch first); t: [B] or [] integer training timesteps.
        Returns: [B, H, W, C] in x0's dtype.
        """
        acp = self._gather(self.alphas_cumprod, t, x0)
        return (jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise).astype(x0.dtype)

    def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """v-prediction target v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (diffusers ``get_velocity``). Shapes as add_noise."""
        acp = self._gather(self.alphas_cumprod, t, x0)
        return (jnp.sqrt(acp) * noise - jnp.sqrt(1 - acp) * x0).astype(x0.dtype)

    def snr(self, t: jax.Array) -> jax.Array:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep (min-SNR loss weighting). t: [B] -> [B] float32."""
        acp = jnp.asarray(self.alphas_cumprod, jnp.float32)[jnp.asarray(t)]
        return acp / (1 - acp)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int) -> np.ndarray:
        """The timesteps of an ``num_steps``-step sampling run, equal to diffusers ``set_timesteps(num_steps)``."""
        return self._plan(self._check_steps(num_steps)).timesteps

    def init_state(self, num_steps: int, sample: jax.Array) -> SchedulerState:
        """Plans ``num_steps`` steps for samples like ``sample`` ([B, H, W, C], any float dtype).

        Coefficients are kept in at least float32 (float64 when x64 is on and the sample is float64).
        """
        plan = self._plan(self._check_steps(num_steps))
        bad = sorted(k for k, v in plan.tables.items() if not np.all(np.isfinite(v)))
        if bad:  # e.g. repeated timesteps (h = 0) on a too-fine multistep grid; diffusers would return NaN
            raise PMFInputError(f"{type(self).__name__} with num_steps={num_steps} has non-finite step coefficients "
                                f"({', '.join(bad)}): the grid repeats timesteps, use fewer steps")
        dtype = jnp.promote_types(sample.dtype, jnp.float32)
        ts_dtype = jnp.float32 if plan.timesteps.dtype.kind == "f" else jnp.int32
        return SchedulerState(
            timesteps=jnp.asarray(plan.timesteps, ts_dtype),
            tables={k: jnp.asarray(v, dtype) for k, v in plan.tables.items()},
            step_index=jnp.zeros((), jnp.int32),
            memory=tuple(jnp.zeros(sample.shape, dtype) for _ in range(self.MEMORY)),
            init_noise_sigma=jnp.asarray(plan.init_noise_sigma, dtype))

    def scale_model_input(self, state: SchedulerState, sample: jax.Array) -> jax.Array:
        """The model input for the current step (identity except for Euler's 1/sqrt(σ² + 1)). [B, H, W, C]."""
        return sample

    def step(self, state: SchedulerState, model_output: jax.Array, sample: jax.Array,
             noise: Optional[jax.Array] = None) -> Tuple[SchedulerState, jax.Array]:
        """One reverse step x_t -> x_{t-1} at ``state.step_index``.

        Args:
          model_output: [B, H, W, C] the model's prediction at (scale_model_input(sample), state.timestep).
          sample: [B, H, W, C] the current sample x_t.
          noise: [B, H, W, C] standard normal noise, needed by stochastic schedulers (DDPM), ignored otherwise.
        Returns:
          (the state advanced by one step, x_{t-1} [B, H, W, C] in the sample's dtype).
        """
        if self.NEEDS_NOISE and noise is None:
            raise PMFInputError(f"{type(self).__name__}.step needs `noise` (standard normal, shaped like the sample)")
        i = state.step_index
        coef = {name: table[i] for name, table in state.tables.items()}
        dtype = state.init_noise_sigma.dtype   # the compute dtype of all tables
        noise = None if noise is None or not self.NEEDS_NOISE else noise.astype(dtype)
        memory, prev = self._update(coef, state.memory, model_output.astype(dtype), sample.astype(dtype), noise)
        return state.replace(step_index=i + 1, memory=memory), prev.astype(sample.dtype)

    def denoise(self, model_fn: Callable[[jax.Array, jax.Array], jax.Array], carry: Tuple[SchedulerState, jax.Array],
                start, stop, *, keys: Optional[jax.Array] = None,
                noise: Optional[jax.Array] = None) -> Tuple[SchedulerState, jax.Array]:
        """Steps ``[start, stop)`` (ints or traced int32 scalars) as one ``fori_loop``: for every step i,
        ``x = step(model_fn(scale_model_input(x), t_i), x)``.

        Args:
          carry: ``(state, x [B, H, W, C])``.
          keys: [B] per-image PRNG keys for stochastic schedulers (DDPM): step i draws stream ``1 + i`` of each
            image's key (:mod:`pmf_jax.schedulers.noise`).
          noise: [n, B, H, W, C] explicit per-step noise instead of ``keys``.
        Returns:
          the carry after step ``stop - 1``.
        """
        def body(i, carry):
            state, x = carry
            out = model_fn(self.scale_model_input(state, x), state.timesteps[i])
            step_noise = None
            if noise is not None:
                step_noise = noise[i]
            elif self.NEEDS_NOISE:
                step_noise = noise_lib.row_normal(keys, noise_lib.step_stream(i), x.shape[1:], x.dtype)
            return self.step(state, out, x, noise=step_noise)

        return jax.lax.fori_loop(start, stop, body, carry)

    def sample(self, model_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array, num_steps: int, *,
               key: Optional[jax.Array] = None, noise: Optional[jax.Array] = None) -> jax.Array:
        """Runs the whole reverse process as one ``fori_loop`` (jit-compatible; call it inside your ``jax.jit``).

        Like a diffusers pipeline: x = x_T · init_noise_sigma, then for every step
        ``x = step(model_fn(scale_model_input(x), t), x)`` (:meth:`denoise`).

        Args:
          model_fn: ``(x [B, H, W, C], t []) -> model output [B, H, W, C]`` (ε, v or x0 per ``prediction_type``).
          x_T: [B, H, W, C] standard normal noise.
          num_steps: number of inference steps (a Python int).
          key: PRNG key for stochastic schedulers (DDPM): one key (image b uses ``fold_in(key, b)``) or [B] keys,
            one per image; step i draws stream ``1 + i`` of each image's key, as the pipelines do
            (:mod:`pmf_jax.schedulers.noise`), so ``key=jax.random.key(seed)`` draws a pipeline's step noise.
          noise: [n, B, H, W, C] explicit per-step noise instead of ``key`` (tests, reproducing torch runs).
        Returns:
          x_0 [B, H, W, C] in x_T's dtype.
        """
        state = self.init_state(num_steps, x_T)
        n = state.timesteps.shape[0]
        if self.NEEDS_NOISE and key is None and noise is None:
            raise PMFInputError(f"{type(self).__name__} sampling is stochastic: pass `key` (or `noise`)")
        if noise is not None and noise.shape != (n,) + x_T.shape:
            raise PMFInputError(f"noise has shape {noise.shape}, expected {(n,) + x_T.shape} (one draw per step)")
        keys = noise_lib.image_keys(key, x_T.shape[0]) if key is not None and noise is None else None
        x = (x_T * state.init_noise_sigma).astype(x_T.dtype)
        _, x = self.denoise(model_fn, (state, x), 0, n, keys=keys, noise=noise)
        return x

    # ---- subclass hooks -----------------------------------------------------------------------------------------
    def _plan(self, num_steps: int) -> Plan:
        raise NotImplementedError

    def _update(self, coef: Dict[str, jax.Array], memory: Tuple[jax.Array, ...], model_output: jax.Array,
                sample: jax.Array, noise: Optional[jax.Array]) -> Tuple[Tuple[jax.Array, ...], jax.Array]:
        raise NotImplementedError

    def _check_steps(self, num_steps) -> int:
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise PMFInputError(f"num_steps={num_steps!r} must be a positive int")
        if num_steps > self.num_train_timesteps:
            raise PMFInputError(f"num_steps={num_steps} exceeds num_train_timesteps={self.num_train_timesteps}")
        return int(num_steps)


def predict_x0(prediction_type: str, model_output, sample, alpha, sigma):
    """x0 from the model output for x_t = α x0 + σ ε (variance-preserving α, σ)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output  # "sample"


def _is_hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _coerce(key: str, value, hint, choices):
    """Checks a JSON value against the field's type hint; lists become tuples (hashable)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PMFInputError(f"{key}={value!r} must be a list")
        return tuple(_coerce(f"{key}[{i}]", v, args[0], None) for i, v in enumerate(value))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise PMFInputError(f"{key}={value!r} must be of type {hint.__name__}")
    if choices is not None and value not in choices:
        raise PMFInputError(f"{key}={value!r} is not implemented (choose one of {', '.join(map(repr, choices))})")
    return int(value) if hint is int else value
