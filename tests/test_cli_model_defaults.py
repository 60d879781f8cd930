"""Defaults that fit the model, in real ``pmf`` subprocesses on the tiny export (a 64x64 pixel-space model without a
text encoder): the native size, the export's sampling defaults, a memory check with a one-line error that suggests
a size that fits, and no guidance row that cannot change anything."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

RUN = ["--num-images", "1", "--seed", "3", "--no-progress"]


def _pmf(*args, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _retarget(tiny, export, out, *extra):
    return ["retarget", "--model", export, "--source", tiny.source, "--pose", tiny.pose, "--out", out, *RUN, *extra]


def test_export_defaults_size_and_guidance(tiny_sd, tiny_export, tmp_path):
    """No size flag: the model's 64x64, said in one line; no scheduler / guidance flag: the export's (its training
    config's ddim and 1.0), a flag over them (steps); guidance 7.5 changes nothing for a model without text."""
    from pmf_jax.convert import read_pmf_config

    exported = read_pmf_config(tiny_export)
    assert exported["resolution"] == [64, 64]
    assert exported["sampling"] == {"scheduler": "ddim", "steps": 25, "guidance_scale": 1.0}  # tiny_synthetic.yaml
    cache = {"PMF_JAX_CACHE_DIR": str(tmp_path / "cache")}
    default, guided = tmp_path / "default", tmp_path / "guided"
    proc = _pmf(*_retarget(tiny_sd, tiny_export, default, "--steps", "2"), env=cache)
    assert proc.returncode == 0, proc.stderr
    assert "size: 64x64 (the model's native resolution)" in proc.stdout.splitlines()
    assert Image.open(default / "result_00.png").size == (64, 64)
    settings = json.loads((default / "settings.json").read_text())
    assert settings["resolved_sampling"] == {"scheduler": "ddim", "steps": 2, "guidance_scale": 1.0}
    assert settings["steps"] == 2 and settings["scheduler"] is None and settings["guidance_scale"] is None
    assert [settings["resolved_height"], settings["resolved_width"]] == [64, 64]

    # The same program (no text row to guide): byte-identical images at any text guidance.
    proc = _pmf(*_retarget(tiny_sd, tiny_export, guided, "--steps", "2", "--guidance-scale", "7.5"), env=cache)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((guided / "settings.json").read_text())["resolved_sampling"]["guidance_scale"] == 7.5
    assert (guided / "result_00.png").read_bytes() == (default / "result_00.png").read_bytes()


def test_a_call_that_cannot_fit_says_so_and_suggests_a_size_that_fits(tiny_sd, tiny_export, tmp_path):
    """PMF_JAX_MEMORY_LIMIT_BYTES below what 128x128 needs: one error line, exit 2, nothing written; the size it
    suggests runs under the same limit."""
    limit = {"PMF_JAX_MEMORY_LIMIT_BYTES": "12e6", "PMF_JAX_CACHE_DIR": str(tmp_path / "cache")}
    big, small = tmp_path / "big", tmp_path / "small"
    proc = _pmf(*_retarget(tiny_sd, tiny_export, big, "--steps", "1", "--height", "128", "--width", "128"), env=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "128x128 needs" in lines[0] and "PMF_JAX_MEMORY_LIMIT_BYTES" in lines[0] and "Traceback" not in proc.stderr
    assert not big.exists() or not any(big.iterdir())
    suggested = lines[0].split("(--height ")[1].split(")")[0].split(" --width ")
    height, width = map(int, suggested)
    assert 0 < height < 128 and 0 < width < 128 and height % 8 == 0 and width % 8 == 0
    proc = _pmf(*_retarget(tiny_sd, tiny_export, small, "--steps", "1", "--height", height, "--width", width),
                env=limit)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(small / "result_00.png").size == (width, height)
    bad = _pmf(*_retarget(tiny_sd, tiny_export, tmp_path / "bad"), env={"PMF_JAX_MEMORY_LIMIT_BYTES": "lots"})
    assert bad.returncode == 2 and "PMF_JAX_MEMORY_LIMIT_BYTES='lots'" in bad.stderr, bad.stderr
    assert np.asarray(Image.open(small / "result_00.png")).std() > 0
