"""gs:// outputs and inputs of the ``pmf`` commands against a real GCS-protocol server (tests/gcs_emulator.py, one per
module): an export written to the bucket and loaded back from it, ``pmf eval score`` reading images, dataset and
writing its report on the bucket, the one-line errors of a bad location (nothing left behind), and a killed upload
that never leaves a folder that looks complete."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_fixtures import BUCKET, FORBIDDEN, gcs  # noqa: F401  (pytest fixture)
from PIL import Image
from tiny_sd import tiny_sd  # noqa: F401  (pytest fixture)

from pmf_jax import input_pipeline, storage

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "data" / "deepfashion_pairs" / "dummy_data"
DATASET, CONFIG = "deepfashion_pairs", "256x176"


def _pmf(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _no_local_url_folder(*roots):
    """No folder named "gs:" (a URL taken for a local path) anywhere under ``roots``."""
    for root in roots:
        assert not [p for p in Path(root).rglob("gs:")], root


def test_export_to_the_bucket_loads_back_and_retargets_as_the_local_folders(gcs, tiny_sd, tmp_path):  # noqa: F811
    from pmf_jax.io import from_pretrained
    from pmf_jax.pipelines import RetargetPipeline

    out = gcs.url("exports/tiny")
    run = _pmf(["convert", "from-diffusers", "--model", tiny_sd.sd, "--controlnet", tiny_sd.controlnet,
                "--reference-unet", tiny_sd.reference_unet, "--out", out], gcs.env, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    names = gcs.names("exports/tiny")
    assert "pmf_pretrained.json" in names and "unet/config.json" in names
    assert any(n.startswith("reference_unet/orbax_params/") for n in names)
    _no_local_url_folder(tmp_path)

    _, remote = from_pretrained(out, subfolder="controlnet")
    _, local = from_pretrained(tiny_sd.controlnet)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(*(jax_leaves(t) for t in (remote, local)))]
    assert len(diffs) > 10 and max(diffs) == 0.0

    kw = dict(prompt="a man", seed=0, num_inference_steps=1, height=64, width=64, output_type="np")
    from_bucket = RetargetPipeline.from_pretrained(out, mode="acm")(tiny_sd.source, tiny_sd.pose, **kw)
    from_folders = RetargetPipeline.from_pretrained(tiny_sd.sd, controlnet=tiny_sd.controlnet,
                                                    reference_unet=tiny_sd.reference_unet, mode="acm"
                                                    )(tiny_sd.source, tiny_sd.pose, **kw)
    assert from_bucket.shape == (1, 64, 64, 3) and float(np.std(from_bucket)) > 0.01
    assert float(np.max(np.abs(from_bucket - from_folders))) <= 1e-6


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.build(DATASET, data_dir, config=CONFIG, manual_dir=DUMMY)
    return data_dir


def test_score_reads_images_and_dataset_from_the_bucket_and_writes_its_report(gcs, data_dir, tmp_path):  # noqa: F811
    from pmf_jax.evaluation import read_pairs

    generated = tmp_path / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    for pair in read_pairs(DATASET, CONFIG, "test", data_dir):
        Image.fromarray(rng.integers(0, 256, (256, 176, 3), dtype=np.uint8)).save(generated / pair.filename)
    (generated / "generation.json").write_text(json.dumps({"prompt": ""}))
    storage.publish_folder(shutil.copytree(generated, tmp_path / "stage"), gcs.url("eval/generated"))
    storage.publish_folder(shutil.copytree(data_dir / DATASET, tmp_path / "stage_tfds"), gcs.url(f"tfds/{DATASET}"))

    args = ["eval", "score", "--dataset", f"{DATASET}/{CONFIG}", "--split", "test", "--metrics", "ssim,psnr",
            "--no-progress"]
    local = _pmf([*args, "--generated", generated, "--data-dir", data_dir], gcs.env, tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = _pmf([*args, "--generated", gcs.url("eval/generated"), "--data-dir", gcs.url("tfds"),
                   "--out", gcs.url("eval/report/scores")], gcs.env, tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "array_record reads local files only" in remote.stderr  # the dataset was staged, and it says so
    assert gcs.names("eval/report") == ["scores.json", "scores.md"]
    want = json.loads((generated / "scores.json").read_text())
    got = json.loads(storage.as_path(gcs.url("eval/report/scores.json")).read_text())
    assert got["generated"] == gcs.url("eval/generated") and got["num_pairs"] == want["num_pairs"] == 2
    for metric in ("ssim", "psnr"):
        assert got["metrics"][metric]["value"] == want["metrics"][metric]["value"]
        assert 0 < abs(got["metrics"][metric]["value"])
    assert [r["ssim"] for r in got["per_pair"]] == [r["ssim"] for r in want["per_pair"]]
    _no_local_url_folder(tmp_path)


@pytest.mark.parametrize("case", ["unreachable", "missing bucket", "permission", "local-only command"])
def test_a_bad_location_is_one_line_exit_2_and_leaves_nothing(gcs, tiny_sd, tmp_path, case):  # noqa: F811
    env = dict(gcs.env)
    if case == "unreachable":
        import gcs_emulator

        env[storage.EMULATOR_ENV] = f"http://127.0.0.1:{gcs_emulator.free_port()}"  # nothing listens there
        env.pop("TENSORSTORE_GCS_HTTP_URL", None)
    bucket = {"missing bucket": "no-such-bucket", "permission": FORBIDDEN}.get(case, BUCKET)
    out = gcs.url(f"bad/{case.replace(' ', '-')}", bucket)
    if case == "local-only command":
        args = ["animate", "--model", tiny_sd.sd, "--source", tiny_sd.source, "--poses", tiny_sd.pose,
                "--out", out + ".mp4"]
    else:
        args = ["convert", "from-diffusers", "--model", tiny_sd.sd, "--out", out]
    run = _pmf(args, env, tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and out in lines[0], run.stderr
    reason = {"unreachable": "cannot reach the storage server", "missing bucket": "does not exist",
              "permission": "permission denied", "local-only command": "writes local files only"}[case]
    assert reason in lines[0], lines[0]
    if bucket == BUCKET:
        assert gcs.names("bad") == []
    _no_local_url_folder(tmp_path, REPO)


PUBLISH = """
import sys
from pmf_jax.out_folder import staged_folder
with staged_folder(sys.argv[1]) as stage:
    (stage / "unet").mkdir()
    for i in range(int(sys.argv[2])):
        (stage / "unet" / f"shard_{i:04d}.bin").write_bytes(bytes([i % 256]) * 2048)
    (stage / "model_index.json").write_text("{}")
    (stage / "pmf_config.json").write_text("{}")
"""


def test_a_killed_upload_never_leaves_a_folder_that_looks_complete(gcs, tmp_path):  # noqa: F811
    files = 400
    out = gcs.url("atomic/export")
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH, out, str(files)], env=gcs.env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and len(gcs.names("atomic/export")) < 5:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = gcs.names("atomic/export")
    assert 5 <= len(names) < files + 2, len(names)  # killed while uploading
    assert all(n.startswith("unet/shard_") for n in names)  # the index files are uploaded last: absent
    assert not storage.as_path(out + "/model_index.json").exists()

    # A completed run of the same publish: everything, index files included, in place.
    done = subprocess.run([sys.executable, "-c", PUBLISH, gcs.url("atomic/complete"), "3"], env=gcs.env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert gcs.names("atomic/complete") == ["model_index.json", "pmf_config.json", "unet/shard_0000.bin",
                                            "unet/shard_0001.bin", "unet/shard_0002.bin"]


def test_a_failing_block_uploads_nothing_and_a_non_empty_url_needs_overwrite(gcs):  # noqa: F811
    from pmf_jax.errors import PMFInputError
    from pmf_jax.out_folder import staged_file, staged_folder

    out = gcs.url("failing/run")
    with pytest.raises(RuntimeError, match="stopped"):
        with staged_folder(out) as stage:
            (stage / "config.json").write_text("{}")
            stage_path = stage
            raise RuntimeError("stopped")
    assert gcs.names("failing") == [] and not stage_path.exists()
    with staged_folder(out) as stage:
        (stage / "config.json").write_text('{"a": 1}')
    with pytest.raises(PMFInputError, match="already exists and is not empty"):
        with staged_folder(out):
            pass
    with staged_folder(out, overwrite=True) as stage:
        (stage / "other.json").write_text('{"b": 2}')
    assert gcs.names("failing/run") == ["other.json"]  # replaced, not mixed
    with staged_file(gcs.url("failing/report.md")) as tmp:
        tmp.write_text("# scores\n")
    assert storage.as_path(gcs.url("failing/report.md")).read_text() == "# scores\n"
    assert not tmp.exists()


CACHE_PROGRAM = """
import jax, jax.numpy as jnp
from pmf_jax import runtime
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
print("cache", runtime.setup())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
print("value", float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((16, 16))).sum()))
print("hits", len(hits))
"""


def test_the_compilation_cache_in_a_bucket_is_written_then_read(gcs, tmp_path):  # noqa: F811
    """$PMF_JAX_CACHE_DIR=gs://...: the first process writes its compiled programs to the bucket, the second reads
    them (cache hits), with no local folder named gs: anywhere."""
    env = dict(gcs.env, PMF_JAX_CACHE_DIR=gcs.url("jax_cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = [subprocess.run([sys.executable, "-c", CACHE_PROGRAM], capture_output=True, text=True, timeout=300,
                           env=env, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"cache {gcs.url('jax_cache')}" in run.stdout
    first, second = (dict(line.split(" ", 1) for line in run.stdout.splitlines()) for run in runs)
    assert first["value"] == second["value"]
    assert int(first["hits"]) == 0 and int(second["hits"]) >= 1
    assert any(name.startswith("jit__lambda") for name in gcs.names("jax_cache"))
    _no_local_url_folder(tmp_path)
