"""Inputs that used to give silent wrong results or tracebacks: every PIL mode read right (16-bit scaled to 8 bits,
alpha onto white), the pixel limit checked from the header (one ``error:`` line, exit 2), weights with NaN/Inf refused
at load naming the file and the tensor, a non-finite sampling result refused, and the pickle refusal naming
``--allow-pickle`` on the command line (which every model-reading command has)."""

import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convert_fixtures import write_run
from pmf_jax import constants
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.images import check_resolution, load_image
from pmf_jax.pose import render_pose
from pmf_jax.pose.inputs import read_image
from test_cli_retarget import cli  # noqa: F401  (fixture: `pmf` in a subprocess)
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

RAMP8 = np.arange(256, dtype=np.uint8)
RAMP16 = RAMP8.astype(np.uint16) * 257  # 257·k is k in 8 bits, exactly


def _png(width, height, bit_depth, color_type, rows: bytes) -> bytes:
    """A PNG file written by hand: IHDR as given, one IDAT of the (filter byte + samples) ``rows``."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``array`` uint16 [H, W, C] (color type 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA)."""
    h, w = array.shape[:2]
    return _png(w, h, 16, color_type, b"".join(b"\0" + row.astype(">u2").tobytes() for row in array))


def _gray(k):
    return np.stack([np.asarray(k, np.uint8)] * 3, -1)


# ------------------------------------------------------------------------------------------------ image modes

def test_every_pil_mode_reads_as_8_bit_rgb(tmp_path):
    expected = _gray(RAMP8)[None]  # [1, 256, 3]
    Image.fromarray(RAMP16[None]).save(tmp_path / "gray16.png")  # mode I;16: pure white before
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    np.testing.assert_array_equal(load_image(tmp_path / "gray16.png"), expected)
    big_endian = Image.frombytes("I;16B", (256, 1), RAMP16.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(big_endian), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(RAMP16[None].astype(np.int32))), expected)  # mode I
    np.testing.assert_array_equal(load_image(Image.fromarray(RAMP8[None] / np.float32(255))), expected)  # mode F
    np.testing.assert_array_equal(load_image(RAMP16[None]), expected)  # a uint16 array

    rgb16 = np.stack([RAMP16, RAMP16[::-1], np.full(256, 65535, np.uint16)], -1)[None]
    (tmp_path / "rgb16.png").write_bytes(_png16(rgb16, 2))
    np.testing.assert_array_equal(load_image(tmp_path / "rgb16.png")[0],
                                  np.stack([RAMP8, RAMP8[::-1], np.full(256, 255, np.uint8)], -1))
    alpha = np.where(np.arange(256) % 2 == 0, 65535, 0).astype(np.uint16)  # opaque, transparent, ...
    (tmp_path / "gray_alpha16.png").write_bytes(_png16(np.stack([RAMP16, alpha], -1)[None], 4))
    np.testing.assert_array_equal(load_image(tmp_path / "gray_alpha16.png")[0],
                                  _gray(np.where(np.arange(256) % 2 == 0, RAMP8, 255)))

    one_bit = Image.fromarray(np.array([[False, True]]))
    np.testing.assert_array_equal(load_image(one_bit)[0], _gray([0, 255]))
    np.testing.assert_array_equal(load_image(Image.new("L", (1, 1), 100))[0, 0], [100] * 3)
    np.testing.assert_array_equal(load_image(Image.new("LA", (1, 1), (100, 0)))[0, 0], [255] * 3)  # onto white
    np.testing.assert_array_equal(load_image(Image.new("LA", (1, 1), (100, 255)))[0, 0], [100] * 3)
    rgba = load_image(Image.new("RGBA", (1, 1), (10, 20, 30, 128)))[0, 0]
    np.testing.assert_array_equal(rgba, [(v * 128 + 255 * 127 + 127) // 255 for v in (10, 20, 30)])
    np.testing.assert_array_equal(load_image(np.array([[[10, 20, 30, 0]]], np.uint8))[0, 0], [255] * 3)
    np.testing.assert_array_equal(load_image(Image.new("CMYK", (1, 1), (0, 255, 0, 0)))[0, 0], [255, 0, 255])

    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png")[0], [[255, 255, 255], [0, 255, 0]])


# ------------------------------------------------------------------------------------------------ pixel limit

def _header_only_png(path, width, height):
    """A PNG whose header claims ``width x height`` RGB, with a few bytes of data."""
    path.write_bytes(_png(width, height, 8, 2, b"\0" * 4))
    return path


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    with pytest.raises(PMFInputError, match=r"--source .*100000x100000 = 10,000,000,000 pixels, more than the limit "
                                            r"of 100,000,000 \(set \$PMF_MAX_IMAGE_PIXELS to raise it\)"):
        load_image(_header_only_png(tmp_path / "huge.png", 100000, 100000), "--source")  # PIL: DecompressionBombError
    # A real 20000 x 20000 1-bit PNG (40 kB compressed, 400 megapixels).
    row = b"\0" + b"\0" * (20000 // 8)
    (tmp_path / "real.png").write_bytes(_png(20000, 20000, 1, 0, row * 20000))
    with pytest.raises(PMFInputError, match=r"20000x20000 = 400,000,000 pixels, more than the limit"):
        load_image(tmp_path / "real.png", "--source")
    with pytest.raises(PMFInputError, match=r"requested size \(height x width\) is 20000x20000"):
        check_resolution(20000, 20000)  # `pmf retarget|enhance --height --width`
    with pytest.raises(PMFInputError, match=r"--image .* is 100000x100000"):
        read_image(tmp_path / "huge.png", "--image")  # `pmf pose extract`, pose images
    with pytest.raises(PMFInputError, match=r"the skeleton image is 100000x100000"):
        render_pose(np.zeros((18, 3), np.float32), 100000, 100000)
    monkeypatch.setenv(constants.MAX_IMAGE_PIXELS_ENV, "4096")  # the documented override
    Image.new("RGB", (64, 65)).save(tmp_path / "small.png")
    with pytest.raises(PMFInputError, match=r"64x65 = 4,160 pixels, more than the limit of 4,096"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv(constants.MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(PMFInputError, match="PMF_MAX_IMAGE_PIXELS='lots' must be a positive number"):
        load_image(tmp_path / "small.png")


# ------------------------------------------------------------------------------------------------ weights

def _safetensors_with(folder, key_of, value):
    """Sets the first element of one tensor (``key_of(keys)``) of ``folder``'s safetensors file to ``value``;
    returns (file, key)."""
    from safetensors.numpy import load_file, save_file

    path = next(folder.glob("*.safetensors"))
    state = load_file(str(path))
    key = key_of(sorted(state))
    state[key] = state[key].copy()
    state[key].flat[0] = value
    save_file(state, str(path), metadata={"format": "pt"})
    return path, key


def test_non_finite_weights_are_refused_naming_file_and_tensor(tiny_sd, tmp_path):
    from pmf_jax.io import from_pretrained

    nan = shutil.copytree(tiny_sd.controlnet, tmp_path / "nan")
    path, key = _safetensors_with(nan, lambda keys: [k for k in keys if k.endswith(".weight")][3], np.nan)
    with pytest.raises(PMFInputError, match=rf"weights file {path}: tensor {key} holds NaN or Inf; refusing"):
        from_pretrained(nan)
    big = shutil.copytree(tiny_sd.controlnet, tmp_path / "big")
    _safetensors_with(big, lambda keys: keys[0], 1e6)  # finite in float32, inf in float16
    from_pretrained(big)
    with pytest.raises(PMFInputError, match=r"big: tensor .* holds values beyond the range of float16 \(Inf once cast; "
                                            r"load it in float32\); refusing"):
        from_pretrained(big, param_dtype=np.float16)


def test_non_finite_checkpoint_is_refused(tmp_path):
    from pmf_jax.io.checkpoints import restore_trained_params

    def poison(state, cfg):
        leaves, tree = _flatten(state.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)
        return state.replace(params=tree.unflatten(leaves))

    write_run(tmp_path, tmp_path / "run", "train.ema_decay=null", place=poison, steps=(1,))
    with pytest.raises(PMFInputError, match=r"checkpoint .*checkpoints/1 \(params\): tensor .* holds NaN or Inf"):
        restore_trained_params(tmp_path / "run")


def _flatten(tree):
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return list(leaves), treedef


def test_non_finite_output_is_an_error_not_a_black_image(tiny_sd):
    import jax

    from pmf_jax.io import from_pretrained
    from pmf_jax.pipelines import RetargetPipeline

    pipe = RetargetPipeline(from_pretrained(tiny_sd.sd, "unet"), from_pretrained(tiny_sd.controlnet),
                            vae=from_pretrained(tiny_sd.sd, "vae"), mode="controlnet_only")
    # weights that passed no load check (built in memory): the decoder's last convolution all NaN
    vae = jax.tree_util.tree_map_with_path(
        lambda p, x: x * np.nan if "conv_out" in jax.tree_util.keystr(p) and "decoder" in jax.tree_util.keystr(p)
        else x, pipe.params["vae"])
    pipe.set_params(dict(pipe.params, vae=vae))
    with pytest.raises(PMFInputError, match=r"retarget \(controlnet_only\): 1 of 1 outputs hold NaN or Inf"):
        pipe(str(tiny_sd.source), str(tiny_sd.pose), num_inference_steps=2, height=64, width=64)


# ------------------------------------------------------------------------------------------------ the CLI

MODEL_COMMANDS = (["retarget", "--model", "m", "--source", "s", "--pose", "p", "--out", "o"],
                  ["animate", "--model", "m", "--source", "s", "--poses", "p", "--out", "o.mp4"],
                  ["enhance", "--model", "m", "--image", "i", "--instruction", "x", "--out", "o.png"],
                  ["eval", "generate", "--out", "o"],
                  ["convert", "to-diffusers", "--checkpoint", "c", "--out", "o"],
                  ["convert", "from-diffusers", "--model", "m", "--out", "o"])


def test_every_model_reading_command_has_allow_pickle():
    from pmf_jax.cli import build_parser

    parser = build_parser()
    for argv in MODEL_COMMANDS:
        assert parser.parse_args(argv + ["--allow-pickle"]).allow_pickle, argv
        assert not parser.parse_args(argv).allow_pickle, argv


def _pickled(folder):
    """Replaces the safetensors weights of ``folder`` (a diffusers model) by a torch pickle (.bin)."""
    import torch
    from safetensors.torch import load_file

    weights = next(folder.glob("*.safetensors"))
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


def test_cli_bad_models_and_huge_images(cli, tiny_sd, tmp_path):  # noqa: F811
    from pmf_jax.io import from_pretrained

    # SD folders whose UNet (the first model read) holds an Inf / is a pickle
    nan = shutil.copytree(tiny_sd.sd, tmp_path / "nan_sd")
    path, key = _safetensors_with(nan / "unet", lambda keys: keys[-1], np.inf)
    pickled = shutil.copytree(tiny_sd.sd, tmp_path / "pickled_sd")
    _pickled(pickled / "unet")
    huge = _header_only_png(tmp_path / "huge.png", 100000, 100000)
    retarget = ["retarget", "--controlnet", tiny_sd.controlnet, "--pose", tiny_sd.pose, "--mode", "controlnet_only",
                "--steps", "1", "--height", "64", "--width", "64", "--no-progress"]
    cases = {
        f"weights file {path}: tensor {key} holds NaN or Inf; refusing": retarget + [
            "--model", nan, "--source", tiny_sd.source, "--out", tmp_path / "a"],
        "unet/diffusion_pytorch_model.bin is a pickle file, which can run arbitrary code when loaded; refusing it. "
        "Convert it to safetensors, or pass --allow-pickle if you trust its source": retarget + [
            "--model", pickled, "--source", tiny_sd.source, "--out", tmp_path / "b"],
        "huge.png' is 100000x100000 = 10,000,000,000 pixels": retarget + [
            "--model", tiny_sd.sd, "--source", huge, "--out", tmp_path / "c"],
        "skeleton image (--height x --width, default the JSON's canvas) is 100000x100000": [
            "pose", "render", "--json", tiny_sd.pose_json, "--out", tmp_path / "pose.png", "--width", "100000",
            "--height", "100000"],
    }
    for expected, args in cases.items():
        proc = cli(*args, expect=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert expected in lines[0], lines[0]
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "pose.png"))
    # The Python API names its argument; the flag reads the pickle.
    with pytest.raises(PMFInputError, match="pass allow_pickle=True if you trust"):
        from_pretrained(pickled / "unet")
    out = tmp_path / "converted"
    cli("convert", "from-diffusers", "--model", pickled, "--out", out, "--allow-pickle")
    assert (out / "unet" / "orbax_params").is_dir()
