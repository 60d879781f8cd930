"""The models a PMF training run uses, loaded (SD1.5 folders) or created from a config (tiny runs), and which train.

Parts: ``unet`` (denoising UNet), ``reference_unet`` (the ACM's writer), ``controlnet`` (pose ControlNet, stage 2),
the autoencoder (SD VAE, or the identity in pixel space) and the text context (CLIP on the empty prompt, or zeros
for prompt-free tiny models). ``train.trainable`` names the parts that train; empty, the design's recipe by stage
(:func:`trainable_parts`: stage 1 the ACM, stage 2 the ControlNet). In ``reference.mode=reference_only`` there is no
``reference_unet`` part: the denoising UNet writes the bank, in training as at inference (:attr:`Components.writer`).

With ``model.ip_adapter`` (IP-Adapter) the UNet also reads image-prompt tokens of the source; in
``reference.mode=ip_adapter`` (the design's Method 2) they replace the bank, which is not written. The part
``ip_adapter`` holds what IP-Adapter adds, as one plain pytree
(:func:`pmf_jax.training.image_prompt.ip_adapter_tree`): ``{"image_proj": <the image projection's tree>, "attn2": <a UNet-shaped tree holding only
.../attn2/to_k_ip/kernel and .../attn2/to_v_ip/kernel>}``, started from ``model.ip_adapter`` (a public-format file);
the frozen CLIP image encoder (``model.image_encoder``) is ``frozen["image_encoder"]``, the static side
(:class:`~pmf_jax.training.image_prompt.ImagePromptParts`) is :attr:`Components.image_prompt`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


from pmf_jax.constants import SD15_NOISE_SCHEDULE
from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained
from pmf_jax.io.hub import resolve_folder
from pmf_jax.models.controlnet import ControlNetModel, check_controlnet_fits, controlnet_from_unet
from pmf_jax.models.unet import UNet2DConditionModel
from pmf_jax.schedulers import make_scheduler
from pmf_jax.models.clip_image_processor import ImageProcessorConfig
from pmf_jax.training.image_prompt import ImagePromptParts, build_image_prompt, image_encoder_folder, ip_adapter_file

PARTS = ("unet", "reference_unet", "controlnet", "ip_adapter")
IP_ADAPTER_MODE = "ip_adapter"  # reference.mode of IP-Adapter runs (no bank; the UNet reads image tokens)
# Runs without a pretrained base train on SD1.5's betas (the training noise needs no sampling-time offset).
DEFAULT_NOISE_SCHEDULE = SD15_NOISE_SCHEDULE


@dataclasses.dataclass(frozen=True)
class Components:
    """Modules (static) of a run; their parameters live in ``params`` / the train state."""

    unet: UNet2DConditionModel
    reference_unet: UNet2DConditionModel
    controlnet: Optional[ControlNetModel]
    autoencoder: Any
    noise_scheduler: Any
    trainable: Tuple[str, ...]
    context_shape: Tuple[int, int]  # [T, D] of the (empty-prompt) text context
    #: the part whose parameters write the bank: "reference_unet" (mode acm) or "unet" (reference_only, where
    #: ``reference_unet`` is the denoising UNet's module and has no parameters of its own); None in ip_adapter (no
    #: bank).
    writer: Optional[str] = "reference_unet"
    #: IP-Adapter's modules (model.ip_adapter set), else None.
    image_prompt: Optional[ImagePromptParts] = None

    @staticmethod
    def check_mode(mode: str) -> None:
        if mode == "controlnet_only":
            raise PMFInputError("reference.mode=controlnet_only has no reference bank to train; train with acm, "
                                "reference_only or ip_adapter (controlnet_only is a sampling mode, e.g. for pmf eval "
                                "generate)")

    def encode(self, ae_params, images):
        """images [B, H, W, 3] in [-1, 1] -> latents [B, h, w, C] float32 for the UNet
        (:func:`pmf_jax.pipelines.common.vae_encode`, the one encode of training and sampling)."""
        from pmf_jax.pipelines.common import vae_encode

        return vae_encode(self.autoencoder, ae_params, images)


def trainable_parts(train_cfg, mode: str = "acm") -> Tuple[str, ...]:
    """``train.trainable``, checked; empty: the design's recipe, stage 1 the ACM (``reference_unet``; the ``unet`` in
    reference_only, where it writes the bank), stage 2 the pose ControlNet alone (everything else frozen); in
    ip_adapter the adapter (``ip_adapter``: image projection + to_k_ip/to_v_ip)."""
    if train_cfg.trainable:
        bad = [p for p in train_cfg.trainable if p not in PARTS]
        if bad:
            raise PMFInputError(f"config train.trainable has unknown parts {bad}; parts: {list(PARTS)}")
        if mode == "reference_only" and "reference_unet" in train_cfg.trainable:
            raise PMFInputError(f"config train.trainable={list(train_cfg.trainable)} names reference_unet, but in "
                                f"reference.mode=reference_only the denoising UNet writes the bank: train unet")
        if mode == IP_ADAPTER_MODE and "reference_unet" in train_cfg.trainable:
            raise PMFInputError(f"config train.trainable={list(train_cfg.trainable)} names reference_unet, but "
                                f"reference.mode=ip_adapter writes no reference bank: train ip_adapter")
        return tuple(train_cfg.trainable)
    if mode == IP_ADAPTER_MODE:
        return ("ip_adapter",)
    if train_cfg.stage == 2:
        return ("controlnet",)
    return ("unet",) if mode == "reference_only" else ("reference_unet",)


def _read_json(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise PMFInputError(f"config model.unet_config: {path} is not a file")
    return json.loads(file.read_text())


class PretrainedSource:
    """Where :func:`build` gets what a model folder holds. This default reads the folders (:mod:`pmf_jax.io`);
    ``pmf scaling`` passes one that builds the modules from their configs and reads no weights
    (:class:`pmf_jax.scaling.abstract.ConfigOnlySource`, used under ``jax.eval_shape``)."""

    def __init__(self, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle  # config model.allow_pickle: also read pickled torch weights

    def model(self, path, subfolder=None, **kwargs):
        """``(module, params)`` of a diffusers/transformers folder; kwargs as :func:`pmf_jax.io.from_pretrained`."""
        return from_pretrained(path, subfolder, allow_pickle=self.allow_pickle, **kwargs)

    def empty_prompt_context(self, m, dtype):
        """[1, T, D] text context of the empty prompt (``m``: the config's model section)."""
        return _empty_prompt_context(m, dtype, self.allow_pickle)

    def ip_adapter(self, m):
        """The starting adapter of ``model.ip_adapter`` (:class:`~pmf_jax.io.ip_adapter.IPAdapterWeights`, float32)."""
        from pmf_jax.io.ip_adapter import load_ip_adapter

        return load_ip_adapter(ip_adapter_file(m.ip_adapter), allow_pickle=self.allow_pickle)

    def image_encoder(self, m, dtype):
        """``(module, params, processor config)`` of the CLIP image encoder (``model.image_encoder``: its folder;
        null: the ``image_encoder/`` folder beside the adapter file, h94/IP-Adapter's layout)."""
        folder = image_encoder_folder(m)
        module, params = self.model(folder, dtype=dtype, param_dtype=jnp.float32,
                                    attention_backend=m.attention_backend)
        return module, params, ImageProcessorConfig.from_folder(folder, image_size=module.image_size)

    def scheduler_config(self, m) -> Optional[dict]:
        """The base's ``scheduler/scheduler_config.json`` as a dict, or None when it has none."""
        path = resolve_folder(m.base, revision=m.revision) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.is_file() else None


def build(cfg, rng, *, source: Optional[PretrainedSource] = None) -> Tuple[Components, Dict[str, Any], Dict[str, Any]]:
    """Loads or creates every part (pretrained parts through ``source``, default :class:`PretrainedSource`).

    Returns ``(components, params, frozen)``: ``params`` {part: tree} of every UNet-like part (trainable or not;
    and ``ip_adapter`` with an IP-Adapter), ``frozen`` {"autoencoder": tree, "context": [1, T, D] array} of what
    never trains (and "image_encoder": tree with an IP-Adapter).
    """
    source = source or PretrainedSource(allow_pickle=cfg.model.allow_pickle)
    Components.check_mode(cfg.reference.mode)
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    mode = cfg.reference.mode
    trainable = trainable_parts(cfg.train, mode)
    params: Dict[str, Any] = {}
    rng_unet, rng_cn = jax.random.split(rng)
    kw = dict(dtype=dtype, attention_backend=m.attention_backend, gradient_checkpointing=cfg.train.remat)
    if m.base:
        unet, params["unet"] = source.model(m.base, "unet", revision=m.revision, param_dtype=jnp.float32, **kw)
    elif m.unet_config:
        unet = UNet2DConditionModel.from_config(_read_json(m.unet_config), **kw)
        params["unet"] = jax.jit(unet.init_params)(rng_unet)
    else:
        raise PMFInputError("config model.base (an SD folder/repo) or model.unet_config (a UNet config.json for a "
                            "randomly initialised model) must be set")
    if mode in ("reference_only", IP_ADAPTER_MODE):  # the denoising UNet writes its own bank, or none is written
        if m.reference_unet:
            why = ("the denoising UNet writes the bank" if mode == "reference_only" else
                   "no reference bank is written")
            raise PMFInputError(f"config model.reference_unet={m.reference_unet!r} is used by reference.mode=acm "
                                f"only; in {mode} {why} (set it to null)")
        ref_unet = unet
    elif m.reference_unet:
        ref_unet, params["reference_unet"] = source.model(*_part_of(m.reference_unet, "reference_unet"),
                                                          param_dtype=jnp.float32, **kw)
    else:  # the ACM starts as a copy of the base UNet (MagicPose)
        ref_unet, params["reference_unet"] = unet, jax.tree_util.tree_map(jnp.array, params["unet"])
    autoencoder, ae_params, context = _autoencoder_and_context(cfg, unet, dtype, source)
    controlnet = None
    if cfg.train.stage == 2 or "controlnet" in trainable:
        if m.controlnet:
            controlnet, params["controlnet"] = source.model(*_part_of(m.controlnet, "controlnet"),
                                                            param_dtype=jnp.float32, **kw)
            check_controlnet_fits(unet, controlnet, autoencoder_factor=autoencoder.downscale_factor,
                                  where=f"model.controlnet {m.controlnet}")
        else:  # the pose image enters at pixel resolution: one stride-2 stage per factor 2 of the autoencoder
            stages = int(np.log2(autoencoder.downscale_factor)) + 1
            controlnet, params["controlnet"] = controlnet_from_unet(
                unet, params["unet"], rng_cn, conditioning_embedding_out_channels=(16, 32, 96, 256)[:stages])
    base_schedule = source.scheduler_config(m) if m.base else None
    noise_scheduler = make_scheduler("ddpm", noise_schedule_config(cfg, base_schedule))
    image_prompt, extra_frozen = None, {}
    if "ip_adapter" in trainable and not m.ip_adapter:
        raise PMFInputError(f"config train.trainable={list(trainable)} names ip_adapter, but model.ip_adapter is "
                            f"null (the IP-Adapter weight file to start from)")
    if mode == IP_ADAPTER_MODE or m.ip_adapter:
        image_prompt, params["ip_adapter"], extra_frozen["image_encoder"] = build_image_prompt(m, unet, params["unet"],
                                                                                          dtype, source)
    writer = {"reference_only": "unet", IP_ADAPTER_MODE: None}.get(mode, "reference_unet")
    components = Components(unet, ref_unet, controlnet, autoencoder, noise_scheduler, trainable,
                            tuple(context.shape[1:]), writer=writer, image_prompt=image_prompt)
    # What trains is stored in model.param_dtype, what is frozen in model.frozen_param_dtype.
    frozen_dtype, param_dtype = jnp.dtype(m.frozen_param_dtype), jnp.dtype(m.param_dtype)
    for part in params:
        part_dtype = param_dtype if part in trainable else frozen_dtype
        params[part] = jax.tree_util.tree_map(lambda a: a.astype(part_dtype), params[part])
    frozen = {"autoencoder": jax.tree_util.tree_map(lambda a: a.astype(frozen_dtype), ae_params), "context": context}
    for name, tree in extra_frozen.items():
        frozen[name] = jax.tree_util.tree_map(lambda a: a.astype(frozen_dtype), tree)
    return components, params, frozen


def _part_of(path: str, subfolder: str) -> Tuple[str, Optional[str]]:
    """(path, subfolder) to load a model from: a PMF folder (a `pmf convert` output, marked by pmf_pretrained.json or
    pmf_config.json) stands for its ``subfolder``; any other path is the model folder itself."""
    folder = Path(path).expanduser()
    if (folder / "pmf_pretrained.json").is_file() or (folder / "pmf_config.json").is_file():
        return path, subfolder
    return path, None


def _autoencoder_and_context(cfg, unet, dtype, source):
    m = cfg.model
    if m.autoencoder == "identity":
        from pmf_jax.models.identity_vae import IdentityAutoencoder

        autoencoder, ae_params = IdentityAutoencoder(patch_size=m.pixel_patch_size), {}
    else:
        if not m.base:
            raise PMFInputError("config model.autoencoder=vae needs model.base (an SD folder with vae/)")
        autoencoder, ae_params = source.model(m.base, "vae", revision=m.revision, dtype=dtype)
    ctx_dim = unet.cross_attention_dim if isinstance(unet.cross_attention_dim, int) else unet.cross_attention_dim[0]
    if m.base and m.text_encoder:
        context = source.empty_prompt_context(m, dtype)
    else:  # prompt-free tiny models: one all-zeros token
        context = jnp.zeros((1, 1, ctx_dim), dtype)
    return autoencoder, ae_params, context


def _empty_prompt_context(m, dtype, allow_pickle: bool):
    """CLIP encoding of the empty prompt [1, 77, D]: the pose-pair datasets have no captions, so training runs on
    the empty prompt (what text dropout would give) and the text encoder runs once, up front."""
    from pmf_jax.models.clip_text import load_tokenizer

    encoder, enc_params = from_pretrained(m.base, "text_encoder", revision=m.revision, dtype=dtype,
                                          allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(m.base, subfolder="tokenizer")
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return jax.jit(encoder.apply)({"params": enc_params}, np.asarray(ids, np.int32))


# train.zero_terminal_snr: ᾱ_{T-1} = 0, so the last training step shows the model no trace of the image, as pure
# noise at sampling does; trailing timesteps start sampling at that step.
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def noise_schedule_config(cfg, base_config: Optional[dict]) -> dict:
    """The run's noise schedule as a scheduler config: the base's (``base_config``: its scheduler_config.json, None
    without a base) else SD1.5's, rescaled to zero terminal SNR when ``train.zero_terminal_snr``. Training, previews
    and exports all read it."""
    config = dict(base_config if base_config is not None else DEFAULT_NOISE_SCHEDULE)
    return dict(config, **ZERO_TERMINAL_SNR) if cfg.train.zero_terminal_snr else config


def sampling_scheduler_config(components: Components, prediction_type: str) -> dict:
    """A diffusers-style scheduler config with the run's noise schedule and its model's prediction type
    (what a sampling pipeline for the trained model needs)."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset", "timestep_spacing",
            "rescale_betas_zero_snr")
    config = {k: getattr(components.noise_scheduler, k) for k in keys if hasattr(components.noise_scheduler, k)}
    return dict(config, prediction_type=prediction_type)
