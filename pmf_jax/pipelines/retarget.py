"""Pose retargeting: the person of a source image, redrawn in a target pose (PoseMaster Fusion inference).

Modes:
  * ``"acm"``: a separate reference UNet (the trained Appearance Control Module) writes the reference bank from the
    source image's latent; the denoising UNet and (optionally) the ControlNet read it.
  * ``"reference_only"``: the denoising UNet's own weights write the bank (training-free, stock SD1.5).
  * ``"controlnet_only"``: no reference: a plain OpenPose ControlNet pipeline (the source image is unused).
  * ``"ip_adapter"``: the design's Method 2: ControlNet + IP-Adapter, the source image as the image prompt (no
    reference bank).

IP-Adapter (``ip_adapter=`` + ``image_encoder=``; mode ``ip_adapter``, and with ``acm`` / ``reference_only`` too):
every ``attn2`` of the UNet also attends to image tokens of the source (:mod:`pmf_jax.models.image_prompt`), scaled
by ``ip_adapter_scale`` (a number or diffusers' per-block dict; traced). The tokens are computed once per call in the
prologue: the CLIP image encoder on the fitted source, then the adapter's projection. Row c reads the source's tokens;
rows u and a those of no image, as diffusers' negative branch: the projection of zero ``image_embeds`` (IP-Adapter)
or of the encoder's ``hidden_states[-2]`` of an all-zero image (Plus). The ControlNet and the reference writer read
no image prompt.

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
from pmf_jax.models.image_prompt import expand_scale
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
                       autoencoder's factor), ip_adapter=IPAdapterWeights (pmf_jax.io.load_ip_adapter),
                       image_encoder=(clip_vision, p), image_processor=ImageProcessorConfig (default: diffusers'
                       for the encoder's image_size))

    or from folders with :meth:`from_pretrained`, or from a training run or a config with
    :func:`pmf_jax.pipelines.from_run.pipeline_from_run`. Call it with a source image and a pose (see
    :meth:`__call__`). Parameters: :attr:`params` {"unet", "controlnet", "vae", "reference" in mode "acm",
    "image_encoder" and "image_proj" with an IP-Adapter (whose ``to_k_ip``/``to_v_ip`` are merged into "unet")}.
    """

    def __init__(self, unet, controlnet, vae=None, text_encoder=None, tokenizer=None, reference_unet=None,
                 mode: str = constants.DEFAULT_MODE, scheduler_config=None, context=None,
                 reference_config: Optional[ReferenceConfig] = None, native_size: Optional[Tuple[int, int]] = None,
                 ip_adapter=None, image_encoder=None, image_processor=None):
        super().__init__(scheduler_config)
        if mode not in MODES:
            raise PMFInputError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if mode == "ip_adapter" and ip_adapter is None:
            raise PMFInputError("mode 'ip_adapter' needs an IP-Adapter (ip_adapter=, --ip-adapter) and its image "
                                "encoder (image_encoder=, --image-encoder)")
        if mode == "controlnet_only" and ip_adapter is not None:
            raise PMFInputError("mode 'controlnet_only' takes no IP-Adapter: use mode 'ip_adapter' (ControlNet + "
                                "IP-Adapter)")
        if (ip_adapter is None) != (image_encoder is None):
            raise PMFInputError("an IP-Adapter needs its CLIP image encoder, and an image encoder is used only with "
                                "an IP-Adapter: give both (ip_adapter=, image_encoder=) or neither")
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
        #: The IP-Adapter (``IPAdapterWeights``) and its CLIP image encoder module, or None.
        self.ip_adapter, self.image_encoder, self.image_processor = ip_adapter, None, None
        #: The image prompt's weight of a call that gives no ``ip_adapter_scale`` (a number or a per-block dict).
        self.ip_adapter_scale = constants.DEFAULT_IP_ADAPTER_SCALE
        if ip_adapter is not None:
            from pmf_jax.models.clip_image_processor import ImageProcessorConfig

            self.image_encoder = image_encoder[0]
            ip_adapter.check_image_encoder(self.image_encoder)
            self.image_processor = image_processor or ImageProcessorConfig.for_image_size(self.image_encoder.image_size)
            side = self.image_encoder.image_size
            if self.image_processor.output_size != (side, side):
                raise PMFInputError(f"the image processor settings give {self.image_processor.output_size} images; "
                                    f"the image encoder takes {side}x{side}")
            self.params["unet"] = ip_adapter.merge_into(self.unet, p_unet)
            self.params["image_encoder"] = image_encoder[1]
            self.params["image_proj"] = ip_adapter.image_proj_params
        dim = self.unet.cross_attention_dim
        self.prompts = common.PromptEncoder(
            tokenizer, *(text_encoder or (None, None)), context=context,
            cross_attention_dim=dim if isinstance(dim, int) else dim[0])

    @classmethod
    def from_pretrained(cls, sd_path_or_id, controlnet=None, reference_unet=None, mode: Optional[str] = None,
                        dtype=None, *, attention_backend: str = "auto", revision=None, allow_pickle: bool = False,
                        ip_adapter=None, image_encoder=None):
        """Loads an SD pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), a ControlNet folder
        (or repo id) and, for mode "acm", a reference UNet folder. ``dtype`` None: bfloat16 on GPU/TPU, float32 on
        CPU (parameters and compute). ``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`.

        ``ip_adapter`` (an IP-Adapter file) and ``image_encoder`` (its CLIPVisionModelWithProjection folder): mode
        "ip_adapter", or with "acm" / "reference_only" (:func:`pmf_jax.pipelines.loading.load_image_prompt`; an
        export's ``ip_adapter/`` and ``image_encoder/`` are used when present).

        A PMF export (``pmf convert to-diffusers``: controlnet/, reference_unet/ and pmf_config.json beside unet/)
        supplies what is not given: its ControlNet and reference UNet, its mode (otherwise "acm") and the reference
        settings it was trained with (:attr:`reference_config`, the default of :meth:`__call__`)."""
        from pmf_jax.convert.folders import read_pmf_config, reference_config_of
        from pmf_jax.pipelines.defaults import native_size
        from pmf_jax.io.hub import resolve_folder
        from pmf_jax.pipelines.loading import load_image_prompt, load_model, load_sd_parts

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
        adapter = encoder = processor = None
        if mode != "controlnet_only":  # an export's adapter is not used by a plain ControlNet run
            adapter, encoder, processor = load_image_prompt(folder, ip_adapter, image_encoder, revision=revision,
                                                            **kw)
        elif ip_adapter is not None or image_encoder is not None:
            raise PMFInputError("mode 'controlnet_only' takes no IP-Adapter: use mode 'ip_adapter' (ControlNet + "
                                "IP-Adapter)")
        return cls(parts["unet"], cn, parts["vae"], parts["text_encoder"], parts["tokenizer"], ref, mode,
                   parts["scheduler_config"], reference_config=reference_config_of(export),
                   native_size=native_size(folder), ip_adapter=adapter, image_encoder=encoder,
                   image_processor=processor)

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
                 pose_options=None, latents=None, output_type: str = "pil", progress: bool = False,
                 ip_adapter_scale=None):
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
            export's settings); ignored in controlnet_only and ip_adapter.
          ip_adapter_scale: with an IP-Adapter, the weight of the image prompt: a number (default
            :attr:`ip_adapter_scale`, 1.0) or diffusers' per-block dict (``{"down": {"block_2": [0.0, 1.0]},
            "up": {"block_0": [0.0, 1.0, 0.0]}}``, what it leaves out is 0); traced: changing it never recompiles.
          latents: optional x_T [N, H/f, W/f, C] instead of the seeded noise.
          output_type: "pil" (list of N PIL images), "np" (float32 [N, H, W, 3] in [0, 1]) or "latent" (the final
            latents [N, H/f, W/f, C]).
          progress: a progress bar (pmf_jax.progress) over the steps (the same compiled loop, run one step per call),
            or a callable ``(steps done, steps)`` called after each step instead.
        """
        self.check_common(num_inference_steps, num_images, output_type)
        if appearance_guidance_scale is not None and self.mode == "controlnet_only":
            raise PMFInputError("appearance guidance needs a reference (mode 'acm' or 'reference_only') or an image "
                                "prompt (mode 'ip_adapter')")
        if ip_adapter_scale is not None and self.ip_adapter is None:
            raise PMFInputError("ip_adapter_scale is given, but this pipeline has no IP-Adapter (load one with "
                                "ip_adapter=, --ip-adapter)")
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
        clip_pixels = ip_scale = None
        if static.image_prompt:
            from pmf_jax.models.clip_image_processor import preprocess

            clip_pixels = np.repeat(preprocess([s for s, _ in prepared], self.image_processor), num_images, 0)
            ip_scale = expand_scale(self.unet, self.ip_adapter_scale if ip_adapter_scale is None
                                    else ip_adapter_scale)
        batch = RetargetBatch(
            seeds=seeds, rows=seed_rows,
            source=np.repeat(np.stack([to_float(s) for s, _ in prepared]), num_images, 0),
            pose=np.repeat(np.stack([to_float(p) for _, p in prepared]), num_images, 0),
            context=np.stack([by_row[row] for row in LAYOUTS[static.guidance]], axis=1),
            ref_context=by_row["c"], latents=latents, clip_pixels=clip_pixels)
        scalars = retarget_scalars(guidance_scale, appearance_guidance_scale, controlnet_conditioning_scale,
                                   ip_scale)
        out = self.run_programs(static, batch, scalars, progress=progress, desc=f"retarget ({self.mode})")
        return self.format_output(out, output_type)

    # ---------------------------------------------------------------------------------------- static, abstract
    def make_static(self, size, *, num_inference_steps: int = constants.DEFAULT_STEPS,
                    scheduler: Union[str, Scheduler] = constants.DEFAULT_SCHEDULER, appearance_guidance: bool = False,
                    reference_config: Optional[ReferenceConfig] = None, output_type: str = "pil") -> RetargetStatic:
        """The static settings of a call at ``size`` (H, W): ``appearance_guidance`` adds the appearance row, the
        guidance layout drops the rows that differ by text alone when the model has no text encoder (module
        docstring); ``reference_config`` None: :attr:`reference_config` (no reference at all in modes
        controlnet_only and ip_adapter). A pipeline with an IP-Adapter reads the image prompt."""
        sched = self.make_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        factor = common.vae_factor(self.vae)
        latent_shape = (size[0] // factor, size[1] // factor, self.unet.in_channels)
        reference = (None if self.mode in ("controlnet_only", "ip_adapter")
                     else (reference_config or self.reference_config))
        image_prompt = self.ip_adapter is not None
        layout = guidance_layout(appearance_guidance, self.prompts.text_encoder is not None, reference, image_prompt)
        return RetargetStatic(scheduler=sched, steps=int(num_inference_steps), latent_shape=latent_shape,
                              output_type=output_type, guidance=layout, reference=reference,
                              image_prompt=image_prompt)

    def abstract_inputs(self, static: RetargetStatic, num_images: int, latents: bool = False):
        """``(batch, scalars)`` of a call of ``num_images`` images as ShapeDtypeStructs (ahead-of-time compiles)."""
        factor = common.vae_factor(self.vae)
        size = (static.latent_shape[0] * factor, static.latent_shape[1] * factor)
        clip_size = self.image_processor.output_size if static.image_prompt else None
        batch = RetargetBatch.abstract(static, num_images, size, self.prompts.context_shape, latents, clip_size)
        return batch, abstract_scalars(expand_scale(self.unet, 1.0) if static.image_prompt else None)

    # ------------------------------------------------------------------------------------------ the program
    def precompute(self, static: RetargetStatic, params, batch: RetargetBatch, scalars):
        """What every step reuses: the reference latents [N, h, w, C] and, for reference_timestep "zero", the bank
        (written once, repeated to the G rows); with an IP-Adapter the image prompt tokens of every row
        (:meth:`image_tokens`)."""
        extras = {}
        if static.image_prompt:
            extras["ip_tokens"] = self.image_tokens(static, params, batch)
        if static.reference is None:
            return extras
        extras["ref_latents"] = common.vae_encode(self.vae, params["vae"], batch.source * 2.0 - 1.0)
        if static.reference.reference_timestep == "zero":
            extras["bank"] = self.write_bank(static, params, batch, extras["ref_latents"], jnp.zeros((), jnp.int32))
        return extras

    def image_tokens(self, static: RetargetStatic, params, batch: RetargetBatch):
        """IP-Adapter's image prompt of every guidance row, [N·G, num_tokens, D] sample-major: row c the source's
        tokens (``batch.clip_pixels`` through the image encoder and the projection), rows u and a those of no image
        (zero ``image_embeds``, or for Plus the encoder's ``hidden_states[-2]`` of an all-zero image: diffusers'
        negative branch)."""
        adapter = self.ip_adapter
        if batch.clip_pixels is None:  # a caller that builds its own batches (SequencePipeline) without the pixels
            raise PMFInputError("this pipeline has an IP-Adapter, but the batch has no clip_pixels (the source "
                                "preprocessed for the image encoder): pose sequences (pmf animate) do not read an "
                                "image prompt yet")
        encode = lambda pixels: self.image_encoder.apply({"params": params["image_encoder"]}, pixels)  # noqa: E731
        project = lambda f: adapter.image_projection.apply({"params": params["image_proj"]}, f)  # noqa: E731
        features = adapter.image_features(encode(batch.clip_pixels))
        if adapter.kind == "ip_adapter":
            empty = jnp.zeros((1,) + features.shape[1:], features.dtype)
        else:
            empty = adapter.image_features(encode(jnp.zeros((1,) + batch.clip_pixels.shape[1:],
                                                            batch.clip_pixels.dtype)))
        given = project(features)                                              # [N, T, D]
        none = jnp.broadcast_to(project(empty), given.shape).astype(given.dtype)
        tokens = jnp.stack([given if row == "c" else none for row in LAYOUTS[static.guidance]], axis=1)
        return tokens.reshape((-1,) + given.shape[1:])

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
        image_prompt = ({"ip_tokens": extras["ip_tokens"], "ip_scale": scalars["ip_scale"]} if static.image_prompt
                        else {})
        eps = self.unet.apply({"params": params["unet"]}, xg, t, context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, reference=read, **image_prompt).astype(jnp.float32)
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
