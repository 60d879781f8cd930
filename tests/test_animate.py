"""Pose sequences: SequencePipeline frames are byte-identical to one-image RetargetPipeline calls at any batch size
(shared noise), independent noise changes them; DRIVING is read from every kind (natural order, --frames, skeleton
frames, a lossless video, the detector's cache) with errors that name the file and frame; smoothing and alignment
over time; the video writer's files read back."""

import json

import numpy as np
import pytest
from PIL import Image

from pose_fixtures import fake_detector
from test_identity_vae import SCHEDULE, SIZE, build_pixel_models, pixel_inputs

from pmf_jax.errors import PMFInputError
from pmf_jax.pose import render_pose
from pmf_jax.pose.sequence import FrameRange, read_driving, to_canvas, write_sequence_json
from pmf_jax.pose.temporal import align_sequence, smooth_keypoints

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def pixel_pipe(tmp_path_factory):
    from pmf_jax.pipelines import RetargetPipeline

    models = build_pixel_models(tmp_path_factory.mktemp("pixel_models"))
    return RetargetPipeline(*models[:2], reference_unet=models[2], mode="acm", scheduler_config=SCHEDULE)


def test_sequence_frames_equal_single_retarget_calls_at_any_batch_size(pixel_pipe):
    from pmf_jax.pipelines.sequence import SequencePipeline
    from pmf_jax.reference import ReferenceConfig

    pipe = pixel_pipe
    seq = SequencePipeline(pipe)
    sources, poses, _ = pixel_inputs(4, seed=5)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, scheduler="ddim", height=SIZE, width=SIZE,
              pose_kind="skeleton", reference_config=ReferenceConfig(style_fidelity=0.5))
    single = np.stack([np.asarray(pipe(sources[0], p, seed=9, **kw)[0]) for p in poses])
    got = seq(sources[0], list(poses), seed=9, batch_frames=3, output_type="np", **kw)  # chunks of 3 and 1 (padded)
    np.testing.assert_array_equal(got, single)
    independent = seq(sources[0], list(poses), seed=9, batch_frames=3, independent_noise=True, output_type="np",
                      **kw)
    np.testing.assert_array_equal(independent[0], single[0])   # frame 0 draws image 0 either way
    assert np.abs(independent[1:].astype(float) - single[1:]).mean() > 1.0
    with pytest.raises(PMFInputError, match="empty"):
        seq(sources[0], [], **kw)


def _skeleton_frames(n, size=64):
    from data.synthetic_pairs.motion import dance

    kps = dance(n, size, seed=1)
    return kps, [render_pose(k, size, size, 2, 3) for k in kps]


def test_read_driving_every_kind(tmp_path):
    kps, frames = _skeleton_frames(12)
    # A folder of OpenPose JSON files, sorted naturally; --frames picks 2, 5, 8, 11 of them.
    folder = tmp_path / "json"
    folder.mkdir()
    for i in range(12):
        (folder / f"pose_{i}.json").write_text(json.dumps(
            {"canvas_height": 64, "canvas_width": 64,
             "people": [{"pose_keypoints_2d": kps[i].reshape(-1).tolist()}]}))
    got = read_driving(folder, FrameRange.parse("2::3"))
    assert got.kind == "json_folder" and got.indices == (2, 5, 8, 11) and got.frame_size == (64, 64)
    np.testing.assert_allclose(got.keypoints, kps[[2, 5, 8, 11]], atol=1e-3)
    # One sequence JSON file.
    write_sequence_json(tmp_path / "seq.json", kps, 64, 64, fps=10)
    got = read_driving(tmp_path / "seq.json", FrameRange.parse(":-9"))
    assert got.kind == "json_sequence" and got.indices == (0, 1, 2) and got.fps == 10
    assert np.asarray(list(got.driving_frames())).shape == (3, 64, 64, 3)
    # A folder of skeleton frames (read by their colours) and the same frames as a lossless video.
    images = tmp_path / "frames"
    images.mkdir()
    for i, f in enumerate(frames[:4]):
        Image.fromarray(f).save(images / f"f{i}.png")
    from_images = read_driving(images)
    assert from_images.kind == "frames" and len(from_images) == 4
    found = from_images.keypoints[..., 2] > 0   # the head's discs may merge at this size
    assert found[:, 1:14].all() and np.median(np.abs(from_images.keypoints[..., :2] - kps[:4, :, :2])[found]) < 1.0
    from pmf_jax.video import VideoWriter, read_video_frames

    video = tmp_path / "clip.mkv"
    with VideoWriter(video, 12, codec="ffv1", pix_fmt="bgr0", crf=None) as writer:
        for f in frames[:4]:
            writer.write(f)
    assert [np.array_equal(a, b) for a, b in zip(read_video_frames(video), frames)] == [True] * 4
    from_video = read_driving(video, FrameRange.parse("1:"))
    assert from_video.kind == "video" and from_video.indices == (1, 2, 3) and from_video.fps == 12
    np.testing.assert_array_equal(from_video.keypoints, from_images.keypoints[1:])
    assert len(list(from_video.driving_frames())) == 3
    # Keypoints of a 64x64 frame on a 32x32 canvas: halved.
    canvas = to_canvas(from_images, (32, 32))
    np.testing.assert_allclose(canvas[found][:, :2], (from_images.keypoints[found][:, :2] + 0.5) / 2 - 0.5, atol=1e-4)


def test_photo_frames_are_detected_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PMF_POSE_CACHE_DIR", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)).save(photos / f"{i}.png")
    detector = fake_detector()
    first = read_driving(photos, detector=detector)
    assert len(detector.body_estimation.shapes) == 3 and first.keypoints.shape == (3, 18, 3)
    again = read_driving(photos, detector=detector)      # the same pixels: nothing detected again
    assert len(detector.body_estimation.shapes) == 3
    np.testing.assert_array_equal(again.keypoints, first.keypoints)
    with pytest.raises(PMFInputError, match=r"frame 1 .*1\.png.*no person"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)).save(photos / "1.png")
        read_driving(photos, detector=fake_detector(people=0))


def test_driving_errors_name_the_file_and_frame(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PMFInputError, match="holds no frames"):
        read_driving(empty)
    _, frames = _skeleton_frames(3)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(frames[0]).save(mixed / "a0.png")
    Image.fromarray(frames[1][:, :48]).save(mixed / "a1.png")
    with pytest.raises(PMFInputError, match=r"frame 1 .*a1\.png.* is 48x64 .*one size"):
        read_driving(mixed)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(PMFInputError, match=r"broken\.mp4.*cannot read the video"):
        read_driving(broken)
    seq = tmp_path / "seq.json"
    seq.write_text(json.dumps({"frames": [{"people": [{"pose_keypoints_2d": [1.0] * 54}]}, {"people": []}]}))
    with pytest.raises(PMFInputError, match=r"seq\.json.* frame 1: no person"):
        read_driving(seq)
    with pytest.raises(PMFInputError, match="keeps none"):
        read_driving(tmp_path / "mixed", FrameRange.parse("5:"))


def test_smoothing_and_alignment_over_time():
    kps, _ = _skeleton_frames(16)
    noisy = kps.copy()
    noisy[..., :2] += np.random.default_rng(0).normal(0, 1.5, noisy[..., :2].shape)
    noisy[3, 4] = 0   # a missing wrist stays missing
    smooth = smooth_keypoints(noisy, 1.5)
    assert smooth[3, 4, 2] == 0 and (smooth[..., 2] > 0).sum() == (noisy[..., 2] > 0).sum()
    assert np.abs(np.diff(smooth[..., :2], axis=0)).mean() < 0.6 * np.abs(np.diff(noisy[..., :2], axis=0)).mean()
    np.testing.assert_array_equal(smooth_keypoints(noisy, 0), noisy)
    # Alignment: the first frame gets the source's bone lengths; later frames keep their own length changes.
    source = kps[0].copy()
    source[:, :2] = (source[:, :2] - source[1, :2]) * 1.3 + source[1, :2]   # a taller person, same angles
    aligned = align_sequence(kps, source)
    bone = lambda k, p, j: np.linalg.norm(k[..., j, :2] - k[..., p, :2], axis=-1)  # noqa: E731
    np.testing.assert_allclose(bone(aligned[0], 8, 9), bone(source, 8, 9), rtol=1e-4)
    np.testing.assert_allclose(bone(aligned, 8, 9), 1.3 * bone(kps, 8, 9), rtol=1e-3)
    np.testing.assert_allclose(aligned[:, 1, :2], kps[:, 1, :2], atol=1e-4)   # the root (neck) stays


def test_temporal_consistency_groups_clips_and_compares_with_the_truth():
    from pmf_jax.evaluation.pairs import Pair
    from pmf_jax.evaluation.temporal import sequences, temporal_consistency

    pairs = [Pair(i, "v1/0001.png", f"v2/{n}.png") for i, n in enumerate((10, 2, 1))]
    pairs.append(Pair(3, "v1/0001.png", "v3/5.png"))   # a clip of one frame: no consecutive pair
    clips = sequences(pairs)
    assert [[p.target_name for p in c] for c in clips] == [["v2/1.png", "v2/2.png", "v2/10.png"]]
    frames = {p.index: np.full((4, 4, 3), 10 * p.index, np.uint8) for p in pairs}   # target n at 10·index
    got = temporal_consistency(clips, lambda p: frames[p.index], lambda p: frames[p.index] // 2)
    assert got["value"] == 10.0 and got["ground_truth"] == 5.0 and got["ratio"] == 2.0 and got["n"] == 2
    assert temporal_consistency([], None, None)["available"] is False


def test_eval_generate_sequence_animates_each_test_video_then_scores_it(pixel_pipe, tmp_path):
    """`pmf eval generate --sequence` on the TikTok dummy videos: the video's first source person along its frames'
    poses, one frame per pair file; `eval score` adds the temporal figure."""
    import dataclasses
    import sys
    from pathlib import Path

    from pmf_jax import input_pipeline
    from pmf_jax.config import load_config
    from pmf_jax.evaluation import score
    from pmf_jax.evaluation.generate import generate

    module = sys.modules[input_pipeline.builder_class("tiktok_pairs").__module__]
    config = module.TikTokConfig(name="dummy16", size=SIZE, pairs_per_video=3)
    dummy = Path(__file__).resolve().parents[1] / "data" / "tiktok_pairs" / "dummy_data"
    input_pipeline.build("tiktok_pairs", tmp_path / "tfds", config=config, manual_dir=dummy)
    cfg = load_config(None, ["data.name=tiktok_pairs", f"data.data_dir={tmp_path / 'tfds'}",
                             f"data.resolution=[{SIZE},{SIZE}]", "sampling.steps=2", "sampling.scheduler=ddim"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, builder_config=config))
    out = tmp_path / "generated"
    summary = generate(cfg, out, split="test", pipeline=pixel_pipe, sequence=True, progress=False)
    # The test video's pairs: (0002 -> 0001), (0001 -> 0002) twice: one clip 0001, 0002 from source 0001.
    assert summary.total == 2 and json.loads((out / "generation.json").read_text())["sequence"] is True
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00335-0001___00335-0002.png", "00335-0002___00335-0001.png"]
    report = score(out, "tiktok_pairs", config, tmp_path / "tfds", metrics=("ssim", "psnr"), progress=False)
    temporal = report["temporal_consistency"]
    assert temporal["available"] and temporal["n"] == 1 and temporal["value"] > 0 and temporal["ground_truth"] >= 0
    from pmf_jax.evaluation.report import markdown

    assert f"Temporal consistency (clips: 1 consecutive frame pairs): mean |frame t+1 − frame t| " \
           f"{temporal['value']:.2f}" in markdown(report)
