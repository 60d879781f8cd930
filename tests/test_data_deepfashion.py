"""data/deepfashion_pairs: real TFDS builds on dummy_data/ (the real CSV formats and names) and clear input errors."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pmf_jax import input_pipeline
from pmf_jax.errors import PMFInputError

DUMMY = Path(__file__).resolve().parents[1] / "data" / "deepfashion_pairs" / "dummy_data"


@pytest.fixture(scope="module")
def module():
    return sys.modules[input_pipeline.builder_class("deepfashion_pairs").__module__]


def _csv_keypoints(split):
    """name -> [18, 3] straight from the annotation CSV (x, y, visible), parsed independently of the builder."""
    out = {}
    for line in (DUMMY / f"fasion-resize-annotation-{split}.csv").read_text().splitlines()[1:]:
        name, ys, xs = line.split(":")
        ys, xs = json.loads(ys), json.loads(xs)
        out[name] = np.array([(x, y, 1.0) if x >= 0 else (0, 0, 0) for x, y in zip(xs, ys)], np.float32)
    return out


def _csv_pairs(split):
    lines = (DUMMY / f"fasion-resize-pairs-{split}.csv").read_text().splitlines()
    assert lines[0] == "from,to"
    return [tuple(line.split(",")) for line in lines[1:]]


def _read_all(data_dir, config):
    out = {}
    for split in ("train", "test"):
        source = input_pipeline.data_source("deepfashion_pairs", split, data_dir, config)
        out[split] = [source[i] for i in range(len(source))]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.build("deepfashion_pairs", data_dir, config="256x176", manual_dir=DUMMY)
    return data_dir, _read_all(data_dir, "256x176")


def test_flattened_names(module):
    flat_name = module.ann.flat_name
    assert flat_name("MEN/Denim/id_00000080/01_1_front.jpg") == "fashionMENDenimid0000008001_1front.jpg"
    name = flat_name("WOMEN/Tees_Tanks/id_00006370/03_7_additional.jpg")
    assert name == "fashionWOMENTees_Tanksid0000637003_7additional.jpg"
    assert module.ann.person_id("fashionMENDenimid0000008001_1front.jpg") == "id_00000080"


def test_splits_follow_the_pair_files(built):
    data_dir, examples = built
    for split in ("train", "test"):
        got = sorted((e["source_name"].decode(), e["target_name"].decode()) for e in examples[split])
        assert got == sorted(_csv_pairs(split))
    assert len(examples["train"]) == 3 and len(examples["test"]) == 2
    assert {e["person_id"].decode() for e in examples["test"]} == {"id_00006370"}
    builder = input_pipeline.builder("deepfashion_pairs", data_dir, "256x176")
    assert any(p.name.endswith("array_record-00000-of-00001") for p in Path(builder.data_dir).iterdir())


def test_keypoints_and_images(built):
    _, examples = built
    for split in ("train", "test"):
        expected = _csv_keypoints(split)
        for e in examples[split]:
            for part in ("source", "target"):
                name = e[f"{part}_name"].decode()
                np.testing.assert_allclose(e[f"{part}_keypoints"], expected[name])  # 256x176: unchanged
                image = e[f"{part}_image"]
                assert image.shape == (256, 176, 3) and image.dtype == np.uint8
                # make_dummy_data: a flat colour per image, a darker block in the middle of the 64x64 square whose
                # central 44 columns (176/256) are kept and stretched to 176.
                index = list(expected).index(name)
                colour = np.array(_dummy_colour(split, index), float)
                np.testing.assert_allclose(image[5:20, 5:20].mean((0, 1)), colour, atol=6)
                np.testing.assert_allclose(image[120:170, 70:100].mean((0, 1)), colour // 2, atol=8)


def _dummy_script():
    spec = importlib.util.spec_from_file_location("deepfashion_make_dummy_data", DUMMY.parent / "make_dummy_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _dummy_colour(split, index_in_split):
    dummy = _dummy_script()
    names = sorted({n for pair in dummy.PAIRS[split] for n in pair}, key=dummy.NAMES.index)
    return dummy.colour(dummy.NAMES.index(names[index_in_split]))


def test_512_config_rescales_keypoints(tmp_path):
    input_pipeline.build("deepfashion_pairs", tmp_path, config="512x352", manual_dir=DUMMY)
    examples = _read_all(tmp_path, "512x352")
    expected = _csv_keypoints("test")
    for e in examples["test"]:
        kps = e["target_keypoints"]
        want = expected[e["target_name"].decode()].copy()
        visible = want[:, 2] > 0
        want[visible, :2] = (want[visible, :2] + 0.5) * 2 - 0.5
        np.testing.assert_allclose(kps, want)
        assert e["target_image"].shape == (512, 352, 3)


@pytest.fixture
def broken(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(DUMMY, manual)
    return manual


def _build_error(manual, tmp_path):
    with pytest.raises(PMFInputError) as info:
        input_pipeline.build("deepfashion_pairs", tmp_path / "out", config="256x176", manual_dir=manual)
    return str(info.value)


def test_malformed_annotation_line_names_file_and_line(broken, tmp_path):
    path = broken / "fasion-resize-annotation-train.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(": [", "; [", 1)  # one colon field separator lost on line 3
    path.write_text("\n".join(lines) + "\n")
    message = _build_error(broken, tmp_path)
    assert "fasion-resize-annotation-train.csv:3:" in message and "colon-separated" in message


def test_short_keypoint_list_names_file_and_line(broken, tmp_path):
    path = broken / "fasion-resize-annotation-test.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("[", "[1, ", 1)  # 19 rows
    path.write_text("\n".join(lines) + "\n")
    message = _build_error(broken, tmp_path)
    assert "fasion-resize-annotation-test.csv:2: keypoints_y must be a list of 18 integers" in message


def test_malformed_pairs_line_names_file_and_line(broken, tmp_path):
    path = broken / "fasion-resize-pairs-train.csv"
    path.write_text(path.read_text() + "fashionMENDenimid0000008001_1front.jpg\n")
    assert "fasion-resize-pairs-train.csv:5:" in _build_error(broken, tmp_path)


def test_missing_image_names_file_line_and_image(broken, tmp_path):
    (broken / "img/MEN/Denim/id_00000080/01_2_side.jpg").unlink()
    message = _build_error(broken, tmp_path)
    assert "fasion-resize-pairs-train.csv:2:" in message
    assert "fashionMENDenimid0000008001_2side.jpg not found" in message


def test_dummy_data_is_what_make_dummy_data_writes(tmp_path):
    _dummy_script().main(tmp_path)
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(DUMMY) for p in DUMMY.rglob("*") if p.is_file())
    for csv in tmp_path.glob("*.csv"):
        assert csv.read_text() == (DUMMY / csv.name).read_text()
