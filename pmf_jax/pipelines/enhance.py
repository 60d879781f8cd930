"""Text-guided enhancement: InstructPix2Pix (edit an image by an instruction), as diffusers'
``StableDiffusionInstructPix2PixPipeline`` computes it.

The UNet takes ``concat([noisy latent, image latent], channels)`` (8 channels for SD). The image latent is the VAE
posterior *mode, unscaled* (diffusers does not apply ``scaling_factor`` to it). Three guidance rows per sample,
in diffusers' order: ``[text + image, negative + image, negative + zeros]``, combined as

    ε = ε_uncond + guidance_scale · (ε_text − ε_image) + image_guidance_scale · (ε_image − ε_uncond)

(ε_text: row 0, ε_image: row 1, ε_uncond: row 2). Unlike diffusers, guidance is always on (a scale of 1 is
plain conditioning), so changing a scale never changes the program. A model without a text encoder has one fixed
context, so its text row would equal its image row: it computes the two rows ``[negative + image, negative + zeros]``
and ``ε = ε_uncond + image_guidance_scale · (ε_image − ε_uncond)`` (the same result; ``guidance_scale`` changes
nothing there).

**Masked edits** (``mask=``, :mod:`pmf_jax.pipelines.enhance_mask` for the modes): only the mask's region is
edited. After every step the latents outside the mask are replaced by the input's own latent (VAE posterior mean,
scaled as the diffusion latents are) noised to the level of the sample the step produced (the initial noise x_T as
ε, as diffusers' inpainting does with a plain UNet: :func:`kept_latents`), and after the last step by the clean
latent: outside the mask the result is the input up to the VAE round trip (and the decoder's reach across the
mask's border). The blend runs in :meth:`~pmf_jax.pipelines.base.SamplingPipeline.after_step`, the loop's per-step
seam; the mask is batch data, so a new mask, instruction or scale compiles nothing. Without a mask the programs are
the unmasked ones (no hook).

The ``attention`` mask takes **two passes**: the unmasked edit first, reading where the instruction's words attend
in every cross-attention layer at every step (:mod:`pmf_jax.pipelines.cross_attention`, averaged over steps, heads
and layers, from the text row), then the masked edit with that map thresholded
(:func:`~pmf_jax.pipelines.enhance_mask.threshold_map`). Two passes, not one with a running map, because the mask
then is one fixed region for the whole masked pass: every step blends the same cells, and the mask the call returns
is exactly the region that was edited (a running map starts from the maps of nearly pure noise and moves, so cells
would switch between edited and kept). The price is a second sampling run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax import constants, rows as rows_lib
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines import common
from pmf_jax.pipelines.base import SamplingPipeline, SamplingStatic
from pmf_jax.pipelines.cross_attention import unet_with_word_map, word_weights
from pmf_jax.pipelines.defaults import size_of
from pmf_jax.pipelines.enhance_mask import (latent_mask, mask_kind, person_mask, pixel_mask, read_user_mask,
                                            threshold_map)
from pmf_jax.pipelines.images import content_box, fit_image, load_image, resolve_size, to_float
from pmf_jax.schedulers import EulerDiscreteScheduler, Scheduler
from pmf_jax.schedulers import noise as noise_lib

ROWS = 3  # [text + image, negative + image, negative + zeros]; without a text encoder the first is left out
# EnhanceStatic.mask: "none" (the whole image, no hook), "blend" (outside batch.mask the input is blended back after
# every step), "attention_map" (the unmasked edit, returning the instruction's word map instead of images)
MASK_PROGRAMS = ("none", "blend", "attention_map")


@dataclasses.dataclass(frozen=True)
class EnhanceStatic(SamplingStatic):
    """:class:`~pmf_jax.pipelines.base.SamplingStatic` plus whether the text row is computed (False for a model
    without a text encoder) and the mask program (one of :data:`MASK_PROGRAMS`)."""

    text: bool = True
    mask: str = "none"

    @property
    def rows(self) -> int:
        return ROWS if self.text else ROWS - 1


@flax.struct.dataclass
class EnhanceBatch:
    """The N images of one call: seeds [N] uint32 and rows [N] int32 (noise keys,
    :func:`pmf_jax.schedulers.noise.row_keys`), image [N, H, W, 3] float32 in [0, 1], context [N, 3, T, D] float32
    (the three guidance rows' text contexts), latents None or [N, h, w, C] float32 x_T, mask None or [N, h, w, 1]
    float32 latent cells (1 = edit; static mask "blend"), words None or [N, T] float32 the instruction's word tokens
    (static mask "attention_map", :func:`~pmf_jax.pipelines.cross_attention.word_weights`)."""

    seeds: Any
    rows: Any
    image: Any
    context: Any
    latents: Any = None
    mask: Any = None
    words: Any = None


class EnhancePipeline(SamplingPipeline):
    """InstructPix2Pix: ``EnhancePipeline(unet=(unet, p), vae=(vae, p) or None, text_encoder=(clip, p) or None,
    tokenizer=..., scheduler_config={...})`` or :meth:`from_pretrained` (a diffusers InstructPix2Pix folder)."""

    def __init__(self, unet, vae=None, text_encoder=None, tokenizer=None, scheduler_config=None, context=None,
                 native_size: Optional[Tuple[int, int]] = None):
        super().__init__(scheduler_config)
        if vae is None:
            from pmf_jax.models.identity_vae import IdentityAutoencoder

            vae = (IdentityAutoencoder(), {})
        (self.unet, p_unet), (self.vae, p_vae) = unet, vae
        channels = self.vae.latent_channels
        if self.unet.in_channels != 2 * channels:
            raise PMFInputError(f"an InstructPix2Pix UNet takes noisy latent + image latent: in_channels must be "
                                f"{2 * channels}, this one has {self.unet.in_channels}")
        self.params = {"unet": p_unet, "vae": p_vae}
        #: (H, W) of a call without height/width (:func:`pmf_jax.pipelines.images.resolve_size`), None: unknown.
        self.native_size = native_size or size_of(self.unet.sample_size, common.vae_factor(self.vae))
        dim = self.unet.cross_attention_dim
        self.prompts = common.PromptEncoder(
            tokenizer, *(text_encoder or (None, None)), context=context,
            cross_attention_dim=dim if isinstance(dim, int) else dim[0])

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=None, *, attention_backend: str = "auto", revision=None,
                        allow_pickle: bool = False):
        """Loads a diffusers InstructPix2Pix folder; ``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`."""
        from pmf_jax.io.hub import resolve_folder
        from pmf_jax.pipelines.defaults import native_size
        from pmf_jax.pipelines.loading import load_sd_parts

        folder = resolve_folder(path_or_id, revision=revision)
        parts = load_sd_parts(folder, dtype=common.resolve_dtype(dtype), attention_backend=attention_backend,
                              allow_pickle=allow_pickle)
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                   parts["scheduler_config"], native_size=native_size(folder))

    def prepare_image(self, image, height: Optional[int] = None, width: Optional[int] = None, fit: str = "pad"):
        """``(uint8 [H, W, 3] fitted input, FitTransform)``; (H, W) given, else :attr:`native_size` (models trained
        at 512 or more: the image's resolution bucket; :func:`~pmf_jax.pipelines.images.resolve_size`)."""
        image = load_image(image, "image")
        size = resolve_size(image.shape, height, width, self.native_size)
        factor = common.vae_factor(self.vae)
        if size[0] % factor or size[1] % factor:
            raise PMFInputError(f"height={size[0]} and width={size[1]} must be multiples of {factor}")
        return fit_image(image, size, fit)

    def __call__(self, image, instruction="", negative_prompt="", num_inference_steps: int = constants.DEFAULT_STEPS,
                 guidance_scale: float = constants.DEFAULT_GUIDANCE_SCALE, image_guidance_scale: float = 1.5,
                 scheduler: str = constants.DEFAULT_SCHEDULER,
                 height: Optional[int] = None, width: Optional[int] = None, num_images: int = 1, seed=0,
                 fit: str = "pad", latents=None, output_type: str = "pil", crop: bool = True, mask=None, pose=None,
                 return_mask: bool = False, progress=False):
        """Edits ``image`` following ``instruction``.

        Args:
          image: path, PIL image or array [H0, W0, 3] — or a list of P of them (edited in one batch, N = P ·
            num_images images, image-major); fitted to (height, width) (default: :attr:`native_size`, or the first
            image's bucket) by ``fit`` ("pad": letterbox with repeated border pixels, "crop": centre crop).
          instruction, negative_prompt: a string, or one per image (N).
          guidance_scale, image_guidance_scale: text and image guidance (formula in the module docstring).
          seed: one int, or one per image (as :class:`~pmf_jax.pipelines.RetargetPipeline`).
          latents: optional x_T [N, H/f, W/f, C].
          output_type: "pil", "np" (float32 [N, H, W, 3] in [0, 1]; a list of arrays when cropping gives the
            images different sizes) or "latent".
          crop: cut the letterbox padding off the PIL / np outputs (the content box of the input).
          mask: where to edit (module docstring; :mod:`pmf_jax.pipelines.enhance_mask`): None or "none" (the whole
            image: the unmasked programs, the same numbers as without the argument), "person" (the pose's skeleton,
            dilated; needs ``pose``), "attention" (where the instruction's words attend; a second sampling pass),
            or a user mask (path, PIL image or array, white = edit; or a list of P, one per image) of its image's
            size or aspect ratio, fitted as the image is.
          pose: for mask "person": the target pose of each image (one shared, or a list of P): a
            ``pmf_jax.pose.inputs.PoseCondition`` of the output size (used as is) or anything
            :func:`pmf_jax.pose.inputs.resolve_pose` reads, fitted as the image is.
          return_mask: also return the masks: ``(images, masks)``, masks as PIL "L" images (255 = edited) for
            "pil", else bool [H, W] arrays; the mask as applied (the latent grid's cells in pixels), cropped as the
            images; all True without a mask.
          progress: a progress bar per sampling pass (pmf_jax.progress), or a callable ``(steps done, steps)``.
        """
        self.check_common(num_inference_steps, num_images, output_type)
        kind = mask_kind(mask)
        if kind == "person" and pose is None:
            raise PMFInputError("mask 'person' needs the target pose (pose=)")
        if kind != "person" and pose is not None:
            raise PMFInputError("pose= is only used by mask 'person'")
        if kind == "attention" and self.prompts.text_encoder is None:
            raise PMFInputError("mask 'attention' reads where the instruction's words attend: this model has no text "
                                "encoder")
        sched = self.make_scheduler(scheduler)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise PMFInputError("image: got an empty list")
        loaded = [load_image(im, "image") for im in images]
        size = resolve_size(loaded[0].shape, height, width, self.native_size)
        fitted = [self.prepare_image(im, *size, fit=fit) for im in loaded]
        n = len(fitted) * num_images
        static = self.make_static(size, num_inference_steps=num_inference_steps, scheduler=sched,
                                  output_type=output_type, mask="none" if kind == "none" else "blend")
        latents = self.check_latents(latents, n, static.latent_shape)
        prompts = common.as_prompt_list(instruction, n, "instruction")
        negatives = common.as_prompt_list(negative_prompt, n, "negative_prompt")
        factor = common.vae_factor(self.vae)
        cells = None
        if kind in ("person", "user"):  # before any program runs: a bad mask or pose is an input error
            pixels = self.input_masks(kind, mask, pose, loaded, size, fit)
            cells = np.repeat(np.stack([latent_mask(m, factor) for m in pixels]), num_images, 0)
        embedded = self.prompts(prompts + negatives)
        pos, neg = embedded[:n], embedded[n:]
        seeds, seed_rows = common.as_seed_list(seed, n)
        batch = EnhanceBatch(seeds=seeds, rows=seed_rows,
                             image=np.repeat(np.stack([to_float(px) for px, _ in fitted]), num_images, 0),
                             context=np.stack(([pos] if static.text else []) + [neg, neg], axis=1), latents=latents)
        scalars = {"guidance": np.float32(guidance_scale), "image_guidance": np.float32(image_guidance_scale)}
        if kind == "attention":
            words = word_weights(self.prompts.tokenizer, prompts)
            maps = self.run_programs(dataclasses.replace(static, mask="attention_map"), batch.replace(words=words),
                                     scalars, progress=progress, desc="enhance (attention map)")
            cells = threshold_map(maps)
        if cells is not None:
            batch = batch.replace(mask=cells)
        out = self.run_programs(static, batch, scalars, progress=progress, desc="enhance")
        boxes = [content_box(transform) for _, transform in fitted for _ in range(num_images)]
        if not crop or output_type == "latent":
            boxes = [(0, 0, size[1], size[0])] * n
        out = _cropped(out, boxes) if output_type != "latent" else out
        images_out = self.format_output(out, output_type)
        if not return_mask:
            return images_out
        grid = np.ones((n,) + static.latent_shape[:2], bool) if cells is None else cells[..., 0] > 0.5
        masks = _cropped(np.stack([pixel_mask(g, factor) for g in grid]), boxes)
        if output_type == "pil":
            from PIL import Image

            masks = [Image.fromarray(m.astype(np.uint8) * 255, "L") for m in masks]
        return images_out, masks

    def input_masks(self, kind: str, mask, pose, images, size, fit: str):
        """The pixel masks (bool [H, W], one per input image) of a "person" or "user" ``mask`` (see
        :meth:`__call__`); ``images``: the P loaded inputs (uint8 [H0, W0, 3]), fitted to ``size`` by ``fit``."""
        p = len(images)

        def per_image(value, name):
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) not in (1, p):
                raise PMFInputError(f"{name}: got {len(values)} for {p} images (give one, or one per image)")
            return values * (p // len(values))

        if kind == "person":
            from pmf_jax.pose.inputs import resolve_pose

            return [person_mask(resolve_pose(q, size, fit).image) for q in per_image(pose, "pose")]
        return [read_user_mask(m, im.shape, size, fit) for m, im in zip(per_image(mask, "mask"), images)]

    def make_static(self, size, *, num_inference_steps: int = constants.DEFAULT_STEPS,
                    scheduler: Union[str, Scheduler] = constants.DEFAULT_SCHEDULER,
                    output_type: str = "pil", mask: str = "none") -> EnhanceStatic:
        """The static settings of a call at ``size`` (H, W); the text row only for a model with a text encoder;
        ``mask``: one of :data:`MASK_PROGRAMS`."""
        if mask not in MASK_PROGRAMS:
            raise ValueError(f"mask={mask!r} must be one of {MASK_PROGRAMS}")
        sched = self.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        factor = common.vae_factor(self.vae)
        latent_shape = (int(size[0]) // factor, int(size[1]) // factor, self.vae.latent_channels)
        return EnhanceStatic(sched, int(num_inference_steps), latent_shape, output_type,
                             text=self.prompts.text_encoder is not None, mask=mask)

    # ------------------------------------------------------------------------------------------ the programs
    def precompute(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars):
        """The image latents of the G rows [N·G, h, w, C]: (mode, mode, zeros) per sample, unscaled ((mode, zeros)
        without the text row); for a masked edit also the input's latent scaled as the diffusion latents ("clean")
        and x_T's unit noise ("noise"), both [N, h, w, C]."""
        mode = common.vae_encode(self.vae, params["vae"], batch.image * 2.0 - 1.0, scaled=False)
        n, g = mode.shape[0], static.rows
        rows = [mode] * (g - 1) + [jnp.zeros_like(mode)]
        extras = {"image_latents": jnp.stack(rows, axis=1).reshape((g * n,) + mode.shape[1:])}
        if static.mask == "blend":
            shift = getattr(self.vae, "shift_factor", None) or 0.0   # as common.vae_encode scales its mean
            extras["clean"] = (mode - shift) * self.vae.scaling_factor
            extras["noise"] = (batch.latents if batch.latents is not None else noise_lib.row_normal(
                noise_lib.row_keys(batch.seeds, batch.rows), noise_lib.INITIAL_STREAM, static.latent_shape))
        return extras

    def unet_inputs(self, static: EnhanceStatic, batch: EnhanceBatch, extras, x):
        """(UNet input [N·G, h, w, 2C]: the sample beside the rows' image latents, contexts [N·G, T, D])."""
        n, g = x.shape[0], static.rows
        context = batch.context.reshape((g * n,) + batch.context.shape[2:])
        xg = jnp.concatenate([rows_lib.repeat_rows(x, g), extras["image_latents"].astype(x.dtype)], axis=-1)
        return xg, context

    def guide(self, static: EnhanceStatic, eps, scalars):
        """The guided prediction from the G rows' outputs eps [N·G, h, w, C] float32 (module docstring)."""
        if static.text:
            text, image, uncond = rows_lib.split_rows(eps, ROWS)
            return common.nested_guidance(uncond, image, text, scalars["image_guidance"], scalars["guidance"])
        image, uncond = rows_lib.split_rows(eps, ROWS - 1)
        return common.cfg(uncond, image, scalars["image_guidance"])

    def model_fn(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars, extras, x, t):
        """The guided prediction (module docstring): x [N, h, w, C] scaled model input, t [] -> [N, h, w, C]."""
        xg, context = self.unet_inputs(static, batch, extras, x)
        eps = self.unet.apply({"params": params["unet"]}, xg, t, context).astype(jnp.float32)
        return self.guide(static, eps, scalars).astype(x.dtype)

    def after_step(self, static: EnhanceStatic):
        """Mask "blend": after each step, outside ``batch.mask`` the sample becomes :func:`kept_latents`."""
        if static.mask != "blend":
            return None

        def blend(params, batch, scalars, extras, carry):
            state, x = carry
            kept = kept_latents(static.scheduler, state, extras["clean"], extras["noise"]).astype(x.dtype)
            edit = batch.mask.astype(x.dtype)
            return state, edit * x + (1 - edit) * kept

        return blend

    def prologue(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars):
        """The base prologue; the attention-map pass adds its running sum of word maps [N, h, w] to the carry."""
        carry, extras = super().prologue(static, params, batch, scalars)
        if static.mask == "attention_map":
            carry = carry + (jnp.zeros((carry[1].shape[0],) + static.latent_shape[:2], jnp.float32),)
        return carry, extras

    def loop(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars, extras, carry, start, stop):
        """The base loop; the attention-map pass runs each step as the scheduler's one-step loop on a guided
        prediction computed beside its word map (the text row's, :mod:`pmf_jax.pipelines.cross_attention`)."""
        if static.mask != "attention_map":
            return super().loop(static, params, batch, scalars, extras, carry, start, stop)
        keys = noise_lib.row_keys(batch.seeds, batch.rows)
        sched = static.scheduler

        def body(i, carry):
            state, x, total = carry
            xg, context = self.unet_inputs(static, batch, extras, sched.scale_model_input(state, x))
            eps, word_map = unet_with_word_map(self.unet, params["unet"], xg, state.timesteps[i], context,
                                               batch.words, static.rows, static.latent_shape[:2])
            guided = self.guide(static, eps.astype(jnp.float32), scalars).astype(x.dtype)
            state, x = sched.denoise(lambda _x, _t: guided, (state, x), i, i + 1, keys=keys)
            return state, x, total + word_map

        return jax.lax.fori_loop(start, stop, body, carry)

    def epilogue(self, static: EnhanceStatic, params, carry):
        """The base epilogue; the attention-map pass returns its word map averaged over the steps [N, h, w]."""
        if static.mask == "attention_map":
            return carry[2] / static.steps
        return super().epilogue(static, params, carry)


def kept_latents(scheduler: Scheduler, state, clean, noise):
    """What the kept region holds after a step (``state.step_index`` = the next step): the input's latent ``clean``
    [N, h, w, C] noised with ``noise`` to the level of the sample the step produced — ``add_noise`` at the next
    step's timestep for the variance-preserving samplers (as diffusers' inpainting), ``clean + σ · noise`` for Euler,
    whose samples carry the factor sqrt(σ² + 1) —, and ``clean`` itself after the last step."""
    nxt, steps = state.step_index, state.timesteps.shape[0]
    at = jnp.minimum(nxt, steps - 1)
    if isinstance(scheduler, EulerDiscreteScheduler):
        noised = clean + state.tables["sigma"][at].astype(clean.dtype) * noise
    else:
        noised = scheduler.add_noise(clean, noise.astype(clean.dtype), state.timesteps[at])
    return jnp.where(nxt >= steps, clean, noised)


def _cropped(out, boxes):
    """out [N, H, W, ...] cut to each image's (left, top, right, bottom) box: an array when the boxes agree, else a
    list."""
    if len(set(boxes)) == 1:
        left, top, right, bottom = boxes[0]
        return out[:, top:bottom, left:right]
    return [image[top:bottom, left:right] for image, (left, top, right, bottom) in zip(out, boxes)]


__all__ = ["EnhanceBatch", "EnhancePipeline", "EnhanceStatic", "MASK_PROGRAMS", "kept_latents"]
