"""`pmf convert`: a run's checkpoint -> diffusers folders -> orbax checkpoint, identical arrays all the way; diffusers
opens the folders with no missing/unexpected keys; the trainer starts from the orbax checkpoint; base runs copy their
untrained parts; bad input is one clear error and leaves nothing behind."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert_fixtures import base_export, base_run, tiny_export, tiny_run  # noqa: F401  (fixtures)
import convert_fixtures
from tiny_sd import tiny_sd  # noqa: F401  (fixture)
from pmf_jax.cli import main as pmf_main
from pmf_jax.convert import export_to_diffusers, import_from_diffusers, read_pmf_config
from pmf_jax.io import from_pretrained

PARTS = ("unet", "reference_unet", "controlnet")


def _assert_same_tree(actual, expected):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e):
        assert np.asarray(a).dtype == np.asarray(e).dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=str(path))


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_export_opens_in_diffusers_with_every_key(tiny_run, tiny_export):
    from diffusers import ControlNetModel, UNet2DConditionModel

    assert sorted(p.name for p in tiny_export.iterdir()) == [
        "controlnet", "pmf_config.json", "reference_unet", "scheduler", "unet"]  # pixel space: no vae/, no CLIP
    for part, cls in (("unet", UNet2DConditionModel), ("reference_unet", UNet2DConditionModel),
                      ("controlnet", ControlNetModel)):
        _, info = cls.from_pretrained(tiny_export / part, output_loading_info=True)
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], (part, info)
        assert info["mismatched_keys"] == [] and info["error_msgs"] == [], (part, info)
        assert sorted(p.name for p in (tiny_export / part).iterdir()) == [
            "config.json", "diffusion_pytorch_model.safetensors"]
    pmf = read_pmf_config(tiny_export)
    assert pmf["mode"] == "acm" and pmf["prediction_type"] == "sample" and pmf["text_encoder"] is False
    assert pmf["autoencoder"] == {"type": "identity", "patch_size": 4}
    assert pmf["source"]["step"] == 2 and pmf["source"]["weights"] == "ema"
    assert pmf["reference"]["fusion_blocks"] == "full" and pmf["dtype"] == "float32"
    scheduler = json.loads((tiny_export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "sample" and scheduler["beta_schedule"] == "scaled_linear"


def test_round_trip_run_to_diffusers_to_orbax_is_identical(tiny_run, tiny_export, tmp_path):
    """checkpoint params -> to-diffusers -> from-diffusers -> every array bit-identical (EMA of step 2, fp32); and
    the trainer's components loader starts from that orbax checkpoint with the same arrays."""
    from pmf_jax.pipelines.loading import load_sd_parts
    from pmf_jax.training import components as components_lib

    run_dir, saved = tiny_run
    expected = saved[2]["ema"]
    for part in PARTS:  # the diffusers folders themselves
        _assert_same_tree(from_pretrained(tiny_export / part)[1], expected[part])
    # a folder without vae/ whose UNet has 48 = 3·4² channels: the identity autoencoder with 4x4 patches
    assert load_sd_parts(tiny_export, dtype=np.float32)["vae"][0].patch_size == 4

    ckpt = import_from_diffusers(tiny_export, tmp_path / "ckpt")
    marker = json.loads((ckpt / "pmf_pretrained.json").read_text())
    assert sorted(marker["parts"]) == sorted(PARTS) and "scheduler" in marker["copied"]
    assert not any((ckpt / part / "diffusion_pytorch_model.safetensors").exists() for part in PARTS)
    for part in PARTS:
        _assert_same_tree(from_pretrained(ckpt, part)[1], expected[part])

    cfg = convert_fixtures.run_config(tmp_path, tmp_path / "run2", f"model.base={ckpt}", "model.unet_config=null",
                                      f"model.controlnet={ckpt}", f"model.reference_unet={ckpt}")
    comps, params, _ = components_lib.build(cfg, jax.random.key(0))
    for part in PARTS:
        _assert_same_tree(params[part], expected[part])
    reference = components_lib.make_scheduler("ddpm", components_lib.DEFAULT_NOISE_SCHEDULE)
    np.testing.assert_array_equal(comps.noise_scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert comps.autoencoder.patch_size == 4


def test_cli_step_no_ema_fp16_and_explicit_parts(tiny_run, tiny_export, tmp_path, capsys):
    run_dir, saved = tiny_run
    out = tmp_path / "step1"
    assert pmf_main(["convert", "to-diffusers", "--checkpoint", str(run_dir / "1"), "--out", str(out),
                     "--no-ema", "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    pmf = read_pmf_config(out)
    assert pmf["source"]["step"] == 1 and pmf["source"]["weights"] == "params" and pmf["dtype"] == "float16"
    raw = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in raw.values()} == {np.dtype(np.float16)}
    module, params = from_pretrained(out / "controlnet")
    _assert_same_tree(params, jax.tree_util.tree_map(lambda a: a.astype(np.float16).astype(np.float32),
                                                     saved[1]["params"]["controlnet"]))

    # from-diffusers with the ControlNet and reference UNet given separately (a folder, and a pipeline folder)
    ckpt = tmp_path / "ckpt"
    assert pmf_main(["convert", "from-diffusers", "--model", str(out), "--controlnet", str(tiny_export / "controlnet"),
                     "--reference-unet", str(tiny_export), "--out", str(ckpt)]) == 0
    _assert_same_tree(from_pretrained(ckpt, "controlnet")[1], saved[2]["ema"]["controlnet"])
    _assert_same_tree(from_pretrained(ckpt, "reference_unet")[1], saved[2]["ema"]["reference_unet"])


def _error(capsys, argv):
    code = pmf_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_clear_error_and_writes_nothing(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "out"

    def export(checkpoint, *extra):
        return _error(capsys, ["convert", "to-diffusers", "--checkpoint", str(checkpoint), "--out", str(out), *extra])

    assert "no checkpoint at step 7" in export(run_dir / "7") and "[1, 2]" in export(run_dir / "7")
    assert "not a pmf_jax training run" in export(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "old_file").write_text("")  # an empty folder is taken as it is
    assert "already exists" in _error(capsys, ["convert", "to-diffusers", "--checkpoint", str(run_dir), "--out",
                                               str(tmp_path / "taken")])

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    shutil.rmtree(broken / "checkpoints" / "2" / "state" / "d")  # the array data of step 2 is gone
    assert "incomplete or corrupt" in export(broken)
    assert (broken / "checkpoints" / "1").is_dir()
    (broken / "checkpoints" / "1" / "state" / "_METADATA").unlink()  # the tree of step 1 is gone
    assert "incomplete or corrupt" in export(broken / "1")
    assert not out.exists() and _leftovers(tmp_path, "out") == []
    assert "no complete checkpoint" in export(_copy_without_steps(run_dir, tmp_path / "empty"))

    no_ema = tmp_path / "no_ema"
    shutil.copytree(run_dir, no_ema)
    yaml = no_ema / "config.yaml"
    yaml.write_text(yaml.read_text().replace("ema_decay: 0.9", "ema_decay: null"))
    assert "kept no EMA" in export(no_ema, "--ema")

    frozen = tmp_path / "frozen"  # a run that did not train its UNet and has no base: nothing to export it from
    shutil.copytree(run_dir, frozen)
    info = json.loads((frozen / "components.json").read_text())
    info["trainable"] = ["reference_unet", "controlnet"]
    (frozen / "components.json").write_text(json.dumps(info))
    assert "did not train 'unet'" in export(frozen) and "cannot be exported" in export(frozen)

    assert "trained without a base" in export(run_dir, "--base", str(tmp_path))
    assert "already exists" in _error(capsys, ["convert", "from-diffusers", "--model", str(tmp_path / "x"), "--out",
                                               str(tmp_path / "taken")])
    assert "does not exist" in _error(capsys, ["convert", "from-diffusers", "--model", str(tmp_path / "x"),
                                               "--out", str(out)])
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def _copy_without_steps(run_dir, target):
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("[0-9]*"))
    return target


def test_failure_midway_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    from pmf_jax.convert import to_diffusers

    real = to_diffusers.save_pretrained

    def failing(module, params, path, **kw):
        if path.name == "controlnet":  # after unet/ and reference_unet/ were written
            raise OSError("disk full")
        return real(module, params, path, **kw)

    monkeypatch.setattr(to_diffusers, "save_pretrained", failing)
    with pytest.raises(OSError, match="disk full"):
        export_to_diffusers(tiny_run[0], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_base_run_copies_untrained_parts(tiny_sd, base_run, base_export):
    """A stage-1 run on an SD base: the trained ACM from the checkpoint; the frozen base UNet, the VAE, CLIP, the
    tokenizer and the ControlNet (model.controlnet) copied; scheduler with the run's prediction type; diffusers'
    StableDiffusionControlNetPipeline opens the folder."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    saved, out = base_run[1], base_export
    assert sorted(p.name for p in out.iterdir()) == [
        "controlnet", "model_index.json", "pmf_config.json", "reference_unet", "scheduler", "text_encoder",
        "tokenizer", "unet", "vae"]
    pmf = read_pmf_config(out)
    assert pmf["parts"]["reference_unet"] == "checkpoint" and pmf["parts"]["unet"] == str(tiny_sd.sd / "unet")
    assert pmf["autoencoder"] == {"type": "vae"} and pmf["text_encoder"] is True
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()  # --link
    for part, source in (("unet", tiny_sd.sd / "unet"), ("controlnet", tiny_sd.controlnet)):
        theirs = load_file(str(source / "diffusion_pytorch_model.safetensors"))
        ours = load_file(str(out / part / "diffusion_pytorch_model.safetensors"))
        assert set(ours) == set(theirs)
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{part}: {key}")
    _assert_same_tree(from_pretrained(out / "reference_unet")[1], saved[2]["ema"]["reference_unet"])
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["prediction_type"] == "epsilon"
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["unet"][1] == "UNet2DConditionModel"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        out, controlnet=ControlNetModel.from_pretrained(out / "controlnet"))
    assert pipe.vae is not None and pipe.text_encoder is not None


def test_cli_dtypes_are_the_library_s():
    from pmf_jax.cli import build_parser
    from pmf_jax.constants import DTYPE_SHORT_NAMES
    from pmf_jax.convert import folders

    for name, long_name in DTYPE_SHORT_NAMES.items():
        for direction, source in (("to-diffusers", "--checkpoint"), ("from-diffusers", "--model")):
            args = build_parser().parse_args(["convert", direction, source, "in", "--out", "out", "--dtype", name])
            assert folders.parse_dtype(args.dtype) == folders.parse_dtype(long_name) == jax.numpy.dtype(long_name)

