"""The parameter-free identity autoencoder and a pixel-space, prompt-free RetargetPipeline built from Flax modules
(what the trainer's demo does), checked against the same step computed by hand from the modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import rel_err
from pmf_jax.errors import PMFInputError
from pmf_jax.models.identity_vae import IdentityAutoencoder
from pmf_jax.pipelines import RetargetPipeline
from pmf_jax.pipelines.common import vae_decode, vae_encode
from pmf_jax.reference import ReferenceConfig, ReferenceRead
from pmf_jax.schedulers import make_scheduler

SIZE, CTX = 16, 8


@pytest.mark.parametrize("patch", [1, 2])
def test_identity_autoencoder_round_trip(patch):
    ae = IdentityAutoencoder(patch_size=patch)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)), jnp.float32)
    assert ae.init(jax.random.key(0), x) == {}  # no parameters
    mean, logvar = ae.apply({"params": {}}, x, method=ae.encode)
    assert mean.shape == (2, 8 // patch, 12 // patch, 3 * patch ** 2) and ae.latent_channels == 3 * patch ** 2
    assert ae.downscale_factor == patch and float(jnp.abs(logvar).max()) == 0.0
    np.testing.assert_array_equal(ae.apply({"params": {}}, mean, method=ae.decode), x)
    if patch == 1:
        np.testing.assert_array_equal(mean, x)
    else:  # space-to-depth: latent pixel (0, 0) holds the 2x2 patch in row-major order
        np.testing.assert_array_equal(mean[0, 0, 0], np.asarray(x[0, :2, :2]).reshape(-1))
    # the pipelines' helpers: images in [0, 1] <-> [-1, 1] model space, scaling_factor 1
    images01 = (x + 1) / 2
    latents = vae_encode(ae, {}, images01 * 2 - 1)
    np.testing.assert_allclose(vae_decode(ae, {}, latents), images01, atol=1e-6)


def build_pixel_models(root):
    """Tiny pixel-space UNet / ControlNet / reference UNet (random weights, diffusers-saved, loaded by pmf_jax.io)."""
    from diffusers import ControlNetModel, UNet2DConditionModel as TorchUNet

    from parity import randomize_
    from pmf_jax.io import from_pretrained

    unet = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=CTX)
    models = {"unet": TorchUNet(in_channels=3, out_channels=3, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                **unet),
              "controlnet": ControlNetModel(in_channels=3, conditioning_embedding_out_channels=(4,), **unet)}
    models["reference_unet"] = TorchUNet(**models["unet"].config)
    out = {}
    for seed, (name, model) in enumerate(models.items()):
        randomize_(model, seed=seed, scale=0.15).save_pretrained(root / name)
        out[name] = from_pretrained(root / name)
    return out["unet"], out["controlnet"], out["reference_unet"]


@pytest.fixture(scope="module")
def pixel_models(tmp_path_factory):
    return build_pixel_models(tmp_path_factory.mktemp("pixel"))


SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "timestep_spacing": "trailing", "clip_sample": False}


def reference_step(models, sources, poses, x, config, guidance):
    """One trailing DDIM step (t = 999) computed by hand from the modules, sample by sample (no pipeline): the bank
    written once at t=0 from the source pixels; an unconditional row (reads the bank, blended by style_fidelity)
    and a conditional row; CFG. sources, poses: uint8 [N, H, W, 3]; x: [N, H, W, 3] -> x_prev [N, H, W, 3]."""
    (unet, p_unet), (cn, p_cn), (ref, p_ref) = models
    ctx, t = jnp.zeros((1, 1, CTX)), jnp.array([999])

    @jax.jit
    def guided_eps(xn, pose_n, source_n):
        bank = ref.apply({"params": p_ref}, source_n * 2 - 1, jnp.zeros(1, jnp.int32), ctx, method=ref.write_reference)
        down, mid = cn.apply({"params": p_cn}, xn, t, ctx, pose_n)
        u, c = (unet.apply({"params": p_unet}, xn, t, ctx, down, mid, reference=ReferenceRead.build(bank, config, 1,
                                                                  uncond_mask=jnp.array([flag]))) for flag in (1.0, 0.0))
        return u + guidance * (c - u)

    eps = [guided_eps(x[n:n + 1], poses[n:n + 1] / 255.0, sources[n:n + 1] / 255.0) for n in range(len(x))]
    scheduler = make_scheduler("ddim", SCHEDULE)
    state = scheduler.init_state(1, jnp.asarray(x))
    return scheduler.step(state, jnp.concatenate(eps), jnp.asarray(x))[1]


def pixel_inputs(n, seed=0):
    """n random sources, n random pose images (any uint8 image is taken as is with pose_kind="skeleton"), x_T."""
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    poses = np.where(rng.uniform(0, 1, (n, SIZE, SIZE, 3)) > 0.8, 255, 0).astype(np.uint8)
    return sources, poses, rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)


def test_pixel_space_prompt_free_step_matches_modules(pixel_models):
    pipe = RetargetPipeline(*pixel_models[:2], vae=None, text_encoder=None, reference_unet=pixel_models[2],
                            mode="acm", scheduler_config=SCHEDULE)
    sources, poses, x = pixel_inputs(2)
    config = ReferenceConfig(style_fidelity=0.5, reference_timestep="zero")
    kw = dict(num_inference_steps=1, guidance_scale=3.0, scheduler="ddim", num_images=2, reference_config=config,
              height=SIZE, width=SIZE, pose_kind="skeleton")
    got = pipe(sources[0], poses[0], latents=x, output_type="latent", **kw)
    want = reference_step(pixel_models, sources[[0, 0]], poses[[0, 0]], x, config, 3.0)
    assert rel_err(got, want) <= 1e-5

    # Without style fidelity the unconditional row reads the reference fully: another result.
    plain = pipe(sources[0], poses[0], latents=x, output_type="latent",
                 **dict(kw, reference_config=ReferenceConfig(reference_timestep="zero")))
    assert rel_err(plain, got) > 1e-3
    with pytest.raises(PMFInputError, match="no text encoder"):
        pipe(sources[0], poses[0], prompt="a person", **kw)


def test_fixed_context_for_prompt_free_models(pixel_models):
    (unet, p_unet), (cn, p_cn), _ = pixel_models
    context = np.random.default_rng(1).standard_normal((1, 3, CTX)).astype(np.float32)
    pipe = RetargetPipeline((unet, p_unet), (cn, p_cn), mode="controlnet_only", context=context)
    np.testing.assert_array_equal(pipe.prompts(["", ""]), np.repeat(context, 2, axis=0))
    zeros = RetargetPipeline((unet, p_unet), (cn, p_cn), mode="controlnet_only")
    assert zeros.prompts([""]).shape == (1, 1, CTX) and not zeros.prompts([""]).any()
