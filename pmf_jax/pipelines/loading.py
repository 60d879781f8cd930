"""Loading the parts of a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) and
single model folders (ControlNet, reference UNet) for the pipelines.

A folder without ``vae/`` is accepted for pixel-space models (a UNet with 3·p² output channels, p×p pixel patches
folded into channels: 3 for p = 1, 48 for the tiny demo's p = 4): it gets the parameter-free identity autoencoder
with that patch size. A folder without ``text_encoder/`` gives a prompt-free pipeline (a fixed
all-zeros context).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from pmf_jax.constants import SD15_SCHEDULER_CONFIG
from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained
from pmf_jax.io.hub import resolve_folder


def _check_class(module, cls_name: str, where) -> None:
    if type(module).__name__ != cls_name:
        raise PMFInputError(f"{where} holds a {type(module).__name__}, expected a {cls_name}")


def load_model(path_or_repo_id, kind: str, subfolder, *, dtype, attention_backend: str = "auto",
               revision: Optional[str] = None, allow_pickle: bool = False) -> Tuple[Any, Any]:
    """``(module, params)`` of a ``kind`` model (e.g. "ControlNetModel") from its own folder or from
    ``<pipeline folder>/<subfolder>`` (``subfolder``: a name or a tuple of names tried in order); a local folder or a
    Hub repo id in the local cache. ``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`."""
    folder = resolve_folder(path_or_repo_id, revision=revision)
    if not (folder / "config.json").is_file():
        for name in (subfolder,) if isinstance(subfolder, str) else subfolder:
            if (folder / name / "config.json").is_file():
                folder = folder / name
                break
    module, params = from_pretrained(folder, dtype=dtype, attention_backend=attention_backend,
                                     allow_pickle=allow_pickle)
    _check_class(module, kind, folder)
    return module, params


IP_ADAPTER_FILE = Path("ip_adapter") / "ip_adapter.safetensors"  # in a PMF export (pmf convert to-diffusers)


def load_image_prompt(folder: Path, ip_adapter=None, image_encoder=None, *, dtype, attention_backend: str = "auto",
                      revision: Optional[str] = None, allow_pickle: bool = False):
    """The IP-Adapter parts of a pipeline: ``(adapter, (image encoder, params), image processor settings)``, or
    ``(None, None, None)`` without an adapter.

    ip_adapter: an adapter file (:func:`pmf_jax.io.load_ip_adapter`), an already loaded ``IPAdapterWeights``, or
      None: ``folder``'s ``ip_adapter/ip_adapter.safetensors`` if it has one (an export).
    image_encoder: a CLIPVisionModelWithProjection folder (or a folder with ``image_encoder/``), else the
      ``image_encoder/`` beside the adapter file (h94/IP-Adapter's layout, and an export's ``ip_adapter/``), else
      ``folder``'s ``image_encoder/``.
    The image processor is diffusers': ``folder``'s ``feature_extractor/`` when there is one, else the encoder
    folder's ``preprocessor_config.json``, else ``CLIPImageProcessor(size=image_size, crop_size=image_size)``.
    """
    from pmf_jax.io.ip_adapter import IPAdapterWeights, load_ip_adapter
    from pmf_jax.models.clip_image_processor import PROCESSOR_FILE, ImageProcessorConfig

    folder = Path(folder)
    if ip_adapter is None and (folder / IP_ADAPTER_FILE).is_file():
        ip_adapter = folder / IP_ADAPTER_FILE
    if ip_adapter is None:
        if image_encoder is not None:
            raise PMFInputError("an image encoder was given without an IP-Adapter (ip_adapter=, --ip-adapter)")
        return None, None, None
    beside = None
    if not isinstance(ip_adapter, IPAdapterWeights):
        beside = Path(ip_adapter).parent / "image_encoder"
        ip_adapter = load_ip_adapter(ip_adapter, allow_pickle=allow_pickle, dtype=dtype)
    if image_encoder is None and beside is not None and (beside / "config.json").is_file():
        image_encoder = beside
    if image_encoder is None:
        if not (folder / "image_encoder" / "config.json").is_file():
            raise PMFInputError("an IP-Adapter needs its CLIP image encoder (image_encoder=, --image-encoder: a "
                                "CLIPVisionModelWithProjection folder, e.g. h94/IP-Adapter's models/image_encoder)")
        image_encoder = folder
    kw = dict(dtype=dtype, attention_backend=attention_backend, allow_pickle=allow_pickle)
    encoder_folder = resolve_folder(image_encoder, revision=revision)
    if not (encoder_folder / "config.json").is_file() and (encoder_folder / "image_encoder").is_dir():
        encoder_folder = encoder_folder / "image_encoder"
    encoder = load_model(encoder_folder, "CLIPVisionModelWithProjection", "image_encoder", **kw)
    ip_adapter.check_image_encoder(encoder[0])
    if (folder / "feature_extractor" / PROCESSOR_FILE).is_file():
        processor = ImageProcessorConfig.from_folder(folder / "feature_extractor")
    else:
        processor = ImageProcessorConfig.from_folder(encoder_folder, image_size=encoder[0].image_size)
    return ip_adapter, encoder, processor


def read_scheduler_config(folder: Path) -> Dict[str, Any]:
    """The folder's scheduler/scheduler_config.json, or SD1.5's (:data:`pmf_jax.constants.SD15_SCHEDULER_CONFIG`)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(SD15_SCHEDULER_CONFIG)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON: {err}") from None


def load_sd_parts(path_or_repo_id, *, dtype, attention_backend: str = "auto",
                  revision: Optional[str] = None, allow_pickle: bool = False) -> Dict[str, Any]:
    """The parts of an SD pipeline folder (``allow_pickle``: as :func:`pmf_jax.io.from_pretrained`).

    Returns:
      dict with ``unet``, ``vae``, ``text_encoder`` ((module, params) pairs; text_encoder None when absent),
      ``tokenizer`` (or None) and ``scheduler_config`` (dict).
    """
    from pmf_jax.models.clip_text import load_tokenizer
    from pmf_jax.models.identity_vae import IdentityAutoencoder, patch_size_for_channels

    folder = resolve_folder(path_or_repo_id, revision=revision)
    if not (folder / "unet").is_dir():
        raise PMFInputError(f"{path_or_repo_id!r} is not a Stable Diffusion folder: it has no unet/ subfolder")
    kw = dict(dtype=dtype, attention_backend=attention_backend, allow_pickle=allow_pickle)
    unet = from_pretrained(folder, "unet", **kw)
    _check_class(unet[0], "UNet2DConditionModel", folder / "unet")
    if (folder / "vae").is_dir():
        vae = from_pretrained(folder, "vae", **kw)
        _check_class(vae[0], "AutoencoderKL", folder / "vae")
    elif patch_size_for_channels(unet[0].out_channels) is not None:
        vae = (IdentityAutoencoder(patch_size=patch_size_for_channels(unet[0].out_channels)), {})
    else:
        raise PMFInputError(f"{folder} has no vae/ subfolder (only pixel-space models, whose UNet has 3·p² output "
                            f"channels, may leave it out; this one has {unet[0].out_channels})")
    text_encoder = tokenizer = None
    if (folder / "text_encoder").is_dir():
        text_encoder = from_pretrained(folder, "text_encoder", **kw)
        _check_class(text_encoder[0], "CLIPTextModel", folder / "text_encoder")
        tokenizer = load_tokenizer(folder, "tokenizer")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler_config=read_scheduler_config(folder))
