"""IP-Adapter in training: the static parts (:class:`ImagePromptParts`), the trainable part ``ip_adapter`` as one
plain pytree and back (:func:`ip_adapter_tree`, :func:`merge_ip_kernels`, :func:`ip_adapter_weights`), the image
processor in JAX (:func:`clip_pixel_values`) and where ``model.ip_adapter`` / ``model.image_encoder`` point.

The part: ``{"image_proj": <the image projection's tree>, "attn2": <a UNet-shaped tree holding only
.../attn2/to_k_ip/kernel and .../attn2/to_v_ip/kernel>}``; the frozen CLIP image encoder's parameters are
``frozen["image_encoder"]`` (:func:`pmf_jax.training.components.build`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict

import jax
import jax.numpy as jnp
from flax import traverse_util

from pmf_jax.errors import PMFInputError
from pmf_jax.io.hub import resolve_folder
from pmf_jax.io.ip_adapter import ATTENTION_KEYS, cross_attention_paths
from pmf_jax.models.clip_image_processor import ImageProcessorConfig, resize_size


@dataclasses.dataclass(frozen=True)
class ImagePromptParts:
    """The static side of IP-Adapter in a run (model.ip_adapter set).

    kind: ``"ip_adapter"`` (the projection reads the encoder's ``image_embeds``) or ``"plus"`` (``hidden_states[-2]``).
    image_projection: the projection module (compute dtype); its parameters are ``params["ip_adapter"]["image_proj"]``.
    image_encoder: the frozen :class:`~pmf_jax.models.clip_vision.CLIPVisionModelWithProjection`; its parameters are
      ``frozen["image_encoder"]``.
    processor: the encoder's :class:`~pmf_jax.models.clip_image_processor.ImageProcessorConfig`, applied in JAX by
      :func:`clip_pixel_values`.
    """

    kind: str
    image_projection: Any
    image_encoder: Any
    processor: ImageProcessorConfig

    def features(self, encoder_params, images, drop):
        """What the projection reads for the source ``images`` [B, H, W, 3] in [-1, 1]: ``image_embeds`` [B, P]
        (IP-Adapter) or ``hidden_states[-2]`` [B, 1 + N, D] (Plus), float32, no gradient. Rows where ``drop`` [B]
        (bool) is set get diffusers' unconditional features: zero ``image_embeds``, or the encoding of all-zero
        ``pixel_values`` (Plus)."""
        pixels = clip_pixel_values(images, self.processor)
        keep = ~drop
        if self.kind == "plus":
            pixels = jnp.where(keep[:, None, None, None], pixels, 0.0)
        out = self.image_encoder.apply({"params": encoder_params}, pixels.astype(self.image_encoder.dtype))
        if self.kind == "plus":
            features = out.hidden_states[-2]
        else:
            features = jnp.where(keep[:, None], out.image_embeds.astype(jnp.float32), 0.0)
        return jax.lax.stop_gradient(features.astype(jnp.float32))

    def tokens(self, image_proj_params, features):
        """Image-prompt tokens [B, num_tokens, cross_attention_dim] of ``features`` (:meth:`features`)."""
        return self.image_projection.apply({"params": image_proj_params}, features)


def clip_pixel_values(images, processor: ImageProcessorConfig):
    """The CLIP image processor in JAX, for training inside the jitted step: images [B, H, W, 3] in [-1, 1] ->
    ``pixel_values`` [B, h, w, 3] float32 (resize as ``processor.size`` says, centre crop, rescale, normalise; the
    steps and sizes of :func:`pmf_jax.models.clip_image_processor.preprocess`).

    It differs from that (host-side) path in the resampling only: ``jax.image.resize`` (Keys cubic, a = -0.5, or
    linear, antialiased: the kernel widened by the downscale factor, taps renormalised) on floats. That is
    ``preprocess``'s float path to ~1e-6 relative (‖Δ‖/‖x‖; 512x352 -> 224, tests/test_ip_adapter_training.py), but
    not its uint8 path (Pillow's 8-bit arithmetic, what pipelines apply to uint8 pictures): no rounding to uint8
    before and after each pass, so up to about one uint8 level per pixel apart. Training and the export round-trip
    test both use this function.
    """
    x = (images.astype(jnp.float32) + 1.0) * 127.5  # the uint8 scale the processor's rescale_factor expects
    b, height, width, channels = x.shape
    if processor.do_resize:
        h, w = resize_size(height, width, processor.size)
        if (h, w) != (height, width):
            method = "cubic" if processor.resample == 3 else "linear"
            x = jax.image.resize(x, (b, h, w, channels), method=method, antialias=True)
    if processor.do_center_crop:
        ch, cw = processor.crop_size
        h, w = x.shape[1:3]
        if ch > h or cw > w:  # zeros around an image smaller than the crop (the processor's padding)
            top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
            x = jnp.pad(x, ((0, 0), (top, max(ch - h, 0) - top), (left, max(cw - w, 0) - left), (0, 0)))
            h, w = x.shape[1:3]
        top, left = int((h - ch) / 2), int((w - cw) / 2)
        x = x[:, top:top + ch, left:left + cw]
    if processor.do_rescale:
        x = x * processor.rescale_factor
    if processor.do_normalize:
        x = (x - jnp.asarray(processor.image_mean, jnp.float32)) / jnp.asarray(processor.image_std, jnp.float32)
    return x


def _hub_path(text: str, what: str) -> Path:
    """A local path, or ``owner/name/path/inside`` of a repo in the Hugging Face cache."""
    local = Path(text).expanduser()
    if local.exists():
        return local
    parts = text.split("/")
    if len(parts) < 3 or text.startswith((".", "/", "~")):
        raise PMFInputError(f"config {what}: {text!r} does not exist (a local path, or owner/repo/path/in/repo of a "
                            f"repo in the Hugging Face cache)")
    return resolve_folder("/".join(parts[:2])) / "/".join(parts[2:])


def ip_adapter_file(path: str) -> Path:
    """``model.ip_adapter``: a local weight file, or ``owner/repo/path/file`` in the Hugging Face cache
    (``h94/IP-Adapter/models/ip-adapter_sd15.safetensors``)."""
    file = _hub_path(path, "model.ip_adapter")
    if not file.is_file():
        raise PMFInputError(f"config model.ip_adapter: {file} is not a file (the IP-Adapter weights, e.g. "
                            f"ip-adapter_sd15.safetensors)")
    return file


def image_encoder_folder(m) -> Path:
    """The folder of ``model.image_encoder`` (local, or ``owner/repo/sub/folder`` in the Hugging Face cache); null:
    ``image_encoder/`` beside the ``model.ip_adapter`` file."""
    if m.image_encoder:
        folder = _hub_path(m.image_encoder, "model.image_encoder")
    else:
        folder = ip_adapter_file(m.ip_adapter).parent / "image_encoder"
    if not (folder / "config.json").is_file():
        raise PMFInputError(f"config model.image_encoder: {folder} holds no config.json (the CLIP image encoder "
                            f"folder, e.g. h94/IP-Adapter/models/image_encoder)")
    return folder


def ip_adapter_tree(adapter, unet_params) -> Dict[str, Any]:
    """The trainable part ``ip_adapter`` of an :class:`~pmf_jax.io.ip_adapter.IPAdapterWeights`: ``{"image_proj":
    tree, "attn2": {...: {"attn2": {"to_k_ip": {"kernel": [D, inner]}, "to_v_ip": ...}}}}``, the second a UNet-shaped
    tree holding only the adapter's kernels (PMFInputError when the adapter does not fit ``unet_params``)."""
    flat = {}
    for path, pair in adapter.attention_params_by_path(unet_params).items():
        for name in ATTENTION_KEYS:
            flat[path + (name, "kernel")] = pair[name]
    return {"image_proj": adapter.image_proj_params, "attn2": traverse_util.unflatten_dict(flat)}


def merge_ip_kernels(unet_params, attn2_tree):
    """``unet_params`` with the ``to_k_ip``/``to_v_ip`` kernels of ``attn2_tree`` (the part's ``"attn2"``) added: a
    pure tree merge (no copy, traceable), so gradients of the merged tree reach the kernels."""
    if not isinstance(attn2_tree, dict):
        return attn2_tree
    out = dict(unet_params)
    for key, value in attn2_tree.items():
        out[key] = merge_ip_kernels(unet_params[key], value) if key in unet_params else value
    return out


def attention_params_by_index(attn2_tree) -> Dict[int, Dict[str, Any]]:
    """The part's ``"attn2"`` tree keyed as the public file numbers it: ``{1: {"to_k_ip": kernel, "to_v_ip":
    kernel}, 3: ...}`` (diffusers' ``attn_processors`` order, :func:`pmf_jax.io.ip_adapter.cross_attention_paths`)."""
    flat = traverse_util.flatten_dict(attn2_tree)
    layers = {path[:-2] for path in flat if path[-2] in ATTENTION_KEYS and path[-1] == "kernel"}
    as_unet = traverse_util.unflatten_dict({layer + ("to_k", "kernel"): 0 for layer in layers})
    return {2 * i + 1: {name: flat[path + (name, "kernel")] for name in ATTENTION_KEYS}
            for i, path in enumerate(cross_attention_paths(as_unet))}


def ip_adapter_weights(image_prompt: ImagePromptParts, ip_tree, source: str = "the run's ip_adapter part"):
    """The ``ip_adapter`` part of a run as an :class:`~pmf_jax.io.ip_adapter.IPAdapterWeights` (what
    :class:`~pmf_jax.pipelines.RetargetPipeline` takes as ``ip_adapter=``; ``to_state_dict`` gives the public file's
    tensors)."""
    from pmf_jax.io.ip_adapter import IPAdapterWeights

    return IPAdapterWeights(kind=image_prompt.kind, image_projection=image_prompt.image_projection,
                            image_proj_params=ip_tree["image_proj"],
                            attention_params=attention_params_by_index(ip_tree["attn2"]), source=source)


def build_image_prompt(m, unet, unet_params, dtype, source):
    """(ImagePromptParts, the ``ip_adapter`` part's tree, the image encoder's params) (model.ip_adapter)."""
    if not m.ip_adapter:
        raise PMFInputError("reference.mode=ip_adapter needs config model.ip_adapter (the IP-Adapter weight file to "
                            "start from, e.g. h94/IP-Adapter/models/ip-adapter_sd15.safetensors)")
    adapter = source.ip_adapter(m)
    encoder, encoder_params, processor = source.image_encoder(m, dtype)
    adapter.check_image_encoder(encoder)
    adapter.merge_into(unet, jax.eval_shape(lambda: unet_params))  # the adapter's checks against this UNet
    tree = jax.tree_util.tree_map(jnp.asarray, ip_adapter_tree(adapter, unet_params))
    projection = adapter.image_projection.clone(dtype=dtype)
    return ImagePromptParts(adapter.kind, projection, encoder, processor), tree, encoder_params
