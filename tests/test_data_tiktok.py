"""data/tiktok_pairs: a real TFDS build on dummy_data/ (video folders with OpenPose JSON), split by video id."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pmf_jax import input_pipeline
from pmf_jax.errors import PMFInputError
from pmf_jax.pose import read_openpose_json
from pmf_jax.pose.keypoints import select_person

DUMMY = Path(__file__).resolve().parents[1] / "data" / "tiktok_pairs" / "dummy_data"


@pytest.fixture(scope="module")
def module():
    return sys.modules[input_pipeline.builder_class("tiktok_pairs").__module__]


@pytest.fixture(scope="module")
def built(tmp_path_factory, module):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = module.TikTokConfig(name="dummy64", size=64, pairs_per_video=3)
    input_pipeline.build("tiktok_pairs", data_dir, config=config, manual_dir=DUMMY)
    builder = input_pipeline.builder("tiktok_pairs", data_dir, config=config)
    return {s: [x for x in builder.as_data_source(s)] for s in ("train", "test")}


def _frame_json(name):
    video, frame = name.split("/")
    stem = frame.removesuffix(".png")
    folder = DUMMY / video / "openpose_json"
    return next(p for p in (folder / f"{stem}.json", folder / f"{stem}_keypoints.json") if p.is_file())


def test_split_by_video_and_sizes(built):
    assert {e["person_id"].decode() for e in built["train"]} == {"00001", "00002"}
    assert {e["person_id"].decode() for e in built["test"]} == {"00335"}
    assert len(built["train"]) == 2 * 3 and len(built["test"]) == 3


def test_pairs_are_two_frames_of_one_video_with_a_person(built):
    for e in built["train"] + built["test"]:
        source, target = e["source_name"].decode(), e["target_name"].decode()
        assert source.split("/")[0] == target.split("/")[0] == e["person_id"].decode()
        assert source != target
        assert "00335/0003.png" not in (source, target)  # the frame with nobody in it is never used


def test_keypoints_follow_the_fit_and_pad(built):
    # 40x24 frames fitted into 64x64: scale 1.6 (24 -> 38 columns), 13 black columns left and right.
    for e in built["train"] + built["test"]:
        for part in ("source", "target"):
            name = e[f"{part}_name"].decode()
            want = select_person(read_openpose_json(_frame_json(name)))
            visible = want[:, 2] > 0
            want[visible, 0] = (want[visible, 0] + 0.5) * 38 / 24 - 0.5 + 13
            want[visible, 1] = (want[visible, 1] + 0.5) * 1.6 - 0.5
            np.testing.assert_allclose(e[f"{part}_keypoints"], want, atol=1e-4)
            image = e[f"{part}_image"]
            assert image.shape == (64, 64, 3)
            assert image[:, :11].max() <= 8 and image[:, 53:].max() <= 8  # the padding (JPEG noise aside)
            assert image[2:6, 16:48].mean() > 30  # the frame


def test_two_people_frame_uses_the_confident_one(built):
    frames = [e for e in built["train"] for part in ("source", "target") if e[f"{part}_name"] == b"00002/0001.png"]
    assert frames  # the seeded pairs of video 00002 use its frame 0001
    people = read_openpose_json(DUMMY / "00002" / "openpose_json" / "0001.json")
    assert len(people) == 2 and people[1, 0, 2] > people[0, 0, 2]
    for e in frames:
        part = "source" if e["source_name"] == b"00002/0001.png" else "target"
        np.testing.assert_allclose(e[f"{part}_keypoints"][:, 2], people[1, :, 2])


def test_frame_without_json_or_weights_is_a_clear_error(tmp_path, module, monkeypatch):
    monkeypatch.delenv("PMF_OPENPOSE_WEIGHTS", raising=False)
    manual = tmp_path / "manual"
    shutil.copytree(DUMMY, manual)
    (manual / "00001" / "openpose_json" / "0002_keypoints.json").unlink()
    config = module.TikTokConfig(name="dummy64", size=64, pairs_per_video=3)
    with pytest.raises(PMFInputError, match=r"00001/images/0002.png: no OpenPose JSON beside it"):
        input_pipeline.build("tiktok_pairs", tmp_path / "out", config=config, manual_dir=manual)


def test_frames_without_json_go_through_the_openpose_body_model(tmp_path, module):
    """With weights, a frame without JSON is detected by controlnet_aux's body model. Random weights find nobody,
    so that frame is never paired while the frames with JSON still are."""
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    torch.manual_seed(0)
    # controlnet_aux's Body loads the checkpoint's names without the first component ("model0.").
    state = {k.split(".", 1)[1]: v for k, v in bodypose_model().state_dict().items()}
    torch.save(state, tmp_path / "body_pose_model.pth")
    manual = tmp_path / "manual"
    shutil.copytree(DUMMY, manual)
    (manual / "00001" / "openpose_json" / "0002_keypoints.json").unlink()
    config = module.TikTokConfig(name="dummy64", size=64, pairs_per_video=4)
    input_pipeline.build(
        "tiktok_pairs", tmp_path / "out", config=config, manual_dir=manual,
        openpose_weights=str(tmp_path / "body_pose_model.pth"),
    )  # fmt: skip
    builder = input_pipeline.builder("tiktok_pairs", tmp_path / "out", config=config)
    names = {e[k].decode() for e in builder.as_data_source("train") for k in ("source_name", "target_name")}
    assert {n for n in names if n.startswith("00001/")} == {"00001/0001.png", "00001/0003.png"}


def test_dummy_data_is_what_make_dummy_data_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("tiktok_make_dummy_data", DUMMY.parent / "make_dummy_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(DUMMY) for p in DUMMY.rglob("*") if p.is_file())
    for path in tmp_path.rglob("*.json"):
        assert path.read_text() == (DUMMY / path.relative_to(tmp_path)).read_text()
