"""The attention function: the XLA reference against numpy, fp32 softmax for bf16 inputs, backend selection, the
Pallas TPU flash kernel in interpret mode on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmf_jax.models.attention import (CUDNN_MIN_SEQ_LEN, Attention, dot_product_attention, flash_supported,
                                     resolve_backend)
from parity import rel_err


def _numpy_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(lq=7, lk=11, heads=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, lq, heads, dim)).astype(np.float32),
            rng.standard_normal((2, lk, heads, dim)).astype(np.float32),
            rng.standard_normal((2, lk, heads, dim)).astype(np.float32))


def test_xla_backend_matches_numpy():
    q, k, v = _qkv()
    assert rel_err(dot_product_attention(q, k, v, backend="xla"), _numpy_attention(q, k, v)) < 1e-6
    # and jax's own implementation agrees
    assert rel_err(dot_product_attention(q, k, v, backend="xla"),
                   jax.nn.dot_product_attention(q, k, v, implementation="xla")) < 1e-6


def test_bf16_inputs_keep_fp32_softmax():
    q, k, v = _qkv(seed=1)
    q = q * 8  # sharp logits: a bf16 softmax would lose them
    out = dot_product_attention(jnp.bfloat16(q), jnp.bfloat16(k), jnp.bfloat16(v), backend="xla", upcast=True)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(np.float32), _numpy_attention(q, k, v)) < 2e-2


@pytest.mark.parametrize("platform,dtype,q_len,want", [
    ("cpu", jnp.bfloat16, 4096, "xla"),
    ("gpu", jnp.bfloat16, 4096, "cudnn"),
    ("gpu", jnp.float16, CUDNN_MIN_SEQ_LEN, "cudnn"),
    ("gpu", jnp.bfloat16, 64, "xla"),     # short sequences: XLA wins (docs/architecture.md measurements)
    ("gpu", jnp.float32, 4096, "xla"),    # cuDNN flash needs half precision
    ("tpu", jnp.bfloat16, 4096, "xla"),
])
def test_auto_backend_selection(platform, dtype, q_len, want):
    assert resolve_backend("auto", q_len, 40, dtype, platform=platform) == want


def test_unknown_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("fastest", 64, 40, jnp.float32)
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        resolve_backend("cudnn", 64, 40, jnp.bfloat16, platform="cpu")
    with pytest.raises(ValueError, match="'flash' runs on TPU only"):
        resolve_backend("flash", 64, 40, jnp.bfloat16, platform="gpu")


def test_this_platform_backends_agree():
    """On a GPU: cuDNN flash against XLA at the SD1.5 head dims; elsewhere: auto resolves to XLA."""
    if jax.default_backend() != "gpu":
        assert resolve_backend("auto", 4096, 40, jnp.bfloat16) == "xla"
        return
    for dim in (40, 80, 160):
        q, k, v = (jnp.bfloat16(a) for a in _qkv(lq=1024, lk=2048, heads=8, dim=dim, seed=dim))
        ours = dot_product_attention(q, k, v, backend="cudnn")
        ref = dot_product_attention(q, k, v, backend="xla")
        assert rel_err(ours.astype(np.float32), ref.astype(np.float32)) < 1e-2


@pytest.mark.parametrize("lq,lk,dim,kernel", [
    (128, 128, 40, True),    # self-attention, SD's 40-dim heads
    (64, 128, 80, True),     # an 8x8 latent reading its reference bank (keys = 2 x 64 tokens), 80-dim heads
    (256, 512, 64, True),    # several tiles along queries and keys
    (64, 77, 40, False),     # text cross-attention (77 keys): XLA
    (128, 128, 160, False),  # the 1280-channel blocks' 160-dim heads: XLA
])
def test_flash_backend_in_pallas_interpret_mode(lq, lk, dim, kernel):
    """The ``flash`` backend under ``force_tpu_interpret_mode`` (the TPU kernel's program run on the CPU): output and
    gradients equal the XLA path; the Pallas kernel runs exactly where :func:`flash_supported` says."""
    from jax.experimental.pallas import tpu as pltpu

    assert flash_supported(lq, lk, dim) == kernel
    q, k, v = _qkv(lq, lk, heads=2, dim=dim, seed=lq + dim)

    def loss(backend):
        return lambda *a: jnp.sum(jnp.sin(dot_product_attention(*a, backend=backend)))

    with pltpu.force_tpu_interpret_mode():
        assert resolve_backend("flash", lq, dim, jnp.float32) == "flash"
        out = dot_product_attention(q, k, v, backend="flash")
        grads = jax.grad(loss("flash"), argnums=(0, 1, 2))(q, k, v)
        program = str(jax.make_jaxpr(loss("flash"))(q, k, v))
    assert ("pallas_call" in program) == kernel
    assert rel_err(out, _numpy_attention(q, k, v)) < 1e-5  # measured ~1e-7
    for ours, ref in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        assert rel_err(ours, ref) < 1e-5


def test_flash_attention_layer_reads_the_reference_in_interpret_mode():
    """The attention layer with ``kv_extra`` (the reference-bank read) on the flash backend equals the XLA layer."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(3)
    x, bank = (rng.standard_normal((2, 64, 32)).astype(np.float32) for _ in range(2))
    layer = Attention(heads=2, dim_head=16, backend="xla")
    params = layer.init(jax.random.key(0), x, kv_extra=bank)
    with pltpu.force_tpu_interpret_mode():
        ours = layer.clone(backend="flash").apply(params, x, kv_extra=bank)
    assert rel_err(ours, layer.apply(params, x, kv_extra=bank)) < 1e-5
