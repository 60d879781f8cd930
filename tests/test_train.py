"""The trainer end to end on synthetic data: loss goes down, kill -9 + resume is exact, SIGTERM saves, bad input,
damaged checkpoints are skipped or one line, the last good checkpoint is named."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pmf_jax.config import load_config
from pmf_jax.io.checkpoints import restore_trained_params
from train.__main__ import main as train_main
from train.logs import read_metrics
from train.loop import train_and_evaluate
import train_fixtures

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
CONFIG = str(ROOT / "configs" / "tiny_synthetic.yaml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # inherited by the subprocesses
        patch.setenv("PMF_JAX_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        patch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        yield train_fixtures.prepare(tmp_path_factory.mktemp("train"))


def _cli(run_dir, env, *extra):
    """The trainer as a subprocess; the runs of this module share a persistent compilation cache (PMF_JAX_CACHE_DIR,
    set by the env fixture), as restarted runs do: the first run compiles, the others load the programs."""
    return [sys.executable, "-m", "train", "--config", CONFIG,
            *train_fixtures.overrides(env, run_dir, *extra, "train.compilation_cache=true")]


def test_loss_decreases(env, tmp_path):
    cfg = load_config(CONFIG, train_fixtures.overrides(env, tmp_path / "run", "train.steps=60", "train.lr=3e-3",
                                                       "train.checkpoint_every=60", "train.eval_every=60",
                                                       "sampling.steps=2"))
    last = train_and_evaluate(cfg)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run")]
    assert len(losses) == 60 and last["step"] == 60
    # the first 3 losses equal those recorded before the seams refactor (tests/test_golden.py)
    np.testing.assert_allclose(losses[:3], json.loads((GOLDEN / "train_loss_first3.json").read_text()), rtol=1e-6,
                               atol=1e-6)
    # Measured (x0 prediction, tiny UNet, 60 steps of 4 pairs): the first 10 steps average ~0.45, the last 10 ~0.12.
    # Require the last ten to average under half the first ten.
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    run_files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "components.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= run_files
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    # the sample grid of step 60: 4 eval pairs x (source | pose | sample | target) at 64 px
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "run" / "previews" / "step_0000060.png"))
    assert grid.shape == (4 * 64, 4 * 64, 3) and grid[:, 128:192].std() > 0


def _wait_for(predicate, timeout, proc):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    return False


def test_kill_9_and_resume_equals_uninterrupted(env, tmp_path):
    steps = ["train.steps=40", "train.checkpoint_every=10", "train.lr=1e-3"]
    subprocess.run(_cli(tmp_path / "straight", env, *steps), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(tmp_path / "killed", env, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints"
    saved = lambda: [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []  # noqa

    def logged_after():  # a step after a checkpoint >= 10 was logged: rows the resumed run logs again
        last = max(saved(), default=0)
        try:
            return last >= 10 and read_metrics(tmp_path / "killed")[-1]["step"] > last
        except (ValueError, IndexError):  # a row being written
            return False

    assert _wait_for(logged_after, 600, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(saved())
    assert killed_at < 40, "the run finished before it could be killed"
    subprocess.run(_cli(tmp_path / "killed", env, *steps), check=True, capture_output=True, timeout=600)
    assert [row["step"] for row in read_metrics(tmp_path / "killed")] == list(range(1, 41))
    a, step_a = restore_trained_params(tmp_path / "straight")
    b, step_b = restore_trained_params(tmp_path / "killed")
    assert step_a == step_b == 40
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _largest_data_file(step_dir: Path) -> Path:
    """The biggest array-data file of a checkpoint step (OCDBT ``d/`` folders)."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def test_corrupt_or_truncated_checkpoints_are_skipped_or_one_line(env, tmp_path):
    """4 KB of the latest checkpoint's data overwritten: skipped with a warning, the previous one restored (training
    goes on exactly). Every checkpoint truncated: one error line, exit 2. The start-up phases are logged."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # the program of test_kill_9_and_resume_equals_uninterrupted (train.steps and lr): the compilation cache holds it
    cmd = lambda max_steps: [*_cli(run, env, "train.steps=40", "train.lr=1e-3", "train.checkpoint_every=1",  # noqa
                                   "train.keep_checkpoints=3"), "--max-steps", str(max_steps)]
    first = subprocess.run(cmd(3), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for phase in ("start-up", "opening dataset", "building the models", "compiling the train step",
                  "first step done"):
        assert phase in first.stdout, (phase, first.stdout[-3000:])
    compiled = r"train step traced in [0-9.]+ s, compiled in [0-9.]+ s \(compilation cache (hit, read in [0-9.]+ s|miss)\)"
    assert re.search(compiled, first.stdout), first.stdout[-3000:]
    assert all((ckpt / str(step) / "checksums.json").is_file() for step in (1, 2, 3))
    loss_3 = read_metrics(run)[2]["loss"]

    data = _largest_data_file(ckpt / "3")
    with data.open("r+b") as f:
        f.seek(data.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    second = subprocess.run(cmd(1), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"checkpoint {ckpt}/3 is incomplete or corrupt ({data.relative_to(ckpt / '3')} does not match its " \
           f"sha256" in second.stderr
    assert f"resumed from {ckpt}/2" in second.stdout and (ckpt / "3.corrupt").is_dir()
    rows = read_metrics(run)  # the first run's row of step 3 was dropped when step 2 was restored
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[2]["loss"] == pytest.approx(loss_3, rel=1e-6)

    # truncated data: caught by the manifest's sizes, and by orbax where a step has no manifest
    for step in (1, 2, 3):
        if step != 3:
            (ckpt / str(step) / "checksums.json").unlink()
        with _largest_data_file(ckpt / str(step)).open("r+b") as f:
            f.truncate(1000)
    third = subprocess.run(cmd(1), capture_output=True, text=True, timeout=600)
    assert third.returncode == 2 and "Traceback" not in third.stderr, third.stderr[-3000:]
    last = third.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no checkpoint in {ckpt} restores, each is incomplete or corrupt: step 3: ")
    assert "step 2: " in last and "step 1: " in last


def test_sigterm_saves_and_exits_zero(env, tmp_path):
    proc = subprocess.Popen(_cli(tmp_path / "run", env, "train.steps=100000", "train.checkpoint_every=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 600, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 100000, (out[-2000:], err[-3000:])
    assert f"SIGTERM: saved step {steps[0]}" in out


@pytest.mark.parametrize("extra,message", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=fast"], "train.lr"),
    (["model.base=/no/such/sd15", "model.autoencoder=vae"], "/no/such/sd15"),
    (["reference.mode=controlnet_only"], "reference.mode=controlnet_only has no reference bank to train"),
    (["train.output_dir={file}"], "is a file, not a folder"),
])
def test_bad_input_is_one_line_exit_2(env, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("")
    extra = [e.format(file=tmp_path / "file") for e in extra]
    code = train_main(["--config", CONFIG, *train_fixtures.overrides(env, tmp_path / "run", *extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and message in err and "Traceback" not in err


def test_pickled_model_folder_needs_allow_pickle(env, tmp_path):
    """A pickled (.bin) ControlNet folder is refused naming the trainer's flag; with --allow-pickle it is read, and
    this random ControlNet, which does not fit the tiny UNet, gets one line naming what differs (not a traceback)."""
    folder = tmp_path / "pickled_controlnet"
    subprocess.run([sys.executable, "-c", (
        "import sys; from diffusers import ControlNetModel\n"
        "ControlNetModel(block_out_channels=(8, 16), down_block_types=('DownBlock2D', 'DownBlock2D'), "
        "layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, "
        "conditioning_embedding_out_channels=(4, 8)).save_pretrained(sys.argv[1], safe_serialization=False)"),
        str(folder)], check=True, timeout=300)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    for flag in ([], ["--allow-pickle"]):
        run = subprocess.run(_cli(tmp_path / "run", env, f"model.controlnet={folder}", *flag), capture_output=True,
                             text=True, timeout=300)
        err = run.stderr.strip()
        assert run.returncode == 2 and "Traceback" not in err, err[-3000:]
        last = err.splitlines()[-1]
        assert last.startswith("error:") and ("pass --allow-pickle" in last) == (not flag), last
        assert ("pickle file" in last) == (not flag) and ("does not fit this UNet" in last) == bool(flag), last


def test_dataset_not_built_subprocess(env, tmp_path):
    run = subprocess.run(_cli(tmp_path / "run", env, f"data.data_dir={tmp_path / 'empty'}"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "is not built" in last and "Traceback" not in run.stderr
    # checked first: no model was built, nothing (config.yaml, components.json) was written to the run folder
    assert "building the models" not in run.stdout and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_a_clear_error_naming_the_last_good_checkpoint(env, tmp_path, capsys):
    run = tmp_path / "run"
    ok = train_main(["--config", CONFIG, *train_fixtures.overrides(env, run, "train.steps=2",
                                                                   "train.checkpoint_every=1")])
    assert ok == 0
    # resume the same run with inputs that overflow: the loss turns inf/NaN at step 3, the first step after
    # checkpoint 2, so 2 is not good; checkpoint 1 is (the finite loss of step 2 followed it)
    code = train_main(["--config", CONFIG, *train_fixtures.overrides(env, run, "train.steps=4", "train.noise_offset=1e30",
                                                                     "train.checkpoint_every=1")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and err.startswith("error: loss became non-finite at step 3")
    assert f"the last good checkpoint is {run / 'checkpoints'}/1 (the last one followed by a finite loss)" in err
    assert "the loss was not finite after checkpoint(s) [2]" in err
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
