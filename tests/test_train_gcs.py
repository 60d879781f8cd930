"""Training into a bucket (``train.output_dir=gs://...``) against a real GCS-protocol server (tests/gcs_emulator.py):
kill -9 after a checkpoint (between two), resume from the bucket, the parameters equal the uninterrupted run's; no local folder
named ``gs:`` appears; a missing bucket or a forbidden one is one line, exit 2, before anything is written."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gcs_fixtures import gcs  # noqa: F401  (the pytest fixture)
from pmf_jax import storage
from pmf_jax.io.checkpoints import restore_trained_params
from train.logs import read_metrics
import train_fixtures

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "tiny_synthetic.yaml")
STEPS = ["train.steps=40", "train.checkpoint_every=10", "train.lr=1e-3", "train.compilation_cache=true"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, gcs):  # noqa: F811
    from pmf_jax import runtime

    runtime.add_dataset_builders()
    return train_fixtures.prepare(tmp_path_factory.mktemp("train"))


def _cli(run, env, *extra):
    return [sys.executable, "-m", "train", "--config", CONFIG, *train_fixtures.overrides(env, run, *STEPS, *extra)]


def _child(gcs):  # noqa: F811
    """The subprocesses run in a temporary folder (where a relative ``gs:`` folder would appear): train/ is
    importable from the checkout."""
    return dict(gcs.env, PYTHONPATH=str(ROOT))


def _saved_steps(gcs, prefix):  # noqa: F811
    """The checkpoint steps orbax committed (on an object store: ``<step>/commit_success.txt``, written last)."""
    return sorted(int(parts[1]) for parts in (name.split("/") for name in gcs.names(prefix))
                  if len(parts) == 3 and parts[0] == "checkpoints" and parts[1].isdigit()
                  and parts[2] == "commit_success.txt")


def _no_local_gs_folder(*roots):
    return not any(p.name == "gs:" for root in roots for p in Path(root).rglob("gs:"))


def test_kill_9_and_resume_from_the_bucket_equals_the_uninterrupted_run(gcs, env, tmp_path):  # noqa: F811
    straight, killed = gcs.url("runs/straight"), gcs.url("runs/killed")
    first = subprocess.run(_cli(straight, env), capture_output=True, text=True, timeout=600, env=_child(gcs), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = subprocess.Popen(_cli(killed, env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child(gcs),
                            cwd=tmp_path)

    def logged_after_checkpoint():  # a step after a sealed checkpoint is logged: rows the resumed run logs again
        try:
            last_row = read_metrics(killed)[-1]["step"]
        except (ValueError, IndexError, OSError):
            return False
        saved = _saved_steps(gcs, "runs/killed")
        return bool(saved) and last_row > max(saved)

    start = time.time()
    while time.time() - start < 600 and proc.poll() is None and not logged_after_checkpoint():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_saved_steps(gcs, "runs/killed"))
    assert killed_at < 40, "the run finished before it could be killed"
    resumed = subprocess.run(_cli(killed, env), capture_output=True, text=True, timeout=600, env=_child(gcs),
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed}/checkpoints/{killed_at}" in resumed.stdout, resumed.stdout[-2000:]
    assert [row["step"] for row in read_metrics(killed)] == list(range(1, 41))
    a, step_a = restore_trained_params(straight)
    b, step_b = restore_trained_params(killed)
    assert step_a == step_b == 40
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    names = gcs.names("runs/killed")
    assert {"config.yaml", "components.json", "metrics.jsonl"} <= set(names)
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert any(n.startswith("checkpoints/40/state/") for n in names)
    from pmf_jax.pipelines.from_run import read_run_config

    cfg = read_run_config(killed, ["sampling.steps=3"])   # config.yaml read from the bucket
    assert (cfg.train.output_dir, cfg.train.steps, cfg.sampling.steps) == (killed, 40, 3)
    assert _no_local_gs_folder(tmp_path, ROOT, Path.cwd())


@pytest.mark.parametrize("bucket,why", [("no-such-bucket", "the bucket gs://no-such-bucket does not exist"),
                                        ("forbidden-x", "permission denied")])
def test_a_bucket_that_cannot_be_written_is_one_line_exit_2(gcs, env, tmp_path, bucket, why):  # noqa: F811
    run = f"gs://{bucket}/run"
    result = subprocess.run(_cli(run, env), capture_output=True, text=True, timeout=300, env=_child(gcs), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: train.output_dir {run}: cannot write there: {why}"], result.stderr[-2000:]
    assert _no_local_gs_folder(tmp_path)
    if bucket != "forbidden-x":
        assert not storage.as_path(f"gs://{bucket}").exists()
