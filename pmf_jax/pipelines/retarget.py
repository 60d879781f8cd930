"""Pose retargeting: the person of a source image, redrawn in a target pose (PoseMaster Fusion inference).

Modes:
  * ``"acm"``: a separate reference UNet (the trained Appearance Control Module) writes the reference bank from the
    source image's latent; the denoising UNet and (optionally) the ControlNet read it.
  * ``"reference_only"``: the denoising UNet's own weights write the bank (training-free, stock SD1.5).
  * ``"controlnet_only"``: no reference: a plain OpenPose ControlNet pipeline (the source image is unused).

Guidance (one batched UNet call per step; rows of sample n at n·G + g):
  * ``appearance_guidance_scale=None`` — G = 2 rows ``[u, c]``: u = negative prompt, c = prompt + reference;
    ``ε = u + g·(c − u)`` with g = ``guidance_scale``. Row u is flagged unconditional for the reference bank, so it
    reads the reference blended by ``reference_config.style_fidelity`` (diffusers reference-only: 0 = u reads the
    reference like c, so only the text is guided; 1 = u has no reference, so text and appearance are guided together).
  * ``appearance_guidance_scale=g_a`` — G = 3 rows ``[u, c, a]``: u = negative prompt without reference
    (``ref_mix = 1``), c = prompt + reference, a = prompt without reference;
    ``ε = u + g_t·(a − u) + g_a·(c − a)`` (:func:`~pmf_jax.pipelines.common.nested_guidance`): g_t weighs the
    text, g_a the appearance (MagicPose-style appearance CFG).
A model without a text encoder has one fixed context for every row, so the rows that differ by their text alone are
equal: its calls drop them (the layouts of :data:`~pmf_jax.pipelines.retarget_inputs.LAYOUTS`): with appearance
guidance G = 2 rows ``[a, c]``, ``ε = a + g_a·(c − a)``; without it, when u reads the reference as c does
(``style_fidelity`` 0, or mode controlnet_only), G = 1 row ``[c]``, ``ε = c`` — the same result at a smaller batch,
so ``guidance_scale`` changes nothing there.
The reference UNet runs on the N samples only (prompt embedding as its context) once per step — once in total with
``reference_timestep="zero"`` — and its bank is repeated to the G rows.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax import constants, rows as rows_lib
from pmf_jax.errors import PMFInputError
from pmf_jax.models.controlnet import check_controlnet_fits
from pmf_jax.pipelines import common
from pmf_jax.pipelines.base import SamplingPipeline
from pmf_jax.pipelines.defaults import size_of
from pmf_jax.pipelines.images import fit_image, load_image, resolve_size, to_float
from pmf_jax.pipelines.retarget_inputs import (LAYOUTS, RetargetBatch, RetargetStatic, abstract_scalars,
                                               guidance_layout, retarget_scalars)
from pmf_jax.reference import ReferenceConfig, ReferenceRead, write_inputs
from pmf_jax.schedulers import Scheduler
from pmf_jax.schedulers import noise as noise_lib

MODES = constants.MODES


def pairs(source_image, pose):
    """Lists of P sources and P poses (a single one is shared by all pairs)."""
    sources = list(source_image) if isinstance(source_image, (list, tuple)) else [source_image]
    poses = list(pose) if isinstance(pose, (list, tuple)) else [pose]
    count = max(len(sources), len(poses))
    if not sources or not poses or {len(sources), len(poses)} - {1, count}:
        raise PMFInputError(f"got {len(sources)} source images and {len(poses)} poses: give one of each, or lists "
                            f"of equal length (one pair each), or one of either with a list of the other")
    return sources * (count // len(sources)), poses * (count // len(poses))


class RetargetPipeline(SamplingPipeline):
    """Pose retargeting with a pose ControlNet and a reference bank (ACM / reference-only).

    Build it from loaded parts (each a ``(module, params)`` pair, as :func:`pmf_jax.io.from_pretrained` returns):

      RetargetPipeline(unet=(unet, p), controlnet=(cn, p), vae=(vae, p) or None (identity autoencoder,
                       pixel space), text_encoder=(clip, p) or None (a fixed context, default all zeros
                       [1, 1, cross_attention_dim]), tokenizer=..., reference_unet=(ref, p) (mode "acm"),
                       mode="acm", scheduler_config={...} (diffusers scheduler_config.json dict),
                       reference_config=ReferenceConfig(...) (how the bank is read by default),
                       native_size=(H, W) (the default output size; None: the UNet's sample_size times the
                       autoencoder's factor))

    or from folders with :meth:`from_pretrained`, or from a training run or a config with
    :func:`pmf_jax.pipelines.from_run.pipeline_from_run`. Call it with a source image and a pose (see
    :meth:`__call__`). Parameters: :attr:`params` {"unet", "controlnet", "vae", and "reference" in mode "acm"}.
    """

    def __init__(self, unet, controlnet, vae=None, text_encoder=None, tokenizer=None, reference_unet=None,
                 mode: str = constants.DEFAULT_MODE, scheduler_config=None, context=None,
                 reference_config: Optional[ReferenceConfig] = None, native_size: Optional[Tuple[int, int]] = None):
        super().__init__(scheduler_config)
        if mode not in MODES:
            raise PMFInputError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if mode == "acm" and reference_unet is None:
            raise PMFInputError("mode 'acm' needs a reference UNet (the trained ACM); use mode 'reference_only' to "
                                "let the denoising UNet write the reference itself")
        if mode != "acm" and reference_unet is not None:
            raise PMFInputError(f"mode {mode!r} takes no reference UNet (only mode 'acm' uses one)")
        if controlnet is None:
            raise PMFInputError("a pose ControlNet is required")
        vae_given = vae is not None
        if vae is None:
            from pmf_jax.models.identity_vae import IdentityAutoencoder

            vae = (IdentityAutoencoder(), {})
        self.mode = mode
        self.reference_config = reference_config or ReferenceConfig()
        (self.unet, p_unet), (self.controlnet, p_cn), (self.vae, p_vae) = unet, controlnet, vae
        self.reference_unet = reference_unet[0] if reference_unet is not None else None
        check_controlnet_fits(self.unet, self.controlnet, where="the ControlNet",
                              autoencoder_factor=common.vae_factor(self.vae) if vae_given else None)
        self.params = {"unet": p_unet, "controlnet": p_cn, "vae": p_vae}
        #: (H, W) of a call without height/width (:func:`pmf_jax.pipelines.images.resolve_size`), None: unknown.
        self.native_size = native_size or size_of(self.unet.sample_size, common.vae_factor(self.vae))
        if reference_unet is not None:
            self.params["reference"] = reference_unet[1]
        dim = self.unet.cross_attention_dim
        self.prompts = common.PromptEncoder(
            tokenizer, *(text_encoder or (None, None)), context=context,
            cross_attention_dim=dim if isinstance(dim, int) else dim[0])

    @classmethod
    def from_pretrained(cls, sd_path_or_id, controlnet=None, reference_unet=None, mode: Optional[str] = None,
                        dtype=None, *, attention_backend: str = "auto", revision=None, allow_pickle: bool = False):
        """Loads an SD pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), a ControlNet folder
        (or repo id) and, for mode "acm", a reference UNet folder. ``dtype`` None: bfloat16 on GPU/TPU, float32 on
        CPU (parameters and compute). ``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`.

        A PMF export (``pmf convert to-diffusers``: controlnet/, reference_unet/ and pmf_config.json beside unet/)
        supplies what is not given: its ControlNet and reference UNet, its mode (otherwise "acm") and the reference
        settings it was trained with (:attr:`reference_config`, the default of :meth:`__call__`)."""
        from pmf_jax.convert.folders import read_pmf_config, reference_config_of
        from pmf_jax.pipelines.defaults import native_size
        from pmf_jax.io.hub import resolve_folder
        from pmf_jax.pipelines.loading import load_model, load_sd_parts

        folder = resolve_folder(sd_path_or_id, revision=revision)
        export = read_pmf_config(folder)
        mode = mode or (export or {}).get("mode", constants.DEFAULT_MODE)
        if mode not in MODES:
            raise PMFInputError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if controlnet is None:
            if not (folder / "controlnet" / "config.json").is_file():
                raise PMFInputError(f"{sd_path_or_id!r} has no controlnet/: pass controlnet= a ControlNet folder")
            controlnet = folder
        if mode == "acm" and reference_unet is None:
            if not (folder / "reference_unet" / "config.json").is_file():
                raise PMFInputError(f"mode 'acm' needs reference_unet (a UNet folder: the trained ACM); "
                                    f"{sd_path_or_id!r} has no reference_unet/")
            reference_unet = folder
        kw = dict(dtype=common.resolve_dtype(dtype), attention_backend=attention_backend, allow_pickle=allow_pickle)
        parts = load_sd_parts(folder, **kw)
        cn = load_model(controlnet, "ControlNetModel", "controlnet", **kw)
        # a PMF export (`pmf convert to-diffusers`) holds the ACM as reference_unet/ beside the base's unet/
        ref = (load_model(reference_unet, "UNet2DConditionModel", ("reference_unet", "unet"), **kw)
               if mode == "acm" else None)
        return cls(parts["unet"], cn, parts["vae"], parts["text_encoder"], parts["tokenizer"], ref, mode,
                   parts["scheduler_config"], reference_config=reference_config_of(export),
                   native_size=native_size(folder))

    # ------------------------------------------------------------------------------------------------ inputs
    def prepare_inputs(self, source_image, pose, height: Optional[int] = None, width: Optional[int] = None,
                       fit: str = "pad", pose_kind: str = "auto", **pose_options):
        """The model-resolution inputs of one pair: ``(source uint8 [H, W, 3], pose skeleton uint8 [H, W, 3])``.

        (H, W) is ``height``/``width``, else :attr:`native_size` (or, for models trained at 512 or more, the source
        image's bucket: :func:`~pmf_jax.pipelines.images.resolve_size`). The source is fitted with ``fit``
        ("pad": letterbox, border pixels repeated; "crop": centre crop). The pose, with the same fit: a
        ``PoseCondition`` of that size is used as is; anything else goes through
        :func:`pmf_jax.pose.inputs.resolve_pose` as ``pose_kind`` says (``pose_options``: ``align_to``,
        ``pose_size``, ``source_keypoints``, ``detector``, ``detector_weights``, ``hands``, ``face``).
        """
        from pmf_jax.pose.inputs import resolve_pose

        source = load_image(source_image, "source image")
        size = resolve_size(source.shape, height, width, self.native_size)
        factor = common.vae_factor(self.vae)
        if size[0] % factor or size[1] % factor:
            raise PMFInputError(f"height={size[0]} and width={size[1]} must be multiples of the autoencoder's "
                                f"downscale factor {factor}")
        pose_image = resolve_pose(pose, size, fit, pose_kind, **pose_options).image
        return fit_image(source, size, fit)[0], pose_image

    def __call__(self, source_image, pose, prompt="", negative_prompt="",
                 num_inference_steps: int = constants.DEFAULT_STEPS,
                 guidance_scale: float = constants.DEFAULT_GUIDANCE_SCALE,
                 appearance_guidance_scale: Optional[float] = None, controlnet_conditioning_scale: float = 1.0,
                 scheduler: str = constants.DEFAULT_SCHEDULER, height: Optional[int] = None,
                 width: Optional[int] = None, num_images: int = 1, seed=0,
                 reference_config: Optional[ReferenceConfig] = None, fit: str = "pad", pose_kind: str = "auto",
                 pose_options=None, latents=None, output_type: str = "pil", progress: bool = False):
        """Generates ``num_images`` images of the source person in the target pose (per pair).

        Args:
          source_image: path, PIL image or uint8/float array [H0, W0, 3] — or a list of P of them (P pairs).
          pose: an OpenPose JSON path, keypoints float [18, 3] / [P', 18, 3], a skeleton image (path, PIL, uint8
            array; a photo or doodle goes through the OpenPose detector), a ``pmf_jax.pose.inputs.PoseCondition``
            — or a list of P of them. A single source or pose is shared by all pairs.
          fit, pose_kind, pose_options: how inputs are brought to (height, width): see :meth:`prepare_inputs`.
          prompt, negative_prompt: a string, or one per image (N = P · num_images, pair-major).
          guidance_scale, appearance_guidance_scale: see the module docstring (exact formulas).
          scheduler: one of ``pmf_jax.schedulers.SCHEDULERS`` (built from ``self.scheduler_config``).
          height, width: multiples of 8; default: :attr:`native_size` (for models trained at 512 or more: the
            first source image's resolution bucket).
          seed: one int (image n starts from noise of ``fold_in(key(seed), n)``), or one per image (image n from
            ``fold_in(key(seed[n]), 0)``, the same image as a single call with that seed).
          reference_config: how the bank is read (default :attr:`reference_config`: ``ReferenceConfig()``, or an
            export's settings); ignored in controlnet_only.
          latents: optional x_T [N, H/f, W/f, C] instead of the seeded noise.
          output_type: "pil" (list of N PIL images), "np" (float32 [N, H, W, 3] in [0, 1]) or "latent" (the final
            latents [N, H/f, W/f, C]).
          progress: a progress bar (pmf_jax.progress) over the steps (the same compiled loop, run one step per call),
            or a callable ``(steps done, steps)`` called after each step instead.
        """
        self.check_common(num_inference_steps, num_images, output_type)
        if appearance_guidance_scale is not None and self.mode == "controlnet_only":
            raise PMFInputError("appearance guidance needs a reference (mode 'acm' or 'reference_only')")
        sched = self.make_scheduler(scheduler)
        sources, poses = pairs(source_image, pose)
        first = load_image(sources[0], "source image")
        size = resolve_size(first.shape, height, width, self.native_size)
        prepared = [self.prepare_inputs(first if i == 0 else s, p, *size, fit=fit, pose_kind=pose_kind,
                                        **(pose_options or {})) for i, (s, p) in enumerate(zip(sources, poses))]
        n = len(prepared) * num_images
        static = self.make_static(size, num_inference_steps=num_inference_steps, scheduler=sched,
                                  appearance_guidance=appearance_guidance_scale is not None,
                                  reference_config=reference_config, output_type=output_type)
        latents = self.check_latents(latents, n, static.latent_shape)
        prompts = common.as_prompt_list(prompt, n, "prompt")
        negatives = common.as_prompt_list(negative_prompt, n, "negative_prompt")
        embedded = self.prompts(negatives + prompts)                  # [2N, T, D]
        by_row = {"u": embedded[:n], "c": embedded[n:], "a": embedded[n:]}  # negative prompt; prompt (± reference)
        seeds, seed_rows = common.as_seed_list(seed, n)
        batch = RetargetBatch(
            seeds=seeds, rows=seed_rows,
            source=np.repeat(np.stack([to_float(s) for s, _ in prepared]), num_images, 0),
            pose=np.repeat(np.stack([to_float(p) for _, p in prepared]), num_images, 0),
            context=np.stack([by_row[row] for row in LAYOUTS[static.guidance]], axis=1),
            ref_context=by_row["c"], latents=latents)
        scalars = retarget_scalars(guidance_scale, appearance_guidance_scale, controlnet_conditioning_scale)
        out = self.run_programs(static, batch, scalars, progress=progress, desc=f"retarget ({self.mode})")
        return self.format_output(out, output_type)

    # ---------------------------------------------------------------------------------------- static, abstract
    def make_static(self, size, *, num_inference_steps: int = constants.DEFAULT_STEPS,
                    scheduler: Union[str, Scheduler] = constants.DEFAULT_SCHEDULER, appearance_guidance: bool = False,
                    reference_config: Optional[ReferenceConfig] = None, output_type: str = "pil") -> RetargetStatic:
        """The static settings of a call at ``size`` (H, W): ``appearance_guidance`` adds the appearance row, the
        guidance layout drops the rows that differ by text alone when the model has no text encoder (module
        docstring); ``reference_config`` None: :attr:`reference_config` (no reference at all in mode
        controlnet_only)."""
        sched = self.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        factor = common.vae_factor(self.vae)
        latent_shape = (size[0] // factor, size[1] // factor, self.unet.in_channels)
        reference = None if self.mode == "controlnet_only" else (reference_config or self.reference_config)
        layout = guidance_layout(appearance_guidance, self.prompts.text_encoder is not None, reference)
        return RetargetStatic(scheduler=sched, steps=int(num_inference_steps), latent_shape=latent_shape,
                              output_type=output_type, guidance=layout, reference=reference)

    def abstract_inputs(self, static: RetargetStatic, num_images: int, latents: bool = False):
        """``(batch, scalars)`` of a call of ``num_images`` images as ShapeDtypeStructs (ahead-of-time compiles)."""
        factor = common.vae_factor(self.vae)
        size = (static.latent_shape[0] * factor, static.latent_shape[1] * factor)
        batch = RetargetBatch.abstract(static, num_images, size, self.prompts.context_shape, latents)
        return batch, abstract_scalars()

    # ------------------------------------------------------------------------------------------ the program
    def precompute(self, static: RetargetStatic, params, batch: RetargetBatch, scalars):
        """What every step reuses: the reference latents [N, h, w, C] and, for reference_timestep "zero", the bank
        (written once, repeated to the G rows)."""
        if static.reference is None:
            return {}
        extras = {"ref_latents": common.vae_encode(self.vae, params["vae"], batch.source * 2.0 - 1.0)}
        if static.reference.reference_timestep == "zero":
            extras["bank"] = self.write_bank(static, params, batch, extras["ref_latents"], jnp.zeros((), jnp.int32))
        return extras

    def write_bank(self, static: RetargetStatic, params, batch: RetargetBatch, ref_latents, t):
        """The reference bank for timestep t ([] int or float), every entry repeated to the G guidance rows:
        [N·G, L, C] (AdaIN statistics [N·G, 1, 1, C]: the entries ``reference.method`` reads). The writer is the
        reference UNet (mode "acm") or the denoising UNet (mode "reference_only")."""
        cfg_ref, sched, rows = static.reference, static.scheduler, batch.rows
        writer, p_writer = ((self.reference_unet, params["reference"]) if self.mode == "acm"
                            else (self.unet, params["unet"]))
        noise = None
        if cfg_ref.noise_reference:
            keys = noise_lib.row_keys(batch.seeds, rows)
            noise = noise_lib.row_normal(keys, noise_lib.REFERENCE_STREAM + jnp.round(t).astype(jnp.int32),
                                         ref_latents.shape[1:])

        def add_noise(x0, eps, tt):  # Euler's timesteps are floats; the training tables take integers
            return sched.add_noise(x0, eps, jnp.round(tt).astype(jnp.int32))

        latents, t_write = write_inputs(cfg_ref, ref_latents, jnp.full((rows.shape[0],), t), noise, add_noise)
        bank = writer.apply({"params": p_writer}, latents, t_write, batch.ref_context, cfg_ref,
                            method=writer.write_reference)
        return jax.tree_util.tree_map(lambda b: rows_lib.repeat_rows(b, static.rows), bank)

    def model_fn(self, static: RetargetStatic, params, batch: RetargetBatch, scalars, extras, x, t):
        """The guided prediction (module docstring): x [N, h, w, C] scaled model input, t [] -> [N, h, w, C].

        ``extras``: what :meth:`precompute` returns ({"ref_latents"} and, for reference_timestep "zero", "bank")."""
        g, n, cfg_ref = static.rows, x.shape[0], static.reference
        context = batch.context.reshape((n * g,) + batch.context.shape[2:])      # [N·G, T, D]
        xg, pose = rows_lib.repeat_rows(x, g), rows_lib.repeat_rows(batch.pose, g)
        read, layout = None, static.guidance
        if cfg_ref is not None:
            bank = extras["bank"] if "bank" in extras else self.write_bank(static, params, batch,
                                                                           extras["ref_latents"], t)
            if layout == "text":     # u is blended by style_fidelity
                read = ReferenceRead.build(bank, cfg_ref, n * g, uncond_mask=rows_lib.row_pattern([1.0, 0.0], n))
            elif layout == "none":   # c alone
                read = ReferenceRead.build(bank, cfg_ref, n * g)
            else:                    # u and a without reference
                without = [1.0 if row != "c" else 0.0 for row in LAYOUTS[layout]]
                read = ReferenceRead.build(bank, cfg_ref, n * g, ref_mix=rows_lib.row_pattern(without, n))
        cn_read = read if cfg_ref is not None and cfg_ref.controlnet_reads_reference else None
        down, mid = self.controlnet.apply({"params": params["controlnet"]}, xg, t, context, pose,
                                          conditioning_scale=scalars["control"], reference=cn_read)
        eps = self.unet.apply({"params": params["unet"]}, xg, t, context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, reference=read).astype(jnp.float32)
        if layout == "text":
            u, c = rows_lib.split_rows(eps, 2)
            out = common.cfg(u, c, scalars["guidance"])
        elif layout == "text_appearance":
            u, c, a = rows_lib.split_rows(eps, 3)
            out = common.nested_guidance(u, a, c, scalars["guidance"], scalars["appearance"])
        elif layout == "appearance":
            a, c = rows_lib.split_rows(eps, 2)
            out = common.cfg(a, c, scalars["appearance"])
        else:
            out = eps
        return out.astype(x.dtype)


__all__ = ["MODES", "RetargetBatch", "RetargetPipeline", "RetargetStatic", "pairs"]
