"""A training run's parts as shapes only: the real components, parameters and train state, no weights read.

:func:`abstract_run` runs the trainer's own :func:`pmf_jax.training.components.build` under ``jax.eval_shape``, so
every parameter is a ``jax.ShapeDtypeStruct`` and nothing is allocated or initialised. Pretrained parts come from a
:class:`ConfigOnlySource`, which builds each module from its ``config.json`` when the folder (or cached Hub repo) is
there, and otherwise from the built-in Stable Diffusion 1.5 configs below (diffusers' published configs of
``stable-diffusion-v1-5`` unet/vae and ``lllyasviel/control_v11p_sd15_openpose``; the UNet is
``UNet2DConditionModel``'s defaults with ``cross_attention_dim`` 768, the ControlNet the same encoder). So a
config whose ``model.base`` / ``model.controlnet`` / ``model.reference_unet`` is not on this machine still plans
as SD1.5 — :attr:`AbstractRun.notes` says which parts were built that way.

The empty-prompt text context is a [1, 77, D] constant the trainer computes once with CLIP before training; here
only its shape matters (77 = CLIP's ``max_position_embeddings``, D = the UNet's ``cross_attention_dim``), so the
CLIP encoder is not built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.training import components as components_lib
from pmf_jax.training.state import TrainState, init_state, make_optimizer

CLIP_TOKENS = 77  # SD1.5's CLIP tokenizer model_max_length = text encoder max_position_embeddings

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_CONTROLNET = {
    "_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    **{k: SD15_UNET[k] for k in ("block_out_channels", "layers_per_block", "attention_head_dim",
                                 "cross_attention_dim", "norm_num_groups", "norm_eps", "down_block_types")},
}
# IP-Adapter's SD1.5 image encoder (h94/IP-Adapter models/image_encoder: OpenCLIP ViT-H/14) and adapter
# (ip-adapter_sd15: 4 tokens from the 1024-wide image_embeds).
VIT_H14 = {
    "_class_name": "CLIPVisionModelWithProjection", "hidden_size": 1280, "intermediate_size": 5120,
    "num_hidden_layers": 32, "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "projection_dim": 1024,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}
SD15_IP_ADAPTER_TOKENS = 4
SD15_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}


class ConfigOnlySource(components_lib.PretrainedSource):
    """Builds pretrained parts from their configs and initialises them (call under ``jax.eval_shape``: shapes
    only). Reads ``config.json`` of folders that exist; the built-in SD1.5 configs stand in for the others."""

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg
        self.notes: List[str] = []
        self.context_dim = SD15_UNET["cross_attention_dim"]
        self.base_unet = None  # the base UNet module once built (the IP-Adapter is shaped for it)

    def _builtin(self, path, subfolder) -> Tuple[str, dict]:
        m = self.model_cfg
        if subfolder in ("unet", "reference_unet") or (subfolder is None and path == m.reference_unet):
            return "UNet2DConditionModel", SD15_UNET
        if subfolder == "controlnet" or (subfolder is None and path == m.controlnet):
            return "ControlNetModel", SD15_CONTROLNET
        if subfolder == "vae":
            return "AutoencoderKL", SD15_VAE
        raise PMFInputError(f"no built-in config for {path!r} (subfolder {subfolder!r})")

    def model(self, path, subfolder=None, *, dtype=jnp.float32, param_dtype=None, attention_backend="auto",
              revision=None, variant=None, allow_pickle=False, **module_kwargs):
        """As :func:`pmf_jax.io.from_pretrained`, with the parameters initialised instead of read."""
        from pmf_jax.io.hub import resolve_folder
        from pmf_jax.io.pretrained import read_config
        from pmf_jax.io.registry import model_class_for_config

        where = f"{path}/{subfolder}" if subfolder else str(path)
        try:
            folder = resolve_folder(path, subfolder, revision)
            config = read_config(folder)
            self.notes.append(f"{where}: config.json read (no weights)")
        except PMFInputError:
            name, config = self._builtin(path, subfolder)
            folder = "<built-in SD1.5>"
            self.notes.append(f"{where}: not on this machine; built-in SD1.5 {name} config")
        cls = model_class_for_config(config, folder)
        module = cls.from_config(config, dtype=dtype, attention_backend=attention_backend, **module_kwargs)
        if subfolder == "unet":  # the base UNet: its cross-attention width is the text context's
            self.base_unet = module
            dim = module.cross_attention_dim
            self.context_dim = dim if isinstance(dim, int) else dim[0]
        target = jnp.dtype(param_dtype or dtype)
        params = jax.tree_util.tree_map(lambda a: a.astype(target), module.init_params(jax.random.key(0)))
        return module, params

    def image_encoder(self, m, dtype):
        """The CLIP image encoder of ``model.image_encoder`` from its config.json, else the built-in ViT-H/14."""
        from pmf_jax.models.clip_image_processor import ImageProcessorConfig
        from pmf_jax.models.clip_vision import CLIPVisionModelWithProjection

        try:
            module, params = self.model(components_lib.image_encoder_folder(m), dtype=dtype, param_dtype=jnp.float32,
                                        attention_backend=m.attention_backend)
        except PMFInputError:
            module = CLIPVisionModelWithProjection.from_config(VIT_H14, dtype=dtype,
                                                               attention_backend=m.attention_backend)
            params = module.init_params(jax.random.key(0))
            self.notes.append("image encoder: not on this machine; built-in ViT-H/14 config (IP-Adapter SD1.5)")
        return module, params, ImageProcessorConfig.for_image_size(module.image_size)

    def ip_adapter(self, m):
        """IP-Adapter (the SD1.5 layout: 4 tokens of the image encoder's 1024-wide embeddings) shaped for the base
        UNet built last, zeros (under eval_shape: shapes only; the file is not read)."""
        from pmf_jax.io.ip_adapter import IPAdapterWeights, cross_attention_shapes
        from pmf_jax.models.image_projection import ImageProjection

        if self.base_unet is None:
            raise PMFInputError("the IP-Adapter is planned after the base UNet (model.base)")
        unet_params = jax.eval_shape(self.base_unet.init_params, jax.random.key(0))
        shapes = cross_attention_shapes(unet_params)
        dim = next(iter(shapes.values()))[0]
        projection = ImageProjection(image_embed_dim=VIT_H14["projection_dim"], cross_attention_dim=dim,
                                     num_tokens=SD15_IP_ADAPTER_TOKENS)
        attention = {2 * i + 1: {name: jnp.zeros(shape, jnp.float32) for name in ("to_k_ip", "to_v_ip")}
                     for i, shape in enumerate(shapes.values())}
        self.notes.append(f"IP-Adapter: SD1.5 layout ({SD15_IP_ADAPTER_TOKENS} tokens, {len(shapes)} attn2 layers); "
                          f"{m.ip_adapter} not read")
        return IPAdapterWeights(kind="ip_adapter", image_projection=projection,
                                image_proj_params=projection.init_params(jax.random.key(0)),
                                attention_params=attention, source=str(m.ip_adapter))

    def empty_prompt_context(self, m, dtype):
        """Zeros of the CLIP encoding's shape [1, 77, D] (values do not matter to a compile)."""
        self.notes.append(f"text context: the empty prompt's CLIP encoding, shape [1, {CLIP_TOKENS}, "
                          f"{self.context_dim}]")
        return jnp.zeros((1, CLIP_TOKENS, self.context_dim), dtype)

    def scheduler_config(self, m) -> Optional[dict]:
        try:
            return super().scheduler_config(m)
        except PMFInputError:
            return None  # SD1.5's schedule is the trainer's default one


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """Everything the train step takes, as shapes. ``frozen_params``: the UNet-like parts that do not train;
    ``frozen``: {"autoencoder", "context"}; ``state``: a :class:`TrainState` of ShapeDtypeStructs."""

    cfg: Any
    components: Any
    tx: Any
    state: TrainState
    frozen_params: Dict[str, Any]
    frozen: Dict[str, Any]
    notes: Tuple[str, ...]

    @property
    def reference_cfg(self):
        return self.cfg.reference.to_reference_config()

    def all_params(self) -> Dict[str, Any]:
        """{part: tree} of every UNet-like part (trainable ones in their fp32 master copy)."""
        return {**self.frozen_params, **self.state.params}


def abstract_run(cfg) -> AbstractRun:
    """The run's components, abstract params and abstract train state (see the module docstring)."""
    source = ConfigOnlySource(cfg.model)
    found: Dict[str, Any] = {}

    def build(rng):
        comps, params, frozen = components_lib.build(cfg, rng, source=source)
        found["components"] = comps  # static (modules, scheduler tables): safe to carry out of the trace
        return params, frozen

    params, frozen = jax.eval_shape(build, jax.random.key(0))
    comps = found["components"]
    trainable = {part: params[part] for part in comps.trainable}
    frozen_params = {part: p for part, p in params.items() if part not in comps.trainable}
    tx = make_optimizer(cfg.train)
    state = jax.eval_shape(lambda p: init_state(p, tx, cfg.train, jax.random.key(0)), trainable)
    return AbstractRun(cfg, comps, tx, state, frozen_params, frozen, tuple(source.notes))


def abstract_batch(cfg, global_batch: int) -> Dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global batch from :func:`pmf_jax.input_pipeline.make_loader` at the config's resolution."""
    h, w = cfg.data.height_width
    image = jax.ShapeDtypeStruct((global_batch, h, w, 3), jnp.float32)
    points = jax.ShapeDtypeStruct((global_batch, 18, 3), jnp.float32)
    return {"source": image, "target": image, "pose": image, "source_keypoints": points, "target_keypoints": points}


# ------------------------------------------------------------------------------------------------ sizes

def tree_bytes(tree: Any) -> int:
    """Total bytes of a tree of arrays / ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def tree_count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (a matching tree of ``NamedSharding``s): the
    largest shard of each leaf (shards are equal when dimensions divide, which the rules ensure)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} leaves but {len(shards)} shardings")
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))
