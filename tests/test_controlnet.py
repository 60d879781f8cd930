"""ControlNetModel parity with diffusers (every residual, fp32, relative error ≤ 1e-4) and from_unet initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from pmf_jax.io import from_pretrained
from pmf_jax.models.controlnet import ControlNetModel, controlnet_from_unet
from parity import randomize_, rel_err, to_nchw, to_nhwc

BASE = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            layers_per_block=1, attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 16))

CONFIGS = {
    "openpose_like": dict(BASE),
    "custom_cond_channels_bgr_linear": dict(BASE, conditioning_channels=1, conditioning_embedding_out_channels=(4, 8, 16),
                                            controlnet_conditioning_channel_order="bgr", use_linear_projection=True,
                                            attention_head_dim=(2, 4), layers_per_block=2),
    "pooled_upcast_two_layers": dict(BASE, global_pool_conditions=True, upcast_attention=True,
                                     transformer_layers_per_block=2, conditioning_channels=3,
                                     conditioning_embedding_out_channels=(4, 8, 8, 16)),
}


def _cond_size(config, latent):
    return latent * 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_controlnet_matches_diffusers(tmp_path, name):
    config = CONFIGS[name]
    torch_model = randomize_(TorchControlNet(**config).eval(), seed=4, scale=0.15)
    torch_model.save_pretrained(tmp_path / "controlnet")
    module, params = from_pretrained(tmp_path / "controlnet")
    assert isinstance(module, ControlNetModel)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    size = _cond_size(config, 8)
    cond = rng.uniform(size=(2, size, size, config.get("conditioning_channels", 3))).astype(np.float32)
    t = np.array([3, 999], np.int32)
    with torch.no_grad():
        out = torch_model(to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx), to_nchw(cond),
                          conditioning_scale=0.7, return_dict=False)
    down, mid = jax.jit(module.apply)({"params": params}, x, t, ctx, cond, 0.7)
    assert len(down) == len(out[0])
    for ours, theirs in zip(down, out[0]):
        assert rel_err(ours, to_nhwc(theirs)) <= 1e-4
    assert rel_err(mid, to_nhwc(out[1])) <= 1e-4


def test_controlnet_guess_mode_matches_diffusers(tmp_path):
    config = CONFIGS["openpose_like"]
    torch_model = randomize_(TorchControlNet(**config).eval(), seed=5, scale=0.15)
    torch_model.save_pretrained(tmp_path / "cn")
    module, params = from_pretrained(tmp_path / "cn")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 3, 24)).astype(np.float32)
    cond = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(to_nchw(x), 50, torch.from_numpy(ctx), to_nchw(cond), guess_mode=True, return_dict=False)
    down, mid = module.apply({"params": params}, x, 50, ctx, cond, 1.0, guess_mode=True)
    assert max(rel_err(a, to_nhwc(b)) for a, b in zip(down, out[0])) <= 1e-4
    assert rel_err(mid, to_nhwc(out[1])) <= 1e-4


def test_from_unet_copies_encoder_and_zeroes_outputs(tmp_path):
    unet_config = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                       cross_attention_dim=24, norm_num_groups=8)
    torch_unet = randomize_(TorchUNet(**unet_config).eval(), seed=6)
    torch_unet.save_pretrained(tmp_path / "unet")
    unet, unet_params = from_pretrained(tmp_path / "unet")
    module, params = controlnet_from_unet(unet, unet_params, jax.random.key(0),
                                          conditioning_embedding_out_channels=(8, 16))
    torch_cn = TorchControlNet.from_unet(torch_unet, conditioning_embedding_out_channels=(8, 16))
    # Same parameter set as diffusers' from_unet, and the shared parts are the UNet's values.
    from pmf_jax.io import params_to_state_dict

    ours = params_to_state_dict(params)
    theirs = {k: v.numpy() for k, v in torch_cn.state_dict().items()}
    assert set(ours) == set(theirs)
    for key in theirs:
        if key.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block")):
            np.testing.assert_array_equal(ours[key], theirs[key])
        if key.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            assert not np.any(ours[key]) and not np.any(theirs[key])
    rng = np.random.default_rng(2)
    down, mid = module.apply({"params": params}, rng.standard_normal((1, 8, 8, 4)), 10,
                             rng.standard_normal((1, 3, 24)), rng.uniform(size=(1, 16, 16, 3)))
    assert all(float(jnp.abs(d).max()) == 0.0 for d in down) and float(jnp.abs(mid).max()) == 0.0


def test_sd15_controlnet_parameter_count_matches_torch():
    config = dict(cross_attention_dim=768, attention_head_dim=8)
    abstract = ControlNetModel.from_config(config).abstract_params()
    ours = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchControlNet(**config).parameters())
    assert ours == theirs == 361_279_120
