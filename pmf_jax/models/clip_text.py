"""transformers ``CLIPTextModel`` in Flax linen (the Stable Diffusion text encoder), and its tokenizer.

Parameter names follow the transformers state dict under a ``text_model`` prefix
(``text_model/encoder/layers_0/self_attn/q_proj/kernel``), which is how every Stable Diffusion ``text_encoder``
folder on the Hub stores them; folders written by transformers v5 (no prefix) load too, and
:func:`pmf_jax.io.save_pretrained` writes the prefixed keys, which transformers 4.x and 5.x both open.

  * ``module.apply({"params": p}, input_ids)`` -> last_hidden_state [B, T, D] (after the final layer norm).
  * ``module.apply({"params": p}, input_ids, clip_skip=k)`` -> the hidden state ``k`` layers before the last,
    through the final layer norm (diffusers' ``clip_skip``; ``k=0`` is last_hidden_state).
  * ``module.apply({"params": p}, input_ids, method=module.encode)`` -> :class:`CLIPTextOutput`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pmf_jax.errors import PMFInputError
from pmf_jax.io.hub import resolve_folder
from pmf_jax.models.attention import dot_product_attention
from pmf_jax.models.configurable import PretrainedMixin, config_of

PREFIX = "text_model"
# Before transformers PR #24773 CLIP configs said eos_token_id=2; those models pool at argmax(input_ids) instead
# (the end-of-text token has the highest id in the original vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@struct.dataclass
class CLIPTextOutput:
    """What :meth:`CLIPTextModel.encode` returns (a pytree, so it passes through ``jax.jit``).

    last_hidden_state: [B, T, D], after the final layer norm.
    pooler_output: [B, D], last_hidden_state at each sequence's end-of-text token.
    hidden_states: num_hidden_layers + 1 arrays [B, T, D] — the embeddings, then each layer's output (the last one
      before the final layer norm), as transformers' ``output_hidden_states=True``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: Tuple[jax.Array, ...]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q_proj/k_proj/v_proj/out_proj. x: [B, T, D], mask: bool [B|1, 1, T, T]."""

    heads: int
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731  [B, T, H, Dh]
        q = split(nn.Dense(d, dtype=self.dtype, name="q_proj")(x))
        k = split(nn.Dense(d, dtype=self.dtype, name="k_proj")(x))
        v = split(nn.Dense(d, dtype=self.dtype, name="v_proj")(x))
        # The Pallas TPU kernel takes no mask; 77 tokens gain nothing from it anyway.
        backend = "xla" if self.backend == "flash" else self.backend
        out = dot_product_attention(q, k, v, backend=backend, mask=mask).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)). x: [B, T, D]."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, use_fast_variance=False, name=name)  # noqa: E731
        x = x + CLIPAttention(self.heads, self.backend, self.dtype, name="self_attn")(norm("layer_norm1")(x), mask)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(norm("layer_norm2")(x))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. x: [B, T, D]."""

    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](h))


class CLIPTextEmbeddings(nn.Module):
    """token + learned absolute position embeddings. input_ids: [B, T] int -> [B, T, D]."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """The layers (``layers_0``, ...). x: [B, T, D] -> (x, output of layer 1, ..., output of layer N)."""

    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        hidden_states = [x]
        for i in range(self.num_layers):
            layer = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.backend,
                                     self.dtype, name=f"layers_{i}")
            hidden_states.append(layer(hidden_states[-1], mask))
        return tuple(hidden_states)


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder (causal) -> final_layer_norm, and the end-of-text pooling. See :class:`CLIPTextModel`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: Optional[int]
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                                             self.dtype)
        self.encoder = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                                   self.hidden_act, self.layer_norm_eps, self.backend, self.dtype)
        self.final_layer_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, use_fast_variance=False)

    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        b, t = input_ids.shape
        if t > self.max_position_embeddings:
            raise PMFInputError(f"input_ids has {t} tokens; this text encoder takes at most "
                                f"{self.max_position_embeddings} (max_position_embeddings)")
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T] causal
        if attention_mask is not None:  # [B, T], 1 = token, 0 = padding (keys only, as transformers)
            mask = mask & (attention_mask.astype(bool)[:, None, None, :])
        hidden_states = self.encoder(self.embeddings(input_ids), mask)
        last = self.final_layer_norm(hidden_states[-1])
        return CLIPTextOutput(last_hidden_state=last, pooler_output=self.pool(last, input_ids),
                              hidden_states=hidden_states)

    def pool(self, last_hidden_state, input_ids):
        """transformers' rule: [B, T, D] at argmax(input_ids) (legacy eos id 2) or the first eos_token_id."""
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            index = jnp.argmax(input_ids, axis=-1)
        else:
            index = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]  # [B, D]


def encoder_config_problems(config) -> list:
    """What a CLIP encoder config (text or vision: ``hidden_act``, ``hidden_size``, ``num_attention_heads``) asks for
    that is not implemented, one phrase each."""
    problems = []
    if config.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act={config.hidden_act!r} (only {' / '.join(ACTIVATIONS)} are implemented)")
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size={config.hidden_size} is not a multiple of "
                        f"num_attention_heads={config.num_attention_heads}")
    return problems


class CLIPTextModel(PretrainedMixin, nn.Module):
    """transformers ``CLIPTextModel`` (fields = its ``CLIPTextConfig`` keys; defaults as transformers').

    input_ids: [B, T] int (T <= max_position_embeddings); attention_mask: optional [B, T], 1 = token, 0 = padding.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407
    dtype: jnp.dtype = jnp.float32
    attention_backend: str = "auto"

    # projection_dim and the token ids other than eos only matter to other classes / the tokenizer; kept to round-trip.
    CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                   "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id",
                   "bos_token_id", "eos_token_id")
    # Keys with no effect on the inference forward pass: metadata, init and dropout settings (dropout is a training
    # option we do not implement), and the generic PretrainedConfig keys that 4.x configs spell out.
    IGNORED_KEYS = (
        "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "attention_dropout", "dropout",
        "initializer_range", "initializer_factor", "return_dict", "output_hidden_states", "output_attentions",
        "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
        "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
        "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
        "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
        "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
        "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "use_cache")
    WEIGHTS_STEM = "model"
    # A buffer that checkpoints written before transformers 4.31 contain.
    IGNORE_UNEXPECTED = (f"{PREFIX}.embeddings.position_ids",)

    def __post_init__(self):
        problems = encoder_config_problems(self)
        if self.eos_token_id is None:
            problems.append("eos_token_id is None (the pooled output needs it)")
        if problems:
            raise PMFInputError("CLIPTextModel config: " + "; ".join(problems))
        super().__post_init__()

    def setup(self):
        self.text_model = CLIPTextTransformer(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
            self.num_attention_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
            self.eos_token_id, self.attention_backend, self.dtype)

    def __call__(self, input_ids, attention_mask=None, clip_skip: int = 0):
        """-> [B, T, D]: last_hidden_state, or with ``clip_skip=k`` the output ``k`` layers earlier through the final
        layer norm (diffusers ``StableDiffusionPipeline`` semantics)."""
        out = self.text_model(input_ids, attention_mask)
        if not clip_skip:
            return out.last_hidden_state
        if not 0 < clip_skip < self.num_hidden_layers:
            raise PMFInputError(f"clip_skip={clip_skip} must be in [0, {self.num_hidden_layers - 1}]")
        return self.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def encode(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        """-> :class:`CLIPTextOutput` (last_hidden_state, pooler_output, hidden_states)."""
        return self.text_model(input_ids, attention_mask)

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, 1), jnp.int32),)

    def to_config(self) -> Dict[str, Any]:
        """A transformers ``CLIPTextConfig`` dict (``CLIPTextModel.from_pretrained`` opens the saved folder)."""
        config = config_of(self)
        config.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        return config

    @classmethod
    def normalize_state_dict(cls, state: Dict[str, Any]) -> Dict[str, Any]:
        """transformers v5 saves ``embeddings.…``; the Hub's SD folders (and this class) use ``text_model.embeddings.…``."""
        if any(key.startswith(f"{PREFIX}.") for key in state):
            return state
        return {f"{PREFIX}.{key}": value for key, value in state.items()}


def load_tokenizer(path_or_repo_id: str | os.PathLike, subfolder: Optional[str] = "tokenizer", **kwargs):
    """transformers ``CLIPTokenizer`` from a local folder or a Hub repo in the local cache (no network).

    ``subfolder`` defaults to a pipeline's ``tokenizer``; pass ``None`` for a folder that holds vocab.json itself.
    """
    from transformers import CLIPTokenizer

    folder = resolve_folder(path_or_repo_id, subfolder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise PMFInputError(f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt): {err}") from err
