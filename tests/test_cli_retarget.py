"""The ``pmf`` CLI in real subprocesses: every retarget mode and enhance write their files; the reference changes the
result; the same seed gives the same PNGs; bad inputs give one ``error:`` line and exit status 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from test_golden import check_pixels, pixels_of_pngs
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

COMMON = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")  # shared by the runs: a repeated run loads its program from here
    env = dict(os.environ, JAX_PLATFORMS="cpu", PMF_JAX_CACHE_DIR=str(cache))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run(*args, expect=0):
        proc = subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    run.env = env  # for a run started by hand (tests/test_cli_animate.py kills one)
    return run


def _retarget(tiny, out, *extra):
    return ["retarget", "--model", tiny.sd, "--controlnet", tiny.controlnet, "--source", tiny.source, "--out", out,
            *COMMON, *extra]


def _pixels(folder, name="result_00.png"):
    return np.asarray(Image.open(folder / name), np.float32)


def test_retarget_modes_and_enhance(cli, tiny_sd, tmp_path):
    acm, again = tmp_path / "acm", tmp_path / "acm_again"
    acm_args = ["--reference-unet", tiny_sd.reference_unet, "--pose", tiny_sd.pose, "--prompt", "a man",
                "--num-images", "2", "--appearance-guidance-scale", "2.0"]
    cli(*_retarget(tiny_sd, acm, *acm_args))
    names = sorted(p.name for p in acm.iterdir())
    assert names == ["grid.png", "pose.png", "result_00.png", "result_01.png", "settings.json"]
    assert Image.open(acm / "grid.png").size == (64 * 4, 64)  # source | pose | 2 results
    assert Image.open(acm / "result_00.png").size == (64, 64)
    np.testing.assert_array_equal(np.asarray(Image.open(acm / "pose.png")), np.asarray(Image.open(tiny_sd.pose)))
    settings = json.loads((acm / "settings.json").read_text())
    assert settings["resolved_mode"] == "acm" and settings["seed"] == 7 and settings["appearance_guidance_scale"] == 2.0
    assert settings["resolved_height"] == 64 and settings["outputs"] == ["result_00.png", "result_01.png"]
    assert np.abs(_pixels(acm) - _pixels(acm, "result_01.png")).mean() > 1.0
    golden = pixels_of_pngs(acm, "acm")   # every PNG equals the one recorded before the seams refactor (test_golden)

    # Same seed, new process, with the progress bar (the same loop program run step by step): the very same PNGs.
    proc = cli(*[a for a in _retarget(tiny_sd, again, *acm_args) if a != "--no-progress"])
    assert "retarget (acm): 2/2 step" in proc.stderr  # the progress bar's final line (stderr is a pipe)
    for name in ("result_00.png", "result_01.png", "grid.png"):
        assert (acm / name).read_bytes() == (again / name).read_bytes(), name

    plain = tmp_path / "controlnet_only"
    cli(*_retarget(tiny_sd, plain, "--mode", "controlnet_only", "--pose", tiny_sd.pose, "--prompt", "a man",
                   "--num-images", "1"))
    assert sorted(p.name for p in plain.iterdir()) == ["grid.png", "pose.png", "result_00.png", "settings.json"]
    assert np.abs(_pixels(plain) - _pixels(acm)).mean() > 1.0  # the reference changes the image
    golden.update(pixels_of_pngs(plain, "controlnet_only"))

    ref_only = tmp_path / "reference_only"  # keypoints from OpenPose JSON, reference read from the UNet itself
    cli(*_retarget(tiny_sd, ref_only, "--mode", "reference_only", "--pose", tiny_sd.pose_json, "--num-images", "1",
                   "--style-fidelity", "1.0", "--fusion-blocks", "midup", "--scheduler", "ddim"))
    np.testing.assert_array_equal(np.asarray(Image.open(ref_only / "pose.png")), np.asarray(Image.open(tiny_sd.pose)))
    assert np.abs(_pixels(ref_only) - _pixels(plain)).mean() > 1.0
    golden.update(pixels_of_pngs(ref_only, "reference_only"))

    edited = tmp_path / "edit" / "out.png"
    cli("enhance", "--model", tiny_sd.ip2p, "--image", tiny_sd.source, "--instruction", "make it blue", "--out",
        edited, *COMMON)
    assert Image.open(edited).size == (64, 64)
    assert json.loads(edited.with_suffix(".json").read_text())["instruction"] == "make it blue"
    golden.update(pixels_of_pngs(edited.parent, "enhance"))
    check_pixels("cli_retarget_pixels", golden)


def test_retarget_an_export_alone(cli, tiny_sd, tiny_export, tmp_path):
    """``--model EXPORT`` is enough: the export's ControlNet, reference UNet, mode and reference settings; a flag
    overrides one setting and keeps the others."""
    from pmf_jax.convert import read_pmf_config

    trained = read_pmf_config(tiny_export)["reference"]
    out = tmp_path / "export_run"
    # the sampler and guidance the golden PNG was recorded with, not the export's (tests/test_cli_model_defaults.py)
    cli("retarget", "--model", tiny_export, "--source", tiny_sd.source, "--pose", tiny_sd.pose, "--out", out,
        "--num-images", "1", "--style-fidelity", "0.25", "--scheduler", "unipc", "--guidance-scale", "7.5", *COMMON)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["resolved_mode"] == "acm" and settings["mode"] is None
    assert settings["resolved_reference"] == dict(trained, style_fidelity=0.25)
    assert Image.open(out / "result_00.png").size == (64, 64)
    check_pixels("cli_retarget_pixels", pixels_of_pngs(out, "export"))


def test_help_and_input_errors(cli, tiny_sd, tmp_path):
    for command in ([], ["retarget"], ["enhance"]):
        assert "usage: pmf" in cli(*command, "--help").stdout
    out = tmp_path / "out"
    not_image = tmp_path / "not_image.png"
    not_image.write_text("not an image")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{]")
    empty_json = tmp_path / "empty.json"
    empty_json.write_text('{"people": []}')
    cases = {
        "not found": _retarget(tiny_sd, out, "--pose", tmp_path / "missing.png", "--mode", "controlnet_only"),
        "not a readable image": ["retarget", "--model", tiny_sd.sd, "--controlnet", tiny_sd.controlnet, "--source",
                                 not_image, "--pose", tiny_sd.pose, "--out", out, "--mode", "controlnet_only"],
        "needs an OpenPose .json": _retarget(tiny_sd, out, "--pose", tiny_sd.pose, "--pose-kind", "keypoints",
                                             "--mode", "controlnet_only"),
        "multiple of 8": _retarget(tiny_sd, out, "--pose", tiny_sd.pose, "--mode", "controlnet_only") + [
            "--height", "60"],
        "not valid JSON": _retarget(tiny_sd, out, "--pose", bad_json, "--mode", "controlnet_only"),
        "no person": _retarget(tiny_sd, out, "--pose", empty_json, "--mode", "controlnet_only"),
        "--source: file": _retarget(tiny_sd, out, "--pose", tiny_sd.pose, "--mode", "controlnet_only") + [
            "--source", tmp_path / "gone.png"],
        "needs reference_unet": _retarget(tiny_sd, out, "--pose", tiny_sd.pose),
        "has no controlnet/": [a for a in _retarget(tiny_sd, out, "--pose", tiny_sd.pose, "--mode", "controlnet_only")
                               if a != tiny_sd.controlnet and a != "--controlnet"],
        "must end in": ["enhance", "--model", tiny_sd.ip2p, "--image", tiny_sd.source, "--instruction", "x",
                        "--out", tmp_path / "out.txt"],
        # raised after JAX and the loader start: a missing model folder
        "does not exist ": _retarget(tiny_sd, out, "--pose", tiny_sd.pose, "--mode", "controlnet_only") + [
            "--model", tmp_path / "no_model"],
    }
    for expected, args in cases.items():
        proc = cli(*args, expect=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected.strip() in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
