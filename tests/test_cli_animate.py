"""``pmf animate`` in real subprocesses on the tiny export: the clip, its frames, the side-by-side video, the GIF and
the settings; frame i is byte-identical to ``pmf retarget`` on pose i (same seed, shared noise); an interrupted run
resumes from its last chunk and writes the very same frames; bad input is one
``error:`` line naming the file and frame, with nothing written under the final names."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (fixtures)
from test_cli_retarget import cli  # noqa: F401  (fixture)

from pmf_jax.pose import write_openpose_json
from pmf_jax.video.clip import read_back

av = pytest.importorskip("av")

FRAMES = 6
COMMON = ["--steps", "2", "--seed", "7", "--no-progress"]


def _dance(folder, frames=FRAMES):
    """The synthetic dancer's poses as one OpenPose JSON file per frame (natural order: frame_2 before frame_10)."""
    from data.synthetic_pairs.motion import dance

    folder.mkdir()
    poses = dance(frames, 64, seed=3)
    for i, kps in enumerate(poses):
        write_openpose_json(folder / f"frame_{i}.json", kps, 64, 64)
    return folder


def _frames(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "frames").iterdir())}


def test_animate_writes_the_clip_equal_to_retarget_per_pose(cli, tiny_export, tmp_path):
    poses = _dance(tmp_path / "poses", FRAMES + 6)
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(source)
    clip = tmp_path / "out" / "clip.mp4"
    base = ["animate", "--model", tiny_export, "--source", source, "--poses", poses, *COMMON]
    cli(*base, "--out", clip, "--batch-frames", "4", "--frames", f"0:{FRAMES}", "--gif")
    folder = clip.with_suffix("")
    assert read_back(clip) == (FRAMES, (64, 64))
    assert read_back(folder / "side_by_side.mp4") == (FRAMES, (64, 64 * 3))
    assert sorted(p.name for p in folder.iterdir()) == ["clip.gif", "frames", "settings.json", "side_by_side.mp4"]
    assert Image.open(folder / "clip.gif").n_frames == FRAMES
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["frame_count"] == FRAMES and settings["driving_indices"] == list(range(FRAMES))
    first = _frames(folder)
    assert list(first) == [f"frame_{i:05d}.png" for i in range(FRAMES)]
    assert len(set(first.values())) == FRAMES   # the poses change the frames

    # Frame i is `pmf retarget` on pose i, byte for byte (frame 3: the second chunk, second position).
    single = tmp_path / "single"
    cli("retarget", "--model", tiny_export, "--source", source, "--pose", poses / "frame_3.json", "--out", single,
        "--num-images", "1", *COMMON)
    assert (single / "result_00.png").read_bytes() == first["frame_00003.png"]

    # An interrupted run of a longer clip (killed after its first chunk) resumes from there: the same bytes.
    again = tmp_path / "again" / "clip.mp4"
    args = [*base, "--out", again, "--batch-frames", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], env=cli.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = again.parent / "clip.partial" / "progress.json"
    deadline = time.monotonic() + 300
    while not progress.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["frames_done"]
    assert done == 4, done
    assert not again.exists() and not again.with_suffix("").exists()   # nothing under the final names
    resumed = cli(*args)
    assert f"resuming at frame 4 of {FRAMES + 6}" in resumed.stdout
    longer = _frames(again.with_suffix(""))
    assert {name: longer[name] for name in first} == first
    assert read_back(again) == (FRAMES + 6, (64, 64)) and not progress.parent.exists()


def test_animate_input_errors_name_the_file_and_frame(cli, tiny_export, tmp_path):
    poses = _dance(tmp_path / "poses")
    write_openpose_json(poses / "frame_4.json", np.zeros((18, 3), np.float32), 64, 64)  # nobody in frame 4
    source = tmp_path / "source.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(source)
    clip = tmp_path / "out" / "clip.mp4"
    base = ["animate", "--model", tiny_export, "--source", source, "--out", clip, *COMMON]
    err = cli(*base, "--poses", poses, expect=2).stderr.strip()
    assert err.startswith("error: ") and "frame 4" in err and "frame_4.json" in err and "no person" in err
    assert len(err.splitlines()) == 1
    assert not clip.exists() and not clip.with_suffix("").exists() and not (tmp_path / "out" / "clip.partial").exists()
