"""pmf_jax.input_pipeline over a real synthetic_pairs build: values, determinism, host sharding, resumption, flips."""

import sys

import jax
import numpy as np
import pytest

from pmf_jax import input_pipeline
from pmf_jax.errors import PMFInputError
from pmf_jax.pose import COLORS, line_widths_for, render_pose

NUM_TRAIN = 8 * 2  # identities x pairs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    module = sys.modules[input_pipeline.builder_class("synthetic_pairs").__module__]
    config = module.SyntheticConfig(
        name="pipeline", size=64, train_identities=8, test_identities=2, pairs_per_identity=2
    )
    input_pipeline.build("synthetic_pairs", data_dir, config=config)
    return data_dir


def loader(data_dir, **kwargs):
    args = dict(batch_size=4, resolution=64, config="pipeline", seed=0, shard_index=0, shard_count=1)
    args.update(kwargs)
    return input_pipeline.make_loader("synthetic_pairs", "train", data_dir, **args)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_keys_shapes_dtypes_and_ranges(data_dir):
    batch = next(iter(loader(data_dir, resolution=(48, 32), keep_names=True)))
    for key in ("source", "target", "pose"):
        assert batch[key].shape == (4, 48, 32, 3) and batch[key].dtype == np.float32, key
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1 and batch["source"].min() < -0.5
    assert batch["pose"].min() == 0 and batch["pose"].max() == 1
    assert batch["target_keypoints"].shape == (4, 18, 3) and batch["target_keypoints"].dtype == np.float32
    kps = batch["target_keypoints"]
    visible = kps[..., 2] > 0
    assert np.all(kps[..., 0][visible] < 32) and np.all(kps[..., 1][visible] < 48) and visible.sum() > 40
    assert batch["source_name"].shape == (4,) and str(batch["source_name"][0]).endswith("_source.png")
    # Ready for a sharded global array.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    array = jax.make_array_from_process_local_data(sharding, batch["source"])
    assert array.shape == (4, 48, 32, 3)


def test_pose_image_is_the_target_skeleton(data_dir):
    batch = next(iter(loader(data_dir, augment=True, seed=5)))
    for pose, kps in zip(batch["pose"], batch["target_keypoints"]):
        expected = render_pose(kps, 64, 64, *line_widths_for(64, 64))
        np.testing.assert_array_equal(np.round(pose * 255).astype(np.uint8), expected)
        for j, (x, y, c) in enumerate(kps):
            later = [k for k in range(j + 1, 18) if kps[k, 2] > 0 and np.abs(kps[k, :2] - (x, y)).max() <= 3]
            if c > 0 and not later:
                np.testing.assert_array_equal(np.round(pose[int(y), int(x)] * 255), COLORS[j])


def test_deterministic_for_a_seed(data_dir):
    a = _take(iter(loader(data_dir, seed=3)), 5)
    b = _take(iter(loader(data_dir, seed=3)), 5)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    c = next(iter(loader(data_dir, seed=4)))
    assert not np.array_equal(a[0]["source"], c["source"])


def test_two_hosts_see_disjoint_examples_covering_the_epoch(data_dir):
    seen = []
    for host in (0, 1):
        batches = list(loader(data_dir, batch_size=2, num_epochs=1, keep_names=True, shard_index=host, shard_count=2))
        assert len(batches) == input_pipeline.steps_per_epoch(NUM_TRAIN, 2, shard_count=2) == 4
        seen.append({str(n) for b in batches for n in b["source_name"]})
    assert len(seen[0]) == len(seen[1]) == NUM_TRAIN // 2
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == NUM_TRAIN


def test_two_hosts_slices_stitch_into_the_one_host_global_batches(data_dir):
    """Host k reads the k-th consecutive slice of each global batch (pmf_jax.batch_sampler): process 0's rows then
    process 1's are the one-host batch row for row (names and augmented pixels), so a 2-process run reproduces the
    1-process loss."""
    one = list(loader(data_dir, batch_size=4, num_epochs=1, keep_names=True, shard_index=0, shard_count=1))
    hosts = [list(loader(data_dir, batch_size=2, num_epochs=1, keep_names=True, shard_index=k, shard_count=2))
             for k in (0, 1)]
    assert len(one) == len(hosts[0]) == len(hosts[1]) == NUM_TRAIN // 4
    for whole, first, second in zip(one, *hosts):
        assert [str(n) for n in whole["source_name"]] == [str(n) for n in (*first["source_name"],
                                                                          *second["source_name"])]
        np.testing.assert_array_equal(whole["source"], np.concatenate([first["source"], second["source"]]))


def test_epochs_reshuffle_and_cover(data_dir):
    batches = list(loader(data_dir, batch_size=4, num_epochs=2, keep_names=True, augment=False))
    epochs = [[str(n) for b in batches[i : i + 4] for n in b["source_name"]] for i in (0, 4)]
    assert len(batches) == 8 and sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == NUM_TRAIN
    assert epochs[0] != epochs[1]


def test_iterator_state_resumes_with_the_identical_next_batch(data_dir):
    iterator = iter(loader(data_dir, seed=1))
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 3)  # crosses into the second epoch (4 batches an epoch)
    resumed = iter(loader(data_dir, seed=1))
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 3)):
        _assert_batches_equal(want, got)


def test_worker_processes_give_the_same_batches(data_dir):
    a = list(loader(data_dir, num_epochs=1, seed=2))
    b = list(loader(data_dir, num_epochs=1, seed=2, worker_count=1))
    assert len(a) == len(b) == NUM_TRAIN // 4
    for x, y in zip(a, b):
        _assert_batches_equal(x, {k: np.array(v) for k, v in y.items()})
    del a, b


def _example(h=40, w=30):
    """A stored-format example: black images with one bright pixel at the right shoulder / left wrist."""
    kps = np.zeros((18, 3), np.float32)
    kps[2] = (6, 10, 1.0)  # right shoulder
    kps[5] = (20, 11, 1.0)  # left shoulder
    kps[7] = (25, 30, 0.7)  # left wrist
    image = np.zeros((h, w, 3), np.uint8)
    image[10, 6] = (255, 0, 0)
    image[30, 25] = (0, 255, 0)
    names = {k: b"x" for k in ("person_id", "source_name", "target_name")}
    images = {"source_image": image, "target_image": image.copy()}
    return {**images, "source_keypoints": kps, "target_keypoints": kps, **names}


def test_flip_swaps_left_and_right_keypoints():
    example = _example()
    plain = input_pipeline.prepare_pair(example, (40, 30), rng=None)
    flipped = input_pipeline.prepare_pair(example, (40, 30), np.random.default_rng(0), crop_scale=(1, 1), flip_prob=1)
    np.testing.assert_array_equal(flipped["source"], plain["source"][:, ::-1])
    kps = flipped["target_keypoints"]
    np.testing.assert_allclose(kps[2], (29 - 20, 11, 1.0))  # was the left shoulder, mirrored
    np.testing.assert_allclose(kps[5], (29 - 6, 10, 1.0))
    np.testing.assert_allclose(kps[4], (29 - 25, 30, 0.7))  # left wrist -> right wrist
    assert not kps[7].any()
    # The bright pixels moved with their joints.
    assert flipped["source"][30, 4, 1] == 1.0 and flipped["source"][10, 23, 0] == 1.0
    np.testing.assert_array_equal(np.round(flipped["pose"] * 255), render_pose(kps, 40, 30, *line_widths_for(40, 30)))


def test_random_crop_moves_keypoints_with_the_image():
    example = _example(h=80, w=60)
    example["source_keypoints"] = example["target_keypoints"] = example["source_keypoints"] * [2, 2, 1]
    example["source_image"] = np.zeros((80, 60, 3), np.uint8)
    example["source_image"][19:23, 11:15] = 255  # a 4x4 bright block around the right shoulder (12.5, 20.5)
    example["source_keypoints"][2] = (12.5, 20.5, 1.0)
    for seed in range(4):
        out = input_pipeline.prepare_pair(example, (40, 32), np.random.default_rng(seed), flip_prob=0)
        x, y, c = out["source_keypoints"][2]
        weights = (out["source"][..., 0] + 1) / 2
        ys, xs = np.mgrid[0:40, 0:32]
        centre = ((weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum())
        assert c == 1.0 and abs(centre[0] - x) < 0.3 and abs(centre[1] - y) < 0.3, (seed, centre, (x, y))


def test_bad_arguments_are_input_errors(data_dir, tmp_path):
    with pytest.raises(PMFInputError, match="resolution"):
        loader(data_dir, resolution=60)
    with pytest.raises(PMFInputError, match="unknown"):
        input_pipeline.make_loader("nope", "train", data_dir, 2, 64)
    with pytest.raises(PMFInputError, match="no split 'validation'"):
        input_pipeline.make_loader("synthetic_pairs", "validation", data_dir, 2, 64, config="pipeline")
    with pytest.raises(PMFInputError, match="not built"):
        input_pipeline.make_loader("synthetic_pairs", "train", tmp_path, 2, 64, config="tiny")
    with pytest.raises(PMFInputError, match="no config 'huge'; configs: 64, 128, 256, tiny"):
        input_pipeline.build("synthetic_pairs", tmp_path, config="huge")


def test_the_builders_and_grain_workers_need_the_runtime_setup(data_dir, monkeypatch):
    """The library puts nothing on sys.path and parses no flags: entry points call pmf_jax.runtime.setup."""
    from absl import flags

    from pmf_jax import runtime

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(runtime.BUILDERS_DIR)])
    for name in [m for m in sys.modules if m.split(".")[0] in ("synthetic_pairs", "pairs_common")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(PMFInputError, match="runtime.setup"):
        input_pipeline.builder_class("synthetic_pairs")
    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(PMFInputError, match="runtime.setup"):
            loader(data_dir, worker_count=1)
    finally:
        runtime.mark_absl_flags_parsed()
