"""data/synthetic_pairs: real TFDS builds (in-process and with the `tfds build` command line) and the data's values."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pmf_jax import input_pipeline
from pmf_jax.pose import COLORS, line_widths_for, render_pose

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module():
    return sys.modules[input_pipeline.builder_class("synthetic_pairs").__module__]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = input_pipeline.build("synthetic_pairs", data_dir, config="tiny")
    splits = {s: input_pipeline.data_source("synthetic_pairs", s, data_dir, "tiny") for s in ("train", "test")}
    return data_dir, builder, {s: [src[i] for i in range(len(src))] for s, src in splits.items()}


def test_array_record_files_and_split_sizes(built):
    data_dir, builder, examples = built
    files = sorted(p.name for p in Path(builder.data_dir).iterdir())
    assert "synthetic_pairs-train.array_record-00000-of-00001" in files
    assert builder.info.splits["train"].num_examples == len(examples["train"]) == 4 * 2
    assert builder.info.splits["test"].num_examples == len(examples["test"]) == 2 * 2
    example = examples["train"][0]
    assert example["source_image"].shape == (64, 64, 3) and example["source_image"].dtype == np.uint8
    assert example["target_keypoints"].shape == (18, 3) and example["target_keypoints"].dtype == np.float32


def test_test_identities_never_in_train(built):
    _, _, examples = built
    train = {e["person_id"] for e in examples["train"]}
    test = {e["person_id"] for e in examples["test"]}
    assert len(train) == 4 and len(test) == 2 and not train & test


def _count(image, colour):
    return int(np.all(image == np.asarray(colour, np.uint8), axis=-1).sum())


def test_appearance_is_identity_consistent_and_differs_between_identities(built, module):
    _, _, examples = built
    looks = {}
    for split in ("train", "test"):
        for e in examples[split]:
            identity = int(e["person_id"].decode()[2:])
            looks[e["person_id"]] = module.figures.sample_appearance(np.random.default_rng([0, identity]))
    for e in examples["train"] + examples["test"]:
        look = looks[e["person_id"]]
        for part in ("source_image", "target_image"):
            image = e[part]
            # The identity's own flat colours are in both images of the pair...
            np.testing.assert_array_equal(image[0, 0], look.background)
            assert _count(image, look.shirt) + _count(image, look.shirt_pattern) >= 20, e["source_name"]
            assert _count(image, look.pants) >= 10
            # ... and no other identity's shirt or background colour is.
            for other_id, other in looks.items():
                if other_id != e["person_id"]:
                    assert _count(image, other.shirt) == 0 and _count(image, other.background) == 0
        # Same look, different pose: the images differ, the backgrounds match.
        assert not np.array_equal(e["source_image"], e["target_image"])
        assert not np.allclose(e["source_keypoints"], e["target_keypoints"])


def test_figure_is_drawn_at_its_keypoints_and_pose_image_matches(built, module):
    _, _, examples = built
    for e in examples["train"]:
        image, kps = e["target_image"], e["target_keypoints"]
        background = image[0, 0]
        assert np.all(kps[:, 2] == 1) and np.all((kps[:, :2] >= 0) & (kps[:, :2] < 64))
        for j, (x, y, _) in enumerate(kps):
            assert not np.array_equal(image[int(round(y)), int(round(x))], background), f"joint {j} on background"
        pose = render_pose(kps, 64, 64, *line_widths_for(64, 64))
        for j, (x, y, _) in enumerate(kps):
            later = [k for k in range(j + 1, 18) if np.abs(kps[k, :2] - kps[j, :2]).max() <= 3]
            if not later:  # no disc drawn after this joint's covers it
                np.testing.assert_array_equal(pose[int(y), int(x)], COLORS[j])


def test_generation_is_deterministic_from_the_seed(module):
    a = list(module.generate_identity(7, 64, 2, seed=0))
    b = list(module.generate_identity(7, 64, 2, seed=0))
    c = list(module.generate_identity(7, 64, 2, seed=1))
    for (ka, ea), (kb, eb) in zip(a, b):
        assert ka == kb
        np.testing.assert_array_equal(ea["source_image"], eb["source_image"])
        np.testing.assert_array_equal(ea["target_keypoints"], eb["target_keypoints"])
    assert not np.array_equal(a[0][1]["source_image"], c[0][1]["source_image"])


def test_tfds_build_command_line(built, tmp_path):
    """`tfds build data/synthetic_pairs` from the repository root writes the same examples as the Python build."""
    _, builder, examples = built
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    tfds_script = Path(sys.executable).parent / "tfds"  # the `tfds` console script of this environment
    tfds_cli = [str(tfds_script)]
    if not tfds_script.is_file():
        tfds_cli = [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main"]
    result = subprocess.run(
        [*tfds_cli, "build", "data/synthetic_pairs", "--config", "tiny", "--data_dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "synthetic_pairs" / "tiny" / "1.0.0"
    assert (out / "synthetic_pairs-test.array_record-00000-of-00001").is_file()
    source = input_pipeline.data_source("synthetic_pairs", "train", tmp_path, "tiny")
    by_name = {e["source_name"]: e for e in examples["train"]}
    for i in range(len(source)):
        e = source[i]
        np.testing.assert_array_equal(e["source_image"], by_name[e["source_name"]]["source_image"])
        np.testing.assert_array_equal(e["target_keypoints"], by_name[e["source_name"]]["target_keypoints"])
