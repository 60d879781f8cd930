"""What a run writes besides its results, in real subprocesses: progress off a terminal is a line per interval, not
a redraw per update; library log noise is hidden unless ``-v``; exports get the user's umask, not 0700 / 0600."""

import io
import os
import stat
import subprocess
import sys

import pytest

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from pmf_jax import progress, runtime
from pmf_jax.errors import PMFInputError
from tiny_sd import tiny_sd  # noqa: F401  (fixture)

# The test process ran runtime.setup() (conftest), which put the quiet settings into its environment: the children
# start without them, as from a user's shell.
QUIET_VARIABLES = (*runtime.QUIET_ENVIRONMENT, runtime.VERBOSE_ENV, progress.INTERVAL_ENV)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARIABLES}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def _run(args, *, umask=0o022, **env):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=_env(**env),
                          timeout=600, umask=umask)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _modes(root):
    """{relative path: permission bits} of root and everything under it (symlinks left out)."""
    modes = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, folders, files in os.walk(root):
        for name in (*folders, *files):
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                modes[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return modes


def test_progress_off_a_terminal_is_a_line_per_interval(tiny_sd, tiny_export, tmp_path):
    """20 sampling steps into a pipe with a 1-hour interval: the final line only (tqdm wrote a redraw per update and
    erased the bar at the end)."""
    proc = _run(["-m", "pmf_jax.cli", "retarget", "--model", tiny_export, "--source", tiny_sd.source, "--pose",
                 tiny_sd.pose, "--out", tmp_path / "out", "--steps", "20", "--height", "64", "--width", "64",
                 "--num-images", "1"], PMF_PROGRESS_INTERVAL="3600")
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("retarget (")]
    assert len(lines) == 1 and lines[0].startswith("retarget (acm): 20/20 step (100%)"), proc.stderr


def test_line_progress_interval_and_terminal():
    """In process, on real streams: interval 0 = a line per update (the final one not repeated); a long interval =
    the final line only, with the postfix; a terminal gets tqdm; a bad interval is one clear error."""
    stream = io.StringIO()
    bar = progress.LineProgress(total=3, desc="x", unit="step", stream=stream, interval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "x: 1/3 step (33%)", "x: 2/3 step (67%)", "x: 3/3 step (100%)"]
    stream = io.StringIO()
    with progress.LineProgress(total=5, initial=2, desc="train", stream=stream, interval=3600) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.5000")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 5/5 it (100%)") and lines[0].endswith("loss=0.5000")
    assert list(progress.bar(range(4), desc="quiet", disable=True, stream=stream)) == [0, 1, 2, 3]
    assert stream.getvalue().splitlines() == lines

    master, slave = os.openpty()  # a real terminal
    with os.fdopen(slave, "w") as terminal:
        from tqdm import tqdm

        terminal_bar = progress.bar(total=2, desc="t", stream=terminal)
        assert isinstance(terminal_bar, tqdm)
        terminal_bar.close()
    os.close(master)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(progress.INTERVAL_ENV, "soon")
        with pytest.raises(PMFInputError, match="PMF_PROGRESS_INTERVAL='soon' must be a number"):
            progress.interval_s()


def test_quiet_by_default_verbose_brings_it_back_and_exports_follow_the_umask(tiny_run, tmp_path):
    """The `pmf` CLI's main in a subprocess, `convert to-diffusers` of a run (orbax logs "Given directory is read
    only" through absl when it opens the checkpoints), then in the same process what the trainer and the data
    preparation do after their setup: TFDS probes a data folder (it warns "Variant folder ... has no
    dataset_info.json" for each one missing) and TensorFlow loads (its oneDNN banner). Default: none of these lines;
    -v: all of them. The export's folders and files have 0777 / 0666 less the umask (022, 002), not tempfile's 0700
    and safetensors' 0600."""
    script = ("import sys\n"
              "from pmf_jax import cli, input_pipeline\n"
              "from pmf_jax.errors import PMFInputError\n"
              "assert cli.main(sys.argv[1:]) == 0\n"
              "try:\n"
              f"    input_pipeline.data_source('synthetic_pairs', 'train', {str(tmp_path / 'no_data')!r}, 'tiny')\n"
              "except PMFInputError:\n"
              "    pass\n"
              "import tensorflow\n")
    noise = ("Given directory is read only", "has no dataset_info.json", "oneDNN custom operations are on")
    # -v works after the subcommand too (as users type it: `pmf convert to-diffusers ... -v`)
    for umask, verbose in ((0o022, []), (0o002, ["-v"])):
        out = tmp_path / f"export_{umask:03o}"
        stderr = _run(["-c", script, "convert", "to-diffusers", "--checkpoint", tiny_run[0], "--out", out, *verbose],
                      umask=umask).stderr
        assert [line for line in noise if line in stderr] == (list(noise) if verbose else []), stderr
        modes = _modes(out)
        folders = {p for p in modes if (out / p).is_dir()}
        assert {p: m for p, m in modes.items() if p in folders} == {p: 0o777 & ~umask for p in folders}
        assert {p: m for p, m in modes.items() if p not in folders} == {p: 0o666 & ~umask for p in modes
                                                                         if p not in folders}
        assert any(p.endswith(".safetensors") for p in modes)
