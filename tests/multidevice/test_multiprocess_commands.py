"""The commands that join a multi-process run, launched like the trainer (tests/multiprocess_launch.py: 2 processes x
4 virtual CPU devices on localhost, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID):

* `pmf scaling --measure`: one sharded step over both processes' 8 devices, process 0 writes --out;
* `pmf eval generate`: each process makes its share of the images, process 0 commits --out, into a shared folder
  and into a bucket of a GCS-protocol server (tests/gcs_emulator.py);
* a code-version mismatch stops both processes at start with one line.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the one-process reference images are
made in this process on 8 devices).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/
import convert_fixtures  # noqa: E402
import train_fixtures  # noqa: E402
from gcs_fixtures import gcs  # noqa: E402,F401  (pytest fixture)
from multiprocess_launch import child_environment, one_block_unet, start_pair  # noqa: E402
from pmf_jax import runtime, storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny_synthetic.yaml")
PMF = [sys.executable, "-m", "pmf_jax.cli"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny synthetic data, a run folder of a one-block pixel-space model (random 'trained' weights, nothing
    compiled: tests/convert_fixtures.py) sampling at 32x32 from that data, and the subprocesses' environment."""
    root = tmp_path_factory.mktemp("multiprocess_commands")
    runtime.add_dataset_builders()
    base = train_fixtures.prepare(root)
    base["one_block_unet"] = unet = one_block_unet(root)
    base["run"] = root / "run"
    convert_fixtures.write_run(root, base["run"], f"model.unet_config={unet}", f"data.data_dir={base['data_dir']}",
                               "data.builder_config=tiny", "data.resolution=[32,32]", steps=(1,))
    child = child_environment(root)
    base["child"] = child
    return base


def _finish(procs, timeout=600):
    codes = [p.wait(timeout=timeout) for p, _ in procs]
    return codes, [log.read_text() for _, log in procs]


def test_scaling_measure_runs_as_two_processes_and_process_0_writes(env, tmp_path):
    """`pmf scaling --measure` launched like the trainer: one sharded step over both processes' 8 devices."""
    out = tmp_path / "measure"
    argv = [*PMF, "scaling", "--config", CONFIG, "--measure", "2", "--out", out, "--batch-per-device", "1",
            f"model.unet_config={env['one_block_unet']}", "reference.mode=reference_only", "train.trainable=[unet]",
            "data.resolution=[32,32]"]
    codes, logs = _finish(start_pair(argv, env["child"], tmp_path, "measure"))
    assert codes == [0, 0], [text[-2000:] for text in logs]
    result = json.loads((out / "measure.json").read_text())
    assert result["devices"] == 8 and result["processes"] == 2
    assert result["measured"]["iterations"] == 2 and result["measured"]["step_s"] > 0
    assert "measured on 2 processes, 8 x cpu" in logs[0] and "measured on" not in logs[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("measure")) == [
        "measure", "measure.0.log", "measure.1.log"]  # no second stage or partial folder beside it


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path), np.int16)


def test_eval_generate_as_two_processes_into_a_shared_folder_and_a_bucket(env, gcs, tmp_path):  # noqa: F811
    """Each process makes its half of the pairs on its own 4 devices; process 0 commits: the images are those of one
    8-device process (a pair's seed is its own), generation.json is committed last, nothing is left staged."""
    from pmf_jax.evaluation import generate
    from pmf_jax.evaluation.model import eval_config, resolve_model

    steps = ["sampling.steps=2"]
    model = resolve_model(str(env["run"])).with_overrides(steps)
    one = tmp_path / "one_process"
    summary = generate(eval_config(model, None, steps), one, model=model, progress=False)
    names = sorted(p.name for p in one.glob("*.png"))
    assert summary.generated == len(names) == 4

    local, url = tmp_path / "two_processes", gcs.url("eval/two_processes")
    child = dict(env["child"], **{k: gcs.env[k] for k in (storage.EMULATOR_ENV, storage.CACHE_ENV)})
    for out, name in ((local, "local"), (url, "bucket")):
        argv = [*PMF, "eval", "generate", "--model", env["run"], "--out", out, *steps]
        codes, logs = _finish(start_pair(argv, child, tmp_path, name))
        assert codes == [0, 0], [text[-2000:] for text in logs]
        assert "4 images generated, by 2 processes, 0 already there (4 pairs)" in logs[0]
        assert "images generated" not in logs[1]
        for i in (0, 1):  # each process made two of the four (its progress line)
            assert re.search(rf"\(process {i} of 2\).*2/2", logs[i]), logs[i][-2000:]
    assert sorted(p.name for p in local.iterdir()) == sorted(names + ["generation.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    for name in names:  # a batch of 2 on 4 devices vs 4 on 8: within two levels of rounding
        assert np.abs(_pixels(local / name) - _pixels(one / name)).max() <= 2, name
    assert np.abs(_pixels(local / names[0]) - _pixels(local / names[1])).mean() > 5  # the pairs differ
    assert gcs.names("eval/two_processes") == sorted(names + ["generation.json"])
    fetched = storage.local_copy(url)
    for name in names:  # the same processes on the same devices: the same bytes
        assert (fetched / name).read_bytes() == (local / name).read_bytes(), name
    assert json.loads((fetched / "generation.json").read_text()) == json.loads((local / "generation.json").read_text())
    assert not list((gcs.cache / "partial").rglob("*.png"))  # every stage was uploaded and removed


def test_a_code_version_mismatch_stops_both_processes_with_one_line(env, tmp_path):
    """Process 1 imports a copy of pmf_jax/ and train/ with one changed byte: both exit 2 naming the code versions,
    before any model loads or anything is written."""
    copy = tmp_path / "checkout"
    for folder in ("pmf_jax", "train"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "train" / "__init__.py").open("a") as f:
        f.write("\n# another checkout\n")
    out = tmp_path / "generated"
    argv = [*PMF, "eval", "generate", "--model", tmp_path / "no_run", "--out", out]
    codes, logs = _finish(start_pair(argv, env["child"], tmp_path, "code", pythonpath=(None, copy)), timeout=300)
    assert codes == [2, 2], [text[-2000:] for text in logs]
    for i, text in enumerate(logs):
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, text[-2000:]
        assert f"process {1 - i} runs code version" in errors[0] and "a different checkout" in errors[0], errors[0]
    assert not out.exists() and not (tmp_path / "generated.partial").exists()
