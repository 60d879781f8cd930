"""What the ``pmf`` commands write, through the CLI in subprocesses: ``--out`` is checked before any model loads (a
read-only location, a non-empty folder, a file), a reused folder is replaced whole only with ``--overwrite``,
``pmf eval generate --model`` takes a training run or an export and continues a stopped run, ``pmf eval score``
refuses generated images of the wrong size (unless ``--resize``) and fails when no requested metric can run, and
``pmf scaling`` writes ``scaling.png`` without ``--sweep``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from pmf_jax import input_pipeline
from pmf_jax.commands import scaling as command  # its FAST_COMPILE_FLAGS
from pmf_jax.evaluation import read_pairs
from pmf_jax.metrics.availability import WEIGHTS_ENV
from tiny_sd import tiny_sd  # noqa: F401  (fixture)
from train_fixtures import ONE_BLOCK_UNET

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "data" / "deepfashion_pairs" / "dummy_data"
DATASET, CONFIG = "deepfashion_pairs", "256x176"
# A folder no user can create anything in, root included (sysfs refuses mkdir): a read-only --out location.
UNWRITABLE = Path("/sys/pmf_jax_test_out")
# The tiny run and its export on the dummy DeepFashion test split (2 pairs), at the run's 64x64, one DDIM step.
EVAL_OVERRIDES = ["data.name=deepfashion_pairs", "data.builder_config=256x176", "data.resolution=[64,64]",
                  "data.eval_split=test", "data.eval_batch_size=2", "model.dtype=float32", "sampling.steps=1",
                  "sampling.scheduler=ddim", "sampling.seed=3", "sampling.text_guidance_scale=1.0",
                  "sampling.reference_guidance_scale=null"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: CPU with XLA's quick compile (what these tests check does not depend on how fast the
    programs run), one compilation cache for the module's runs, no metric weights anywhere."""
    root = tmp_path_factory.mktemp("cli_outputs_env")
    env = {k: v for k, v in os.environ.items() if k not in (WEIGHTS_ENV, "JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PMF_JAX_CACHE_DIR=str(root / "jax_cache"), TORCH_HOME=str(root / "torch_home"),
               HF_HUB_OFFLINE="1", XLA_FLAGS=" ".join(command.FAST_COMPILE_FLAGS))
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.build(DATASET, data_dir, config=CONFIG, manual_dir=DUMMY)
    return data_dir


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pmf(args, env, expect=0):
    proc = _start(args, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    return out, err


def _one_line_error(err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])


def _leftovers(parent: Path, name: str):
    """Stages a run left beside ``parent/name`` (hidden temporary folders, ``name.partial``)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == f"{name}.partial")


def _random_images(folder: Path, data_dir, size):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pair in read_pairs(DATASET, CONFIG, "test", data_dir):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / pair.filename)
    return folder


def test_out_is_checked_before_any_model_loads(tiny_sd, tmp_path, env):  # noqa: F811
    """Every command that writes refuses a read-only, non-empty or file --out with one line and exit 2 before it
    loads anything: the models named here do not exist, so a later check would report them instead."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("a previous run")
    no_model = tmp_path / "no_model"
    pose_json = tmp_path / "pose.json"
    shutil.copy(tiny_sd.pose_json, pose_json)
    retarget = ["retarget", "--model", no_model, "--source", tiny_sd.source, "--pose", tiny_sd.pose]
    cannot = f"cannot write in '{UNWRITABLE.parent}'"
    cases = [
        (retarget + ["--out", UNWRITABLE], cannot),
        (retarget + ["--out", full], "already exists and is not empty"),
        (["enhance", "--model", no_model, "--image", tiny_sd.source, "--instruction", "x", "--out",
          UNWRITABLE / "edit.png"], cannot),
        (["eval", "generate", "--out", UNWRITABLE, f"model.base={no_model}"], cannot),
        (["eval", "generate", "--out", full, f"model.base={no_model}"], "already exists and is not empty"),
        (["eval", "score", "--generated", full, "--out", UNWRITABLE / "scores"], cannot),
        (["scaling", "--config", REPO / "configs" / "tiny_synthetic.yaml", "--devices", "1", "--out", full],
         "already exists and is not empty"),
        (["convert", "to-diffusers", "--checkpoint", tmp_path / "no_run", "--out", UNWRITABLE], cannot),
        (["pose", "render", "--json", pose_json, "--out", UNWRITABLE.parent / "pmf_jax_test_pose.png"], cannot),
    ]
    procs = [(_start(args, env), expected) for args, expected in cases]  # concurrently: each is a short start-up
    try:
        for proc, expected in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 2, f"{proc.args}: exit {proc.returncode}\n{out}\n{err[-3000:]}"
            _one_line_error(err, "--out", expected)
    finally:  # a failed case must not leave the others running (a command that does not refuse goes on working)
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(p.name for p in full.iterdir()) == ["old.txt"]
    assert not UNWRITABLE.exists() and _leftovers(tmp_path, "full") == []


def test_retarget_replaces_a_reused_out_whole_with_overwrite(tiny_sd, tiny_export, tmp_path, env):  # noqa: F811
    """A folder left by a 4-image run, reused for a 1-image run with --overwrite, holds the new run's files only."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("result_00.png", "result_01.png", "result_02.png", "result_03.png"):
        Image.new("RGB", (8, 8)).save(out / name)
    (out / "settings.json").write_text("{}")
    _pmf(["retarget", "--model", tiny_export, "--source", tiny_sd.source, "--pose", tiny_sd.pose, "--out", out,
          "--overwrite", "--num-images", "1", "--steps", "1", "--height", "64", "--width", "64", "--no-progress"], env)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "pose.png", "result_00.png", "settings.json"]
    assert Image.open(out / "result_00.png").size == (64, 64)
    assert json.loads((out / "settings.json").read_text())["outputs"] == ["result_00.png"]
    assert _leftovers(tmp_path, "out") == []


def test_eval_generate_from_a_run_and_from_its_export(tiny_run, tiny_export, data_dir, tmp_path, env):  # noqa: F811
    """--model RUN (the run's own config, its latest step's EMA weights) and --model EXPORT (that step exported)
    generate the same images; the settings record which model made them."""
    run_dir, _ = tiny_run
    overrides = [f"data.data_dir={data_dir}", *EVAL_OVERRIDES]
    from_run, from_export = tmp_path / "from_run", tmp_path / "from_export"
    out, _ = _pmf(["eval", "generate", "--model", run_dir, "--out", from_run, "--no-progress", *overrides], env)
    assert "2 images generated, 0 already there" in out
    out, _ = _pmf(["eval", "generate", "--model", tiny_export, "--out", from_export, "--no-progress", *overrides],
                  env)
    assert "2 images generated" in out
    names = sorted(p.name for p in from_run.glob("*.png"))
    assert len(names) == 2 and names == sorted(p.name for p in from_export.glob("*.png"))
    for name in names:
        a, b = (np.asarray(Image.open(folder / name), np.int16) for folder in (from_run, from_export))
        assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 2, name
    settings = json.loads((from_run / "generation.json").read_text())
    assert settings["model_source"] == {"kind": "run", "path": str(run_dir.absolute()), "step": 2}
    assert json.loads((from_export / "generation.json").read_text())["model_source"]["kind"] == "export"
    assert _leftovers(tmp_path, "from_run") == [] and _leftovers(tmp_path, "from_export") == []


def test_eval_generate_continues_a_stopped_run(tiny_export, data_dir, tmp_path, env):  # noqa: F811
    """A stopped generation is OUT.partial (OUT does not exist yet); the next run with the same settings makes only
    the missing image and moves the folder into place. A run with other settings is refused."""
    overrides = [f"data.data_dir={data_dir}", *EVAL_OVERRIDES]
    out = tmp_path / "gen"
    _pmf(["eval", "generate", "--model", tiny_export, "--out", out, "--no-progress", *overrides], env)
    first = sorted(out.glob("*.png"))
    stopped = tmp_path / "stopped"
    shutil.copytree(out, tmp_path / "stopped.partial")  # what a run killed after its first image leaves
    (tmp_path / "stopped.partial" / first[1].name).unlink()
    _, err = _pmf(["eval", "generate", "--model", tiny_export, "--out", stopped, "--no-progress", *overrides,
                   "sampling.seed=4"], env, expect=2)
    _one_line_error(err, "stopped.partial", "other settings", "sampling")
    out_text, _ = _pmf(["eval", "generate", "--model", tiny_export, "--out", stopped, "--no-progress", *overrides],
                       env)
    assert "1 images generated, 1 already there" in out_text
    assert sorted(p.name for p in stopped.glob("*.png")) == [p.name for p in first]
    assert _leftovers(tmp_path, "stopped") == []


def test_score_refuses_a_wrong_size_and_nothing_to_compute(data_dir, tmp_path, env):
    """Generated images of another size than the ground truth: one line naming the file and both sizes, unless
    --resize. Asking only for metrics that cannot run here (no LPIPS weights): exit 2, no report."""
    generated = _random_images(tmp_path / "small", data_dir, (128, 88))
    base = ["eval", "score", "--generated", generated, "--dataset", f"{DATASET}/{CONFIG}", "--data-dir", data_dir,
            "--no-progress"]
    _, err = _pmf(base + ["--metrics", "ssim"], env, expect=2)
    _one_line_error(err, str(generated / read_pairs(DATASET, CONFIG, "test", data_dir)[0].filename), "88x128",
                    "176x256", "--resize")
    _, err = _pmf(base + ["--metrics", "lpips", "--resize"], env, expect=2)
    _one_line_error(err, "none of the requested metrics can be computed", "lpips", "alexnet-owt-7be5be79.pth")
    assert not (generated / "scores.json").exists()


def test_scaling_writes_its_plot_without_a_sweep(tmp_path, env):
    """`pmf scaling` without --sweep (one device, no sampling programs) writes scaling.png, linked from the
    report, and leaves no stage behind."""
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(ONE_BLOCK_UNET))
    out = tmp_path / "plan"
    # Kept cheap: the ControlNet alone trains (a smaller backward pass), 16x16 images.
    stdout, _ = _pmf(["scaling", "--config", REPO / "configs" / "tiny_synthetic.yaml", "--devices", "1", "--chip",
                      "h100", "--batch-per-device", "1", "--no-sampling", "--out", out, f"model.unet_config={unet}",
                      "data.resolution=[16,16]", "train.trainable=[controlnet]", "reference.mode=reference_only"],
                     env)
    assert sorted(p.name for p in out.iterdir()) == ["scaling.json", "scaling.md", "scaling.png"]
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG" and "scaling.png" in stdout
    assert "](scaling.png)" in (out / "scaling.md").read_text()
    assert _leftovers(tmp_path, "plan") == []
