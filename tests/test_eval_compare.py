"""Every pipeline mode in one evaluation: `pmf eval generate` modes as config overrides (for a config's folders, a
run and an export), and `pmf eval compare` of three scored runs (table numbers = each run's scores.json; the grid's
columns = the runs' own PNGs and the dataset's images)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from convert_fixtures import tiny_export, tiny_run  # noqa: F401  (pytest fixtures)
from ip_adapter_fixtures import tiny_ip  # noqa: F401  (pytest fixture)
from PIL import Image
from tiny_sd import tiny_sd  # noqa: F401  (pytest fixture)

from pmf_jax import input_pipeline
from pmf_jax.config import load_config
from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation import generate, read_pairs, score, write_report
from pmf_jax.evaluation.compare import compare
from pmf_jax.evaluation.model import build_pipeline, eval_config, export_reference, resolve_model
from pmf_jax.evaluation.pairs import image_source
from pmf_jax.input_pipeline import prepare_pair

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "data" / "deepfashion_pairs" / "dummy_data"
DATASET, CONFIG = "deepfashion_pairs", "256x176"
MODES = ("acm", "reference_only", "controlnet_only", "ip_adapter")  # ip_adapter: Method 2 with a tiny random adapter
SIZE = (64, 48)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.build(DATASET, data_dir, config=CONFIG, manual_dir=DUMMY)
    return data_dir


@pytest.fixture(scope="module")
def scored_runs(tiny_sd, tiny_ip, data_dir, tmp_path_factory):  # noqa: F811
    """One scored generation per mode, each mode a config override of the same config."""
    root = tmp_path_factory.mktemp("compare")
    base = [f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}",
            f"model.reference_unet={tiny_sd.reference_unet}", "model.dtype=float32", f"data.name={DATASET}",
            f"data.builder_config={CONFIG}", f"data.data_dir={data_dir}", f"data.resolution=[{SIZE[0]},{SIZE[1]}]",
            "sampling.steps=2", "sampling.scheduler=ddim", "sampling.reference_guidance_scale=null"]
    folders = []
    for mode in MODES:
        extra = [f"model.ip_adapter={tiny_ip.adapter}", "model.reference_unet=null"] if mode == "ip_adapter" else []
        cfg = load_config(None, base + extra + [f"reference.mode={mode}"])
        generate(cfg, root / mode, split="test", progress=False)
        write_report(score(root / mode, DATASET, CONFIG, data_dir, split="test", metrics=["ssim", "psnr"],
                           resize=True, progress=False), root / mode / "scores")
        folders.append(root / mode)
    return folders


def test_modes_differ_and_are_recorded(scored_runs):
    settings = [json.loads((f / "generation.json").read_text())["reference"]["mode"] for f in scored_runs]
    assert settings == list(MODES)
    images = [np.asarray(Image.open(sorted(f.glob("*.png"))[0]), np.float32) for f in scored_runs]
    for i in range(len(MODES)):
        for j in range(i + 1, len(MODES)):
            assert np.abs(images[i] - images[j]).mean() > 1.0, (MODES[i], MODES[j])


def test_compare_cli_writes_the_table_and_grid_of_each_run_s_scores(scored_runs, data_dir, tmp_path):
    out = tmp_path / "report" / "compare"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "pmf_jax.cli", "eval", "compare", *scored_runs, "--out", out,
                          "--data-dir", data_dir, "--pairs", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in table["runs"]] == list(MODES) and [r["mode"] for r in table["runs"]] == list(MODES)
    md = out.with_suffix(".md").read_text()
    for folder, row in zip(scored_runs, table["runs"]):
        scores = json.loads((folder / "scores.json").read_text())["metrics"]
        for key in ("ssim", "psnr"):
            assert row["metrics"][key] == scores[key]["value"]
        assert f"| {folder.name} | {folder.name} | 2 | {scores['ssim']['value']:.4f} | {scores['psnr']['value']:.2f} |" in md
    assert "PIDM (literature) | published" in md and "Literature rows" in md and "](compare.png)" in md

    grid = np.asarray(Image.open(out.with_suffix(".png")))
    h, w = SIZE
    assert grid.shape == (2 * h, (len(MODES) + 3) * w, 3)
    pairs = read_pairs(DATASET, CONFIG, "test", data_dir)
    source = image_source(DATASET, CONFIG, "test", data_dir)
    for row, pair in enumerate(pairs[:2]):
        cells = [grid[row * h:(row + 1) * h, c * w:(c + 1) * w] for c in range(len(MODES) + 3)]
        example = prepare_pair(source[pair.index], SIZE, None)
        np.testing.assert_array_equal(cells[0], np.round((example["source"] + 1) * 127.5).astype(np.uint8))
        np.testing.assert_array_equal(cells[-1], np.round((example["target"] + 1) * 127.5).astype(np.uint8))
        for k, folder in enumerate(scored_runs):
            np.testing.assert_array_equal(cells[2 + k], np.asarray(Image.open(folder / pair.filename).convert("RGB")))


def test_compare_errors(scored_runs, tmp_path):
    with pytest.raises(PMFInputError, match="has no scores.json: score it first"):
        compare([scored_runs[0], tmp_path])
    with pytest.raises(PMFInputError, match="--labels has 1 names for 2 folders"):
        compare(scored_runs[:2], ["a"])
    other = tmp_path / "other"
    other.mkdir()
    scores = json.loads((scored_runs[1] / "scores.json").read_text())
    (other / "scores.json").write_text(json.dumps(dict(scores, split="train")))
    with pytest.raises(PMFInputError, match="different splits"):
        compare([scored_runs[0], other])


def test_a_mode_override_applies_to_a_run_and_an_export(tiny_run, tiny_export):  # noqa: F811
    """reference.mode=... evaluates a trained run's or an export's weights as that baseline; an export keeps its
    own other reference settings."""
    for path in (tiny_run[0], tiny_export):
        for mode in ("reference_only", "controlnet_only"):
            overrides = [f"reference.mode={mode}"]
            model = resolve_model(path).with_overrides(overrides)
            pipe = build_pipeline(eval_config(model, None, overrides), model)
            assert pipe.mode == mode and "reference" not in pipe.params
    export = resolve_model(tiny_export)
    assert export_reference(export, load_config(None))[0] == "acm"               # its own mode, untouched
    assert export.with_overrides(["sampling.steps=3"]).reference_keys == ()
