"""The retarget chained with the masked, text-guided enhancement: ``pmf retarget --enhance`` in real subprocesses,
:class:`PMFPipeline` in Python (the same PNGs), the mask modes of :class:`EnhancePipeline`.

What "outside the mask the output is the input up to the VAE round trip" is measured on (uint8 levels, max over the
pixels the written mask_XX.png leaves black, no erosion):
  (a) ``|decode(encode(result)) - result|``, the autoencoder's round trip of the enhancement's input alone;
  (b) ``|enhanced - result|``, the enhanced output against its input;
and (b) - (a) <= 2. The CLI runs use a pixel-space InstructPix2Pix (:func:`pixel_ip2p`: the tiny IP2P's text encoder,
tokenizer and scheduler with a UNet on 4×4 pixel patches, so the identity autoencoder): the tiny random SD VAE of
tests/tiny_sd.py cannot reproduce its input at all (its round trip is off by up to 255 levels) and its decoder's
mid-block attention lets every latent reach every pixel, so (b) - (a) measured through it says nothing. With the
tiny SD VAE the blend is checked where it acts, on the latents: outside the mask the final latents are the input's own
latent, exactly (:func:`test_masks_in_python`).
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from compile_counter import CompileCounter
from parity import randomize_
from test_cli_retarget import COMMON, cli  # noqa: F401  (cli: fixture)
from test_golden import check_pixels
from tiny_sd import UNET, tiny_sd  # noqa: F401  (tiny_sd: fixture)

PATCH = 4  # the pixel-space IP2P's patch: 64x64 images are 16x16x48 "latents"


@pytest.fixture(scope="module")
def pixel_ip2p(tiny_sd, tmp_path_factory):
    """An InstructPix2Pix folder without vae/: the tiny IP2P's text encoder, tokenizer and scheduler, and a random
    UNet on 4×4 pixel patches (2·48 channels in, 48 out), which the loader pairs with the identity autoencoder."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("pixel_ip2p")
    for part in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(tiny_sd.ip2p / part, folder / part)
    torch.manual_seed(0)
    channels = 3 * PATCH ** 2
    unet = UNet2DConditionModel(**dict(UNET, in_channels=2 * channels, out_channels=channels, sample_size=64 // PATCH))
    randomize_(unet, seed=6, scale=0.1).save_pretrained(folder / "unet")
    return folder


def _png(path):
    return np.asarray(Image.open(path))


def _round_trip(folder, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] through the autoencoder of the IP2P ``folder`` and back (uint8)."""
    from pmf_jax.pipelines import EnhancePipeline, common
    from pmf_jax.pipelines.images import to_pil

    pipe = _round_trip.cache.get(folder) or EnhancePipeline.from_pretrained(folder)
    _round_trip.cache[folder] = pipe
    latent = common.vae_encode(pipe.vae, pipe.params["vae"], jnp.asarray(image[None], jnp.float32) / 127.5 - 1.0)
    return np.asarray(to_pil(np.asarray(common.vae_decode(pipe.vae, pipe.params["vae"], latent))[0]))


_round_trip.cache = {}


def _outside_mask_levels(folder, result, enhanced, mask):
    """((a), (b)) of the module docstring, in uint8 levels, over the pixels ``mask`` (bool) leaves out."""
    keep = ~mask
    assert keep.sum() >= 0.1 * keep.size, "the mask must leave some of the image"
    a = np.abs(_round_trip(folder, result).astype(int) - result)[keep].max()
    b = np.abs(enhanced.astype(int) - result)[keep].max()
    return int(a), int(b)


def _changed_inside(result, enhanced, mask) -> float:
    return float(np.abs(enhanced.astype(float) - result)[mask].mean())


def test_chained_cli_person_mask_equals_pmf_pipeline(cli, tiny_sd, pixel_ip2p, tmp_path):
    """One process: the retarget of 2 images, each enhanced inside its person mask; one progress line per stage;
    then :class:`PMFPipeline` in this process gives the same PNGs."""
    out = tmp_path / "person"
    args = dict(prompt="a man", enhance="make the shirt red", image_guidance_scale=1.2)
    proc = cli("retarget", "--model", tiny_sd.sd, "--controlnet", tiny_sd.controlnet, "--mode", "controlnet_only",
               "--source", tiny_sd.source, "--pose", tiny_sd.pose, "--out", out,
               "--num-images", "2", "--prompt", args["prompt"], "--enhance", args["enhance"], "--enhance-model",
               pixel_ip2p, "--enhance-mask", "person", "--image-guidance-scale", "1.2",
               *[a for a in COMMON if a != "--no-progress"])
    assert "retarget (controlnet_only): 2/2 step" in proc.stderr and "enhance: 2/2 step" in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "enhanced_00.png", "enhanced_01.png", "grid.png", "mask_00.png", "mask_01.png", "pose.png", "result_00.png",
        "result_01.png", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["enhance"] == "make the shirt red" and settings["enhance_mask"] == "person"
    assert settings["resolved_enhance"] == {
        "model": str(pixel_ip2p), "mask": "person", "image_guidance_scale": 1.2,
        "sampling": {"scheduler": "unipc", "steps": 2, "guidance_scale": 7.5},
        "outputs": ["enhanced_00.png", "enhanced_01.png"], "masks": ["mask_00.png", "mask_01.png"]}

    skeleton = _png(tiny_sd.pose).max(axis=-1) > 16
    for i in range(2):
        result, enhanced = _png(out / f"result_{i:02d}.png"), _png(out / f"enhanced_{i:02d}.png")
        mask = _png(out / f"mask_{i:02d}.png") > 127
        assert mask[skeleton].all() and not mask[:, :8].any()     # the person (dilated), not the background
        a, b = _outside_mask_levels(pixel_ip2p, result, enhanced, mask)
        inside = _changed_inside(result, enhanced, mask)
        print(f"person mask, image {i}: outside the mask (a) round trip {a}, (b) enhanced {b} levels; "
              f"inside mean change {inside:.1f} levels")
        assert b - a <= 2 and inside > 2.0

    from pmf_jax.pipelines import EnhancePipeline, PMFPipeline, RetargetPipeline

    pmf = PMFPipeline(RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet,
                                                       mode="controlnet_only"),
                      EnhancePipeline.from_pretrained(pixel_ip2p))
    got = pmf(str(tiny_sd.source), str(tiny_sd.pose), num_inference_steps=2, height=64, width=64, num_images=2,
              seed=7, enhance_mask="person", **args)
    for i in range(2):
        for name, image in (("result", got.images[i]), ("enhanced", got.enhanced[i]), ("mask", got.masks[i])):
            np.testing.assert_array_equal(np.asarray(image), _png(out / f"{name}_{i:02d}.png"), err_msg=name)


def test_chained_cli_user_mask_from_the_model_folder(cli, tiny_sd, pixel_ip2p, tmp_path, capsys):
    """The enhancement model from --model's enhance/ subfolder; a user mask PNG; bad combinations are one line."""
    model = tmp_path / "model"
    model.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (model / part).symlink_to(tiny_sd.sd / part)
    (model / "controlnet").symlink_to(tiny_sd.controlnet)
    (model / "enhance").symlink_to(pixel_ip2p)
    user = np.zeros((64, 64), np.uint8)
    user[8:40, 20:52] = 255
    Image.fromarray(user).save(tmp_path / "user_mask.png")
    out = tmp_path / "user"
    base = ["retarget", "--model", model, "--source", tiny_sd.source, "--pose", tiny_sd.pose, "--mode",
            "controlnet_only", "--num-images", "1", "--out", out, *COMMON]
    cli(*base, "--enhance", "make it blue", "--enhance-mask", tmp_path / "user_mask.png")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["resolved_enhance"]["model"] == str(model / "enhance")
    result, enhanced = _png(out / "result_00.png"), _png(out / "enhanced_00.png")
    mask = _png(out / "mask_00.png") > 127
    np.testing.assert_array_equal(mask, user > 127)   # on the 4-pixel grid already: applied as given
    a, b = _outside_mask_levels(pixel_ip2p, result, enhanced, mask)
    inside = _changed_inside(result, enhanced, mask)
    with capsys.disabled():
        print(f"user mask: outside the mask (a) round trip {a}, (b) enhanced {b} levels; inside mean change "
              f"{inside:.1f} levels")
    assert b - a <= 2 and inside > 2.0

    from pmf_jax import cli as pmf_cli

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((64, 32), 255, np.uint8)).save(tmp_path / "narrow.png")
    bad = tmp_path / "bad"
    retarget = ["retarget", "--source", tiny_sd.source, "--pose", tiny_sd.pose, "--mode", "controlnet_only",
                "--out", bad]
    cases = {  # each one line (exit status 2) before any model loads
        "--enhance-mask needs --enhance": ["--model", model, "--enhance-mask", "person"],
        "--image-guidance-scale needs --enhance": ["--model", model, "--image-guidance-scale", "2"],
        "give --enhance-model FOLDER": ["--model", tiny_sd.sd, "--enhance", "x"],
        "give one of none, person, attention": ["--model", model, "--enhance", "x", "--enhance-mask", "everything"],
        "is all black": ["--model", model, "--enhance", "x", "--enhance-mask", tmp_path / "black.png"],
        "of the image's size": ["--model", model, "--enhance", "x", "--enhance-mask", tmp_path / "narrow.png"],
    }
    enhance = ["enhance", "--model", pixel_ip2p, "--image", tiny_sd.source, "--instruction", "x", "--out",
               bad / "e.png"]
    cases["--mask person needs --pose"] = enhance + ["--mask", "person"]
    cases["--pose is only used by --mask person"] = enhance + ["--pose", tiny_sd.pose]
    capsys.readouterr()
    for expected, argv in cases.items():
        argv = argv if argv[0] == "enhance" else retarget + argv
        assert pmf_cli.main([str(a) for a in argv]) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (expected, err)
    assert not bad.exists()


def test_masks_in_python(tiny_sd):
    """The tiny SD IP2P (with its VAE): no mask is today's EnhancePipeline; outside a person or user mask the final
    latents are the input's latent; the attention mask follows the instruction's words; nothing recompiles."""
    from pmf_jax.pipelines import EnhancePipeline, common
    from pmf_jax.pipelines.enhance_mask import latent_mask, person_mask
    from pmf_jax.pipelines.images import to_float, to_pil

    pipe = EnhancePipeline.from_pretrained(tiny_sd.ip2p)
    kw = dict(num_inference_steps=2, height=64, width=64, seed=7)
    plain = pipe(tiny_sd.source, "make it blue", output_type="np", **kw)
    # the PNG `pmf enhance` wrote with these settings before masks existed (tests/golden, test_cli_retarget.py)
    check_pixels("cli_retarget_pixels", {"enhance/out.png": np.asarray(to_pil(plain[0]))})
    np.testing.assert_array_equal(pipe(tiny_sd.source, "make it blue", mask="none", output_type="np", **kw), plain)

    source = _png(tiny_sd.source)
    clean = np.asarray(common.vae_encode(pipe.vae, pipe.params["vae"], jnp.asarray(to_float(source)[None]) * 2.0 - 1.0))
    user = np.zeros((64, 64), bool)
    user[:, 40:] = True
    for name, mask, cells in (
            ("person", dict(mask="person", pose=tiny_sd.pose), latent_mask(person_mask(_png(tiny_sd.pose)), 8)),
            ("user", dict(mask=user), latent_mask(user, 8))):
        edited, masks = pipe(tiny_sd.source, "make it blue", output_type="latent", return_mask=True, **mask, **kw)
        keep = cells[..., 0] < 0.5
        assert 0 < keep.sum() < keep.size and masks[0][::8, ::8].tolist() == (~keep).tolist()
        outside = np.abs(edited[0] - clean[0])[keep].max()
        inside = np.abs(edited[0] - clean[0])[~keep].mean()
        print(f"SD VAE, {name} mask: final latents outside the mask vs the input's latent: max {outside:.2e}; "
              f"inside mean {inside:.3f}")
        assert outside <= 1e-6 and inside > 0.05

    with CompileCounter() as counter:  # the latents' programs are compiled: only the attention-map pass is new
        shirt = pipe(tiny_sd.source, "make the shirt red", mask="attention", output_type="latent", return_mask=True,
                     **kw)[1][0]
        counted = counter.count
        hat = pipe(tiny_sd.source, "make the hat red", mask="attention", output_type="latent", return_mask=True,
                   guidance_scale=5.0, image_guidance_scale=1.1, **kw)[1][0]
        pipe(tiny_sd.source, "make it green", mask=~user, output_type="latent", **dict(kw, seed=3))
    assert counter.count == counted, "a new instruction, mask, seed or scale compiles nothing"
    print(f"attention masks: shirt {shirt.mean():.2f}, hat {hat.mean():.2f} of the image, {np.sum(shirt != hat)} "
          f"pixels differ")
    assert shirt.any() and hat.any() and not shirt.all() and (shirt != hat).any()


def test_kept_latents_match_diffusers_add_noise():
    """What the kept region holds after step i: diffusers' ``add_noise`` of the scheduler at timestep i + 1 (Euler:
    its σ-scaled noising), the clean latent after the last step."""
    import diffusers
    import torch

    from pmf_jax.constants import SD15_SCHEDULER_CONFIG
    from pmf_jax.pipelines.enhance import kept_latents
    from pmf_jax.schedulers import make_scheduler

    rng = np.random.default_rng(0)
    clean, noise = (rng.standard_normal((2, 4, 4, 4)).astype(np.float32) for _ in range(2))
    for name, torch_cls in (("unipc", diffusers.UniPCMultistepScheduler), ("euler", diffusers.EulerDiscreteScheduler),
                            ("ddim", diffusers.DDIMScheduler)):
        ours = make_scheduler(name, SD15_SCHEDULER_CONFIG)
        theirs = torch_cls.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items()})
        theirs.set_timesteps(4)
        state = ours.init_state(4, jnp.asarray(noise))
        for i in range(4):
            got = np.asarray(kept_latents(ours, state.replace(step_index=jnp.int32(i + 1)), jnp.asarray(clean),
                                          jnp.asarray(noise)))
            if i + 1 < 4:
                want = theirs.add_noise(torch.from_numpy(clean), torch.from_numpy(noise),
                                        theirs.timesteps[i + 1:i + 2]).numpy()
            else:
                want = clean
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name} step {i}")
