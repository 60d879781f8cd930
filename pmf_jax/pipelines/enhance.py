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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import flax.struct
import jax.numpy as jnp
import numpy as np

from pmf_jax import constants, rows as rows_lib
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines import common
from pmf_jax.pipelines.base import SamplingPipeline, SamplingStatic
from pmf_jax.pipelines.defaults import size_of
from pmf_jax.pipelines.images import content_box, fit_image, load_image, resolve_size, to_float
from pmf_jax.schedulers import Scheduler

ROWS = 3  # [text + image, negative + image, negative + zeros]; without a text encoder the first is left out


@dataclasses.dataclass(frozen=True)
class EnhanceStatic(SamplingStatic):
    """:class:`~pmf_jax.pipelines.base.SamplingStatic` plus whether the text row is computed (False for a model
    without a text encoder)."""

    text: bool = True

    @property
    def rows(self) -> int:
        return ROWS if self.text else ROWS - 1


@flax.struct.dataclass
class EnhanceBatch:
    """The N images of one call: seeds [N] uint32 and rows [N] int32 (noise keys,
    :func:`pmf_jax.schedulers.noise.row_keys`), image [N, H, W, 3] float32 in [0, 1], context [N, 3, T, D] float32
    (the three guidance rows' text contexts), latents None or [N, h, w, C] float32 x_T."""

    seeds: Any
    rows: Any
    image: Any
    context: Any
    latents: Any = None


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
                 fit: str = "pad", latents=None, output_type: str = "pil", crop: bool = True,
                 progress: bool = False):
        """Edits ``image`` following ``instruction``.

        Args:
          image: path, PIL image or array [H0, W0, 3]; fitted to (height, width) (default: :attr:`native_size`, or
            its bucket) by ``fit`` ("pad": letterbox with repeated border pixels, "crop": centre crop).
          guidance_scale, image_guidance_scale: text and image guidance (formula in the module docstring).
          seed: one int, or one per image (as :class:`~pmf_jax.pipelines.RetargetPipeline`).
          latents: optional x_T [num_images, H/f, W/f, C].
          output_type: "pil", "np" (float32 [N, H, W, 3] in [0, 1]) or "latent".
          crop: cut the letterbox padding off the PIL / np outputs (the content box of the input).
        """
        self.check_common(num_inference_steps, num_images, output_type)
        sched = self.make_scheduler(scheduler)
        pixels, transform = self.prepare_image(image, height, width, fit)
        static = self.make_static(pixels.shape[:2], num_inference_steps=num_inference_steps, scheduler=sched,
                                  output_type=output_type)
        latents = self.check_latents(latents, num_images, static.latent_shape)
        prompts = common.as_prompt_list(instruction, num_images, "instruction")
        negatives = common.as_prompt_list(negative_prompt, num_images, "negative_prompt")
        embedded = self.prompts(prompts + negatives)
        pos, neg = embedded[:num_images], embedded[num_images:]
        seeds, seed_rows = common.as_seed_list(seed, num_images)
        batch = EnhanceBatch(seeds=seeds, rows=seed_rows, image=np.repeat(to_float(pixels)[None], num_images, 0),
                             context=np.stack(([pos] if static.text else []) + [neg, neg], axis=1), latents=latents)
        scalars = {"guidance": np.float32(guidance_scale), "image_guidance": np.float32(image_guidance_scale)}
        out = self.run_programs(static, batch, scalars, progress=progress, desc="enhance")
        if crop and output_type != "latent":
            left, top, right, bottom = content_box(transform)
            out = out[:, top:bottom, left:right]
        return self.format_output(out, output_type)

    def make_static(self, size, *, num_inference_steps: int = constants.DEFAULT_STEPS,
                    scheduler: Union[str, Scheduler] = constants.DEFAULT_SCHEDULER,
                    output_type: str = "pil") -> EnhanceStatic:
        """The static settings of a call at ``size`` (H, W); the text row only for a model with a text encoder."""
        sched = self.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        factor = common.vae_factor(self.vae)
        latent_shape = (int(size[0]) // factor, int(size[1]) // factor, self.vae.latent_channels)
        return EnhanceStatic(sched, int(num_inference_steps), latent_shape, output_type,
                             text=self.prompts.text_encoder is not None)

    def precompute(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars):
        """The image latents of the G rows [N·G, h, w, C]: (mode, mode, zeros) per sample, unscaled ((mode, zeros)
        without the text row)."""
        mode = common.vae_encode(self.vae, params["vae"], batch.image * 2.0 - 1.0, scaled=False)
        n, g = mode.shape[0], static.rows
        rows = [mode] * (g - 1) + [jnp.zeros_like(mode)]
        return {"image_latents": jnp.stack(rows, axis=1).reshape((g * n,) + mode.shape[1:])}

    def model_fn(self, static: EnhanceStatic, params, batch: EnhanceBatch, scalars, extras, x, t):
        """The guided prediction (module docstring): x [N, h, w, C] scaled model input, t [] -> [N, h, w, C]."""
        n, g = x.shape[0], static.rows
        context = batch.context.reshape((g * n,) + batch.context.shape[2:])
        xg = jnp.concatenate([rows_lib.repeat_rows(x, g), extras["image_latents"].astype(x.dtype)], axis=-1)
        eps = self.unet.apply({"params": params["unet"]}, xg, t, context).astype(jnp.float32)
        if static.text:
            text, image, uncond = rows_lib.split_rows(eps, ROWS)
            out = common.nested_guidance(uncond, image, text, scalars["image_guidance"], scalars["guidance"])
        else:
            image, uncond = rows_lib.split_rows(eps, ROWS - 1)
            out = common.cfg(uncond, image, scalars["image_guidance"])
        return out.astype(x.dtype)


__all__ = ["EnhanceBatch", "EnhancePipeline", "EnhanceStatic"]
