"""AutoencoderKL parity with diffusers: tiny random torch models, saved and loaded by pmf_jax.io."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pmf_jax.io as pio
from pmf_jax.errors import PMFInputError
from pmf_jax.models.vae import AutoencoderKL
from parity import rel_err, to_nchw, to_nhwc

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def tiny_config(**overrides):
    config = dict(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=32)
    config.update(overrides)
    return config


def torch_vae(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    # Random init leaves norms at identity and some biases at zero; perturb every tensor so each is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_outputs(model, image_nhwc, latents_nhwc):
    with torch.no_grad():
        dist = model.encode(to_nchw(image_nhwc)).latent_dist
        decoded = model.decode(to_nchw(latents_nhwc)).sample
    return to_nhwc(dist.mean), to_nhwc(dist.logvar), to_nhwc(decoded)


def jax_outputs(module, params, image, latents):
    with jax.default_matmul_precision("highest"):
        enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
        dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
        mean, logvar = enc(params, jnp.asarray(image))
        decoded = dec(params, jnp.asarray(latents))
    return np.asarray(mean), np.asarray(logvar), np.asarray(decoded)


def inputs(config, size=32, seed=1):
    rng = np.random.default_rng(seed)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    image = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    latents = rng.standard_normal((2, size // f, size // f, config["latent_channels"])).astype(np.float32)
    return image, latents


CASES = {
    "lpb1": tiny_config(),
    "lpb2_noquant": tiny_config(layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False),
    "noattn_latent8": tiny_config(mid_block_add_attention=False, latent_channels=8, shift_factor=0.1,
                                  scaling_factor=0.5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    config = CASES[name]
    model = torch_vae(config)
    model.save_pretrained(tmp_path / "torch")
    module, params = pio.from_pretrained(tmp_path / "torch")
    assert isinstance(module, AutoencoderKL)
    assert module.scaling_factor == config.get("scaling_factor", 0.18215)
    assert module.shift_factor == config.get("shift_factor")
    assert module.downscale_factor == 4

    image, latents = inputs(config)
    want = torch_outputs(model, image, latents)
    got = jax_outputs(module, params, image, latents)
    for label, g, w in zip(("mean", "logvar", "decode"), got, want):
        assert g.shape == w.shape, (label, g.shape, w.shape)
        err = rel_err(g, w)
        print(f"{name} {label}: rel err {err:.2e}")
        assert err <= TOL, (label, err)

    # Round trip: our save -> diffusers load gives the very same torch model.
    pio.save_pretrained(module, params, tmp_path / "ours")
    saved_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved_config["_class_name"] == "AutoencoderKL"
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.use_quant_conv == config.get("use_quant_conv", True)
    assert reloaded.config.mid_block_add_attention == config.get("mid_block_add_attention", True)
    assert reloaded.config.scaling_factor == config.get("scaling_factor", 0.18215)
    original = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    again = torch_outputs(reloaded, image, latents)
    for g, w in zip(again, want):
        np.testing.assert_array_equal(g, w)


def test_logvar_is_clamped(tmp_path):
    config = tiny_config()
    model = torch_vae(config)
    with torch.no_grad():  # push the log-variance half of quant_conv far out of [-30, 20]
        model.quant_conv.bias[4:] = 100.0
        model.quant_conv.bias[4:6] = -100.0
    model.save_pretrained(tmp_path)
    module, params = pio.from_pretrained(tmp_path)
    image, latents = inputs(config)
    _, logvar, _ = jax_outputs(module, params, image, latents)
    assert logvar.max() == 20.0 and logvar.min() == -30.0
    np.testing.assert_allclose(logvar, torch_outputs(model, image, latents)[1], rtol=0, atol=0)


@pytest.mark.parametrize("conv_layout", [False, True])
def test_legacy_attention_names(tmp_path, conv_layout):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn (as Linear or as 1x1 conv)."""
    config = tiny_config()
    model = torch_vae(config)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if conv_layout and value.ndim == 2:
                    value = value[:, :, None, None]
        legacy[key] = value.contiguous()
    assert sum(".query." in k for k in legacy) == 4  # weight + bias, encoder + decoder
    save_file(legacy, weights, metadata={"format": "pt"})

    module, params = pio.from_pretrained(tmp_path)
    image, latents = inputs(config)
    for label, g, w in zip(("mean", "logvar", "decode"), jax_outputs(module, params, image, latents),
                           torch_outputs(model, image, latents)):
        assert rel_err(g, w) <= TOL, label


def _param_count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_sd15_parameter_count():
    config = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  sample_size=512, in_channels=3, out_channels=3, act_fn="silu")
    module = AutoencoderKL.from_config({"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", **config})
    assert module.downscale_factor == 8
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config)
    torch_count = sum(p.numel() for p in reference.parameters())
    assert torch_count == 83_653_863
    assert _param_count(module.abstract_params()) == torch_count


def test_config_errors():
    with pytest.raises(PMFInputError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL.from_config(tiny_config(down_block_types=["AttnDownEncoderBlock2D"] * 3))
    with pytest.raises(PMFInputError, match="act_fn"):
        AutoencoderKL.from_config(tiny_config(act_fn="gelu"))
    with pytest.raises(PMFInputError, match="not_a_key"):
        AutoencoderKL.from_config(tiny_config(not_a_key=1))
    # What diffusers writes for a current AutoencoderKL is accepted as is.
    written = dict(diffusers.AutoencoderKL(**tiny_config()).config)
    module = AutoencoderKL.from_config(written)
    assert module.to_config()["block_out_channels"] == [32, 64, 64]


def test_bfloat16_compute(tmp_path):
    """bf16 params and compute (the accelerator setting) stay close to the fp32 torch model."""
    config = tiny_config()
    model = torch_vae(config)
    model.save_pretrained(tmp_path)
    module, params = pio.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    image, latents = inputs(config)
    got = jax_outputs(module, params, image, latents)
    assert got[0].dtype == jnp.bfloat16
    for label, g, w in zip(("mean", "logvar", "decode"), got, torch_outputs(model, image, latents)):
        assert rel_err(g, w) <= 3e-2, label
