"""transformers ``CLIPVisionModelWithProjection`` in Flax linen: the image encoder of IP-Adapter.

A ViT: patch embedding (a ``patch_size`` conv, no bias) + class token + learned positions, ``pre_layrnorm`` (sic, as
transformers spells it), the CLIP encoder layers (:class:`pmf_jax.models.clip_text.CLIPEncoder`, no mask), and
``post_layernorm`` of the class token followed by ``visual_projection`` (no bias). Parameter names follow the
transformers state dict (``vision_model/encoder/layers_0/self_attn/q_proj/kernel``, ``visual_projection/kernel``),
so an IP-Adapter repo's ``image_encoder/`` folder loads with :func:`pmf_jax.io.from_pretrained` (ViT-H/14 for
``ip-adapter_sd15`` and the SDXL ``vit-h`` adapters, ViT-bigG/14 for ``ip-adapter_sdxl``).

  * ``module.apply({"params": p}, pixel_values)`` -> :class:`CLIPVisionOutput`; ``pixel_values``: [B, S, S, C]
    (NHWC, S = ``image_size``, C = ``num_channels``) in the image processor's normalised space
    (:func:`pmf_jax.models.clip_image_processor.preprocess`).
  * IP-Adapter reads ``image_embeds`` [B, projection_dim]; IP-Adapter Plus reads ``hidden_states[-2]``
    [B, 1 + N, hidden_size] (the penultimate layer's output, no final norm), N = (S // patch_size)².
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pmf_jax.errors import PMFInputError
from pmf_jax.models.clip_text import CLIPEncoder, CLIPTextModel, encoder_config_problems
from pmf_jax.models.configurable import PretrainedMixin, config_of

PREFIX = "vision_model"


@struct.dataclass
class CLIPVisionOutput:
    """What :class:`CLIPVisionModelWithProjection` returns (a pytree: it passes through ``jax.jit``).

    image_embeds: [B, projection_dim], ``visual_projection(post_layernorm(last_hidden_state[:, 0]))``.
    last_hidden_state: [B, 1 + N, D], the last layer's output (no final norm, as transformers).
    pooler_output: [B, D], ``post_layernorm`` of the class token.
    hidden_states: num_hidden_layers + 1 arrays [B, 1 + N, D]: the embeddings after ``pre_layrnorm``, then each
      layer's output (transformers' ``output_hidden_states=True``); ``hidden_states[-2]`` feeds IP-Adapter Plus.
    """

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Tuple[jax.Array, ...]


class CLIPVisionEmbeddings(nn.Module):
    """pixels [B, S, S, C] -> [B, 1 + N, D]: class token, then the patches in row-major order, plus positions."""

    hidden_size: int
    image_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        b = pixel_values.shape[0]
        patches = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(pixel_values)
        patches = patches.reshape(b, -1, self.hidden_size)  # [B, N, D], rows of the patch grid in order
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (self.hidden_size,))
        cls = jnp.broadcast_to(jnp.asarray(class_embedding, patches.dtype), (b, 1, self.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        positions = nn.Embed(num_positions, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(num_positions))
        return x + positions[None]


class CLIPVisionTransformer(nn.Module):
    """embeddings -> pre_layrnorm -> encoder -> (post_layernorm of the class token). See the module docstring."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        norm = lambda: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, use_fast_variance=False)  # noqa: E731
        self.embeddings = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.dtype)
        self.pre_layrnorm = norm()
        self.encoder = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                                   self.hidden_act, self.layer_norm_eps, self.backend, self.dtype)
        self.post_layernorm = norm()

    def __call__(self, pixel_values):
        """-> (hidden_states tuple, pooler_output [B, D])."""
        hidden_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), None)
        return hidden_states, self.post_layernorm(hidden_states[-1][:, 0])


class CLIPVisionModelWithProjection(PretrainedMixin, nn.Module):
    """transformers ``CLIPVisionModelWithProjection`` (fields = its ``CLIPVisionConfig`` keys; defaults as
    transformers': ViT-B/32). pixel_values: [B, image_size, image_size, num_channels] -> :class:`CLIPVisionOutput`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    CONFIG_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                   "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")
    # The text model's list (metadata, dropout and init settings, generic PretrainedConfig keys) covers these too.
    IGNORED_KEYS = CLIPTextModel.IGNORED_KEYS + ("pad_token_id", "bos_token_id", "eos_token_id")
    WEIGHTS_STEM = "model"
    # A buffer that checkpoints written before transformers 4.31 contain (the IP-Adapter image encoders among them).
    IGNORE_UNEXPECTED = (f"{PREFIX}.embeddings.position_ids",)

    def __post_init__(self):
        problems = encoder_config_problems(self)
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(self, key), int):
                problems.append(f"{key}={getattr(self, key)!r} (only a single int, a square, is implemented)")
        if not problems and self.patch_size > self.image_size:
            problems.append(f"patch_size={self.patch_size} is larger than image_size={self.image_size}")
        if problems:
            raise PMFInputError("CLIPVisionModelWithProjection config: " + "; ".join(problems))
        super().__post_init__()

    def setup(self):
        self.vision_model = CLIPVisionTransformer(
            self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
            self.image_size, self.patch_size, self.hidden_act, self.layer_norm_eps, self.attention_backend,
            self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __call__(self, pixel_values) -> CLIPVisionOutput:
        want = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise PMFInputError(f"pixel_values has shape {tuple(pixel_values.shape)}; this image encoder takes "
                                f"[B, {want[0]}, {want[1]}, {want[2]}] (NHWC, image_size={self.image_size}): "
                                f"preprocess the images with its image processor settings first")
        hidden_states, pooled = self.vision_model(pixel_values)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=hidden_states[-1],
                                pooler_output=pooled, hidden_states=hidden_states)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, self.image_size, self.image_size, self.num_channels), self.dtype),)

    def to_config(self) -> Dict[str, Any]:
        """A transformers ``CLIPVisionConfig`` dict (``CLIPVisionModelWithProjection.from_pretrained`` opens it)."""
        config = config_of(self)
        config.update(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model")
        return config
