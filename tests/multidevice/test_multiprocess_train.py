"""The trainer as a real multi-process run: 2 processes x 4 virtual CPU devices on localhost (jax.distributed with
gloo collectives), launched with the README's variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID).

One 8-device single-process run is the reference; one 2-process run is stopped by SIGTERM to process 1 (both save the
same step and exit 0), then resumed and process 1 killed (process 0 exits non-zero within the heartbeat bound, the
saved step stays restorable); a config mismatch stops both processes at start with one line. The commands that join
a multi-process run are in test_multiprocess_commands.py.

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the in-process restores use 8
devices; the subprocesses set their own device count).
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (train_fixtures)
import train_fixtures  # noqa: E402
from multiprocess_launch import child_environment, one_block_unet, start_pair  # noqa: E402
from pmf_jax import runtime  # noqa: E402
from pmf_jax.io.checkpoints import restore_trained_params  # noqa: E402
from train.logs import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny_synthetic.yaml")
HEARTBEAT_S = 5
# The smallest run that is still the real trainer: one UNet (reference_only) with one cross-attention block, 32 px.
SMALL = ["reference.mode=reference_only", "train.trainable=[unet]", "data.resolution=[32,32]", "data.batch_size=8",
         "mesh.data=-1", "train.steps=100000", "train.checkpoint_every=100000", "train.lr=1e-3",
         "train.compilation_cache=true"]
LOSS_STEPS = 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    runtime.add_dataset_builders()
    base = train_fixtures.prepare(root)
    base["unet"] = one_block_unet(root)
    child = child_environment(root, HEARTBEAT_S)
    base["child"] = child
    return base


def _command(env, run_dir, *extra):
    return [sys.executable, "-m", "train", "--config", CONFIG,
            *train_fixtures.overrides(env, run_dir, *SMALL, *extra)]


def _start_pair(env, run_dir, tmp_path, name, extra=((), ())):
    """Starts processes 0 and 1 of a 2-process run; returns [(Popen, log path)]."""
    return start_pair(_command(env, run_dir), env["child"], tmp_path, name, extra=extra)


def _wait_for(predicate, timeout, procs):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if any(p.poll() is not None for p, _ in procs):
            return predicate()
        time.sleep(0.1)
    return False


def _rows(run_dir):
    try:
        return read_metrics(run_dir)
    except ValueError:  # a row being written
        return []


def _saved_step(log_text):
    found = re.findall(r"SIGTERM: saved step (\d+)", log_text)
    return int(found[-1]) if found else None


@pytest.fixture(scope="module")
def reference_losses(env, tmp_path_factory):
    """The first LOSS_STEPS losses of the same run in one process on 8 devices."""
    tmp = tmp_path_factory.mktemp("one_process")
    child = dict(env["child"], XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(_command(env, tmp / "run", ) + ["--max-steps", str(LOSS_STEPS)], env=child, cwd=tmp, check=True,
                   capture_output=True, timeout=900)
    return [row["loss"] for row in read_metrics(tmp / "run")]


@pytest.fixture(scope="module")
def preempted_run(env, tmp_path_factory):
    """A 2-process run stopped by SIGTERM to process 1 once LOSS_STEPS + 1 steps are logged."""
    tmp = tmp_path_factory.mktemp("two_processes")
    run_dir = tmp / "run"
    procs = _start_pair(env, run_dir, tmp, "preempted")
    assert _wait_for(lambda: len(_rows(run_dir)) > LOSS_STEPS, 900, procs), procs[0][1].read_text()[-3000:]
    procs[1][0].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p, _ in procs]
    logs = [log.read_text() for _, log in procs]
    return {"dir": run_dir, "tmp": tmp, "codes": codes, "logs": logs}


def test_two_processes_match_one_process_and_write_one_log(preempted_run, reference_losses):
    run_dir = preempted_run["dir"]
    losses = [row["loss"] for row in read_metrics(run_dir)][:LOSS_STEPS]
    assert len(reference_losses) == LOSS_STEPS
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-5)
    # only process 0 writes the run's logs: one metrics file, one TensorBoard event file, one config
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "components.json", "config.yaml",
                                                         "metrics.jsonl", "tensorboard"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    steps = [row["step"] for row in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one row per step: process 1 wrote none
    assert "process 0 of 2, 4 local devices of 8" in preempted_run["logs"][0]
    assert "process 1 of 2, 4 local devices of 8" in preempted_run["logs"][1]


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_exits_zero(preempted_run):
    assert preempted_run["codes"] == [0, 0], [log[-2000:] for log in preempted_run["logs"]]
    saved = [_saved_step(log) for log in preempted_run["logs"]]
    assert saved[0] is not None and saved[0] == saved[1] > LOSS_STEPS
    steps = sorted(int(p.name) for p in (preempted_run["dir"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [saved[0]]


def _restore_state(run_dir, devices):
    """The whole train state (parameters, optimizer state, step, rng) of the latest step, restored in this process
    onto a mesh of ``devices`` (replicated), as numpy."""
    import orbax.checkpoint as ocp

    from pmf_jax.io.checkpoints import open_manager

    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    manager = open_manager(run_dir)
    step = manager.latest_step()
    meta = manager.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    restore_args = jax.tree_util.tree_map(
        lambda s: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=s.shape, dtype=s.dtype), target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args)))
    leaves = jax.tree_util.tree_leaves(restored["state"])
    assert all(len(leaf.sharding.device_set) == len(devices) for leaf in leaves)
    return jax.device_get(restored["state"]), step


def test_the_two_process_checkpoint_restores_on_8_and_on_1_device(preempted_run):
    on8, step8 = _restore_state(preempted_run["dir"], jax.devices())
    on1, step1 = _restore_state(preempted_run["dir"], jax.devices()[:1])
    assert step8 == step1 == _saved_step(preempted_run["logs"][0])
    leaves8, leaves1 = jax.tree_util.tree_leaves(on8), jax.tree_util.tree_leaves(on1)
    assert len(leaves8) == len(leaves1) > 10
    for a, b in zip(leaves8, leaves1):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sum(float(np.abs(np.asarray(a, np.float64)).sum()) for a in leaves8) > 0


def test_a_killed_process_stops_the_other_within_the_heartbeat_bound(env, preempted_run):
    """Resumed from the SIGTERM checkpoint; process 1 is killed once a step past it is logged."""
    run_dir, tmp = preempted_run["dir"], preempted_run["tmp"]
    saved = _saved_step(preempted_run["logs"][0])
    before, _ = restore_trained_params(run_dir)
    procs = _start_pair(env, run_dir, tmp, "killed")
    assert _wait_for(lambda: any(r["step"] > saved for r in _rows(run_dir)), 900, procs), \
        procs[0][1].read_text()[-3000:]
    procs[1][0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0][0].wait(timeout=120)
    waited = time.monotonic() - killed
    assert code != 0
    # documented bound: PMF_HEARTBEAT_TIMEOUT plus the coordination service's polling (a few seconds)
    assert waited < HEARTBEAT_S + 25, waited
    after, step = restore_trained_params(run_dir)
    assert step == saved
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_a_config_mismatch_stops_both_processes_with_one_line(env, tmp_path):
    procs = _start_pair(env, tmp_path / "run", tmp_path, "mismatch", extra=((), ("train.lr=2e-3",)))
    codes = [p.wait(timeout=300) for p, _ in procs]
    assert codes == [2, 2]
    for i, (_, log) in enumerate(procs):
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1, log.read_text()[-2000:]
        assert "train.lr=0.002 vs 0.001" in errors[0] or "train.lr=0.001 vs 0.002" in errors[0], errors[0]
        assert f"process {1 - i} has" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
