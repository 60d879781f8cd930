"""What a model folder says about sampling it (pmf_jax.pipelines.defaults), the memory check's arithmetic
(pmf_jax.pipelines.memory), and the guidance layouts of a model without a text encoder: the rows that differ by
their text alone are not computed, with the same result."""

import dataclasses
import json

import numpy as np
import pytest

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.images import resolve_size
from pmf_jax.pipelines.memory import MEMORY_LIMIT_ENV, check_fits, memory_limit_setting, suggest_size
from tiny_sd import tiny_sd  # noqa: F401  (fixture)


def _folder(root, unet, vae=None):
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps(unet))
    if vae is not None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    return root


def test_native_size_and_the_default_size(tiny_sd, tiny_export, tmp_path):
    assert native_size(tiny_sd.sd) == (64, 64)            # sample_size 8 x a 4-level VAE's factor 8
    assert native_size(tiny_export) == (64, 64)           # pmf_config.json "resolution"
    sd15 = _folder(tmp_path / "sd15", {"sample_size": 64, "out_channels": 4}, {"block_out_channels": [1, 2, 3, 4]})
    pixel = _folder(tmp_path / "pixel", {"sample_size": [16, 8], "out_channels": 48})   # identity VAE, p = 4
    assert native_size(sd15) == (512, 512) and native_size(pixel) == (64, 32)
    assert native_size(_folder(tmp_path / "no_size", {"out_channels": 4}, {"block_out_channels": [1]})) is None
    portrait = (1024, 700, 3)
    assert resolve_size(portrait, None, None, (64, 32)) == (64, 32)       # small models: their own size only
    assert resolve_size(portrait, None, None, (512, 512)) == (512, 384)   # 512 and more: the aspect-ratio bucket
    assert resolve_size(portrait, None, None, None) == (512, 384)         # unknown: as before
    assert resolve_size((700, 1024, 3), None, None, (768, 768)) == (512, 768)
    assert resolve_size((1024, 700, 3), None, None, (1024, 1024)) == (1024, 640)
    assert resolve_size(portrait, 96, 64, (64, 32)) == (96, 64)            # given: as given


def test_sampling_defaults_flag_over_export_over_builtin(tiny_sd, tiny_export):
    assert resolve_sampling(tiny_export) == {"scheduler": "ddim", "steps": 25, "guidance_scale": 1.0}
    assert resolve_sampling(tiny_export, steps=3, guidance_scale=7.5, scheduler=None) == {
        "scheduler": "ddim", "steps": 3, "guidance_scale": 7.5}
    assert resolve_sampling(tiny_sd.sd) == {"scheduler": "unipc", "steps": 20, "guidance_scale": 7.5}


def test_memory_check_arithmetic(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    assert memory_limit_setting() is None
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2e9")
    assert memory_limit_setting() == 2_000_000_000
    for bad in ("-1", "0", "much"):
        monkeypatch.setenv(MEMORY_LIMIT_ENV, bad)
        with pytest.raises(PMFInputError, match=MEMORY_LIMIT_ENV):
            memory_limit_setting()
    # 10 MB of parameters + 90 MB that grow with the pixels, 40 MB available: 30/90 of the pixels, sides x0.577
    assert suggest_size((512, 768), need=100_000_000, have=40_000_000, fixed=10_000_000) == (256, 384)
    assert suggest_size((64, 64), need=100, have=40, fixed=10, multiple=8) == (32, 32)
    assert suggest_size((64, 64), need=100, have=9, fixed=10) is None     # the parameters alone do not fit
    check_fits(100, 100, "x", size=(64, 64), num_images=1, fixed=10)     # fits: nothing raised
    check_fits(100, None, "x", size=(64, 64), num_images=1, fixed=10)    # unknown: no check
    fits = r"needs 100 bytes .* 40 bytes .*\(--height 32 --width 32\) or fewer images$"
    with pytest.raises(PMFInputError, match=fits):
        check_fits(100, 40, "x", size=(64, 64), num_images=2, fixed=10)
    with pytest.raises(PMFInputError, match="parameters alone"):
        check_fits(100, 9, "x", size=(64, 64), num_images=1, fixed=10)


def _parts(tiny):
    from pmf_jax.pipelines.loading import load_model, load_sd_parts

    parts = load_sd_parts(tiny.sd, dtype=np.float32)
    cn = load_model(tiny.controlnet, "ControlNetModel", "controlnet", dtype=np.float32)
    ref = load_model(tiny.reference_unet, "UNet2DConditionModel", "unet", dtype=np.float32)
    return parts, cn, ref


def test_no_text_encoder_skips_the_rows_that_text_alone_tells_apart(tiny_sd):
    """The same UNets with the text encoder (prompts empty) and without it (its empty-prompt context, fixed): the
    same images from fewer guidance rows; text guidance changes nothing without text (the same program)."""
    from pmf_jax.pipelines import RetargetPipeline

    parts, cn, ref = _parts(tiny_sd)
    common = dict(controlnet=cn, vae=parts["vae"], reference_unet=ref, scheduler_config=parts["scheduler_config"])
    with_text = RetargetPipeline(parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                 **common)
    fixed = RetargetPipeline(parts["unet"], context=with_text.prompts([""])[0], **common)
    for appearance, rows in ((False, (2, 1)), (True, (3, 2))):   # [u, c] -> [c]; [u, c, a] -> [a, c]
        assert tuple(p.make_static((64, 64), appearance_guidance=appearance).rows for p in (with_text, fixed)) == rows
    call = dict(num_inference_steps=2, height=64, width=64, seed=4, output_type="np")
    want = with_text(tiny_sd.source, tiny_sd.pose, guidance_scale=7.5, appearance_guidance_scale=2.0, **call)
    got = fixed(tiny_sd.source, tiny_sd.pose, guidance_scale=7.5, appearance_guidance_scale=2.0, **call)
    np.testing.assert_allclose(got, want, atol=2e-5)
    traced = fixed.compiled_programs()
    plain = fixed(tiny_sd.source, tiny_sd.pose, guidance_scale=1.0, appearance_guidance_scale=2.0, **call)
    np.testing.assert_array_equal(plain, got)
    assert fixed.compiled_programs() == traced
    # with style_fidelity > 0, u reads less of the reference than c: it differs from c, so its row stays
    half = dataclasses.replace(fixed.reference_config, style_fidelity=0.5)
    assert fixed.make_static((64, 64), reference_config=half).rows == 2


def test_enhance_without_text_encoder_computes_two_rows(tiny_sd):
    from pmf_jax.pipelines import EnhancePipeline
    from pmf_jax.pipelines.loading import load_sd_parts

    parts = load_sd_parts(tiny_sd.ip2p, dtype=np.float32)
    with_text = EnhancePipeline(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                parts["scheduler_config"])
    fixed = EnhancePipeline(parts["unet"], parts["vae"], scheduler_config=parts["scheduler_config"],
                            context=with_text.prompts([""])[0])
    assert [p.make_static((64, 64)).rows for p in (with_text, fixed)] == [3, 2]   # the text row = the image row
    call = dict(num_inference_steps=2, height=64, width=64, seed=2, output_type="np", image_guidance_scale=1.5)
    want = with_text(tiny_sd.source, "", guidance_scale=7.5, **call)
    got = fixed(tiny_sd.source, guidance_scale=7.5, **call)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_array_equal(fixed(tiny_sd.source, guidance_scale=1.0, **call), got)
