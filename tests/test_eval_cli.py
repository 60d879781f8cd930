"""`pmf eval generate` / `pmf eval score` on the dummy DeepFashion build: a tiny random SD model generates the test
pairs and the scorer reads them back, through the CLI in subprocesses; plus resumption, the FID path with an injected
feature network, the report, and the input errors (library calls and the in-process CLI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from metric_fixtures import fake_alexnet, random_conv_features, tiny_clip
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tiny_sd import tiny_sd  # noqa: F401  (pytest fixture)

from pmf_jax import cli, input_pipeline
from pmf_jax.config import load_config
from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation import generate, markdown, pair_filename, read_pairs, score
from pmf_jax.evaluation.pairs import image_source
from pmf_jax.metrics.availability import WEIGHTS_ENV

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "data" / "deepfashion_pairs" / "dummy_data"
DATASET, CONFIG = "deepfashion_pairs", "256x176"
TEST_PAIRS = [  # dummy_data/fasion-resize-pairs-test.csv
    ("fashionWOMENTees_Tanksid0000637003_1front.jpg", "fashionWOMENTees_Tanksid0000637003_7additional.jpg"),
    ("fashionWOMENTees_Tanksid0000637003_7additional.jpg", "fashionWOMENTees_Tanksid0000637003_1front.jpg"),
]


@pytest.fixture(autouse=True)
def no_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    input_pipeline.build(DATASET, data_dir, config=CONFIG, manual_dir=DUMMY)
    return data_dir


def _ground_truth(data_dir):
    source = image_source(DATASET, CONFIG, "test", data_dir)
    return {pair_filename(*(source[i][k].decode() for k in ("source_name", "target_name"))): source[i]["target_image"]
            for i in range(len(source))}


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != WEIGHTS_ENV}
    env.update(TORCH_HOME=str(tmp_path / "torch_home"), PMF_JAX_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return env


def _pmf(args, env):
    return subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_generate_then_score_through_the_cli(tiny_sd, data_dir, tmp_path):  # noqa: F811
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base": str(tiny_sd.sd), "controlnet": str(tiny_sd.controlnet),
                  "reference_unet": str(tiny_sd.reference_unet), "dtype": "float32"},
        "data": {"name": DATASET, "builder_config": CONFIG, "data_dir": str(data_dir), "resolution": [256, 176],
                 "eval_batch_size": 2},
        "sampling": {"scheduler": "ddim", "seed": 7}}))
    out, env = tmp_path / "generated", _env(tmp_path)
    run = _pmf(["eval", "generate", "--config", config, "--out", out, "--prompt", "a red shirt", "--no-progress",
                "sampling.steps=2"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(pair_filename(*p) for p in TEST_PAIRS)
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert "2 images generated, 0 already there" in run.stdout
    settings = json.loads((out / "generation.json").read_text())
    assert settings["prompt"] == "a red shirt" and settings["sampling"]["steps"] == 2
    for name in names:
        assert Image.open(out / name).size == (176, 256)

    # LPIPS weights (random AlexNet) in --weights-dir, no Inception anywhere: FID unavailable, the rest computed.
    weights, clip = fake_alexnet(tmp_path / "weights"), tiny_clip(tmp_path / "clip")
    run = _pmf(["eval", "score", "--generated", out, "--dataset", f"{DATASET}/{CONFIG}", "--data-dir", data_dir,
                "--weights-dir", weights, "--clip-model", clip, "--no-progress"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "scores.json").read_text())
    metrics = results["metrics"]
    assert {k for k, v in metrics.items() if v["available"]} == {"ssim", "psnr", "lpips", "clip_score"}
    assert "pt_inception-2015-12-05-6726825d.pth not found" in metrics["fid"]["reason"]
    assert "FID: unavailable (weights file pt_inception" in run.stdout
    assert metrics["clip_score"]["prompt"] == "a red shirt" and np.isfinite(metrics["clip_score"]["value"])
    assert 0 < metrics["lpips"]["value"] and metrics["lpips"]["n"] == 2

    # SSIM / PSNR per pair: scikit-image on the same files and the same stored ground truth.
    truth = _ground_truth(data_dir)
    for row in results["per_pair"]:
        gen, ref = np.asarray(Image.open(out / row["file"]).convert("RGB")), truth[row["file"]]
        expected = structural_similarity(ref, gen, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         channel_axis=-1, data_range=float(gen.max()) - float(gen.min()))
        assert abs(row["ssim"] - expected) <= 1e-4
        assert abs(row["psnr"] - peak_signal_noise_ratio(ref, gen, data_range=255)) <= 1e-4
    assert metrics["ssim"]["value"] == pytest.approx(np.mean([r["ssim"] for r in results["per_pair"]]))

    report = (out / "scores.md").read_text()
    for line in ("| PIDM [1] | 0.7312 | — | 0.1678 | 6.3671 | — |", "| CFLD [2] | 0.7378 | — | 0.1519 | 6.804 | — |",
                 "| PCDMs [3] | 0.7357 | — | 0.1426 | 7.128 | — |", "Bhunia et al.", "Lu et al.", "Shen et al.",
                 f"**{metrics['ssim']['value']:.4f}**", "n/a (1)", "1. fid: weights file pt_inception",
                 "2 pairs were scored, not the protocol's 8570"):
        assert line in report, line


def test_generate_resumes_and_refuses_other_settings(tiny_sd, data_dir, tmp_path):  # noqa: F811
    overrides = [f"model.base={tiny_sd.sd}", f"model.controlnet={tiny_sd.controlnet}",
                 f"model.reference_unet={tiny_sd.reference_unet}", "model.dtype=float32",
                 "data.builder_config=256x176", f"data.data_dir={data_dir}", "data.resolution=[64,48]",
                 "sampling.steps=2", "sampling.scheduler=ddim"]
    cfg = load_config(None, [*overrides, "sampling.seed=10"])
    out = tmp_path / "gen"
    summary = generate(cfg, out, progress=False)
    assert (summary.generated, summary.skipped, summary.total) == (2, 0, 2)
    pairs = read_pairs(DATASET, CONFIG, "test", data_dir)
    read = lambda name: np.asarray(Image.open(out / name), np.int16)  # noqa: E731
    first = {p.filename: read(p.filename) for p in pairs}
    (out / pairs[1].filename).unlink()
    summary = generate(cfg, out, progress=False)
    assert (summary.generated, summary.skipped) == (1, 1)
    # The regenerated image is the one the first run made (its seed does not depend on what else is generated); a
    # batch of 1 instead of 2 may move a pixel by one level of rounding, another seed changes everything.
    again = read(pairs[1].filename)
    assert np.abs(again - first[pairs[1].filename]).max() <= 2
    assert np.abs(first[pairs[0].filename] - first[pairs[1].filename]).mean() > 5
    assert not list(out.glob(".*.tmp"))
    other = load_config(None, [*overrides, "sampling.seed=11"])
    with pytest.raises(PMFInputError, match=r"other settings .*sampling"):
        generate(other, out, progress=False)


def _random_generated(folder, data_dir, size=(128, 88), prompt=None):
    """Random images for the test pairs (another size than the ground truth: scored with resize=True)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for pair in read_pairs(DATASET, CONFIG, "test", data_dir):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / pair.filename)
    if prompt is not None:
        (folder / "generation.json").write_text(json.dumps({"prompt": prompt}))
    return folder


def test_score_fid_with_injected_features_and_cached_reference(data_dir, tmp_path):
    folder = _random_generated(tmp_path / "gen", data_dir)
    extractor = random_conv_features(dim=4)
    kwargs = dict(feature_extractor=extractor, stats_cache=tmp_path / "stats", resize=True, progress=False)
    results = score(folder, DATASET, CONFIG, data_dir, metrics=("ssim", "psnr", "fid", "clip_score"), **kwargs)
    fid = results["metrics"]["fid"]
    assert fid["available"] and fid["value"] > 0 and fid["n"] == 2 and fid["reference_n"] == 5  # distinct train images
    assert fid["features"] == extractor.name and len(list((tmp_path / "stats").glob("*.npz"))) == 1
    assert results["metrics"]["clip_score"] == {"available": False, "reason": "not applicable: the run has no text "
                                                                              "prompt"}
    assert "lpips" not in results["metrics"]
    again = score(folder, DATASET, CONFIG, data_dir, metrics=("fid",), **kwargs)["metrics"]["fid"]
    assert "cached" in again["reference"] and again["value"] == pytest.approx(fid["value"])
    # Against the test split's own ground truth images the same way: resized generated images are what is scored.
    truth = _ground_truth(data_dir)
    for row in results["per_pair"]:
        gen = np.asarray(Image.open(folder / row["file"]).resize((176, 256), Image.BICUBIC))
        expected = structural_similarity(truth[row["file"]], gen, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, channel_axis=-1,
                                         data_range=float(gen.max()) - float(gen.min()))
        assert abs(row["ssim"] - expected) <= 1e-4
    text = markdown(results)
    assert "| PMF (this run) |" in text and "not run" in text  # lpips was not asked for


def test_score_without_weights_reports_unavailable_and_computes_the_rest(data_dir, tmp_path):
    folder = _random_generated(tmp_path / "gen", data_dir, prompt="a dress")
    results = score(folder, DATASET, CONFIG, data_dir, clip_model=str(tmp_path / "no_clip"), resize=True,
                    progress=False)
    metrics = results["metrics"]
    assert metrics["ssim"]["available"] and metrics["psnr"]["available"]
    for name, reason in (("lpips", "alexnet-owt-7be5be79.pth not found"), ("fid", "pt_inception-2015-12-05"),
                         ("clip_score", "CLIP model not available locally")):
        assert not metrics[name]["available"] and reason in metrics[name]["reason"], name


def test_score_input_errors_name_the_input(data_dir, tmp_path, capsys):
    folder = _random_generated(tmp_path / "gen", data_dir)
    missing = pair_filename(*TEST_PAIRS[1])
    (folder / missing).unlink()
    with pytest.raises(PMFInputError, match=f"lacks 1 of the 2 images .*{missing}.*pmf eval generate"):
        score(folder, DATASET, CONFIG, data_dir, progress=False)
    Image.new("RGB", (8, 8)).save(folder / "someone___else.png")
    (folder / missing).write_bytes(b"not a png")
    with pytest.raises(PMFInputError, match="not pairs of .*someone___else.png"):
        score(folder, DATASET, CONFIG, data_dir, progress=False)
    (folder / "someone___else.png").unlink()
    with pytest.raises(PMFInputError, match=f"{missing}.*is not a readable image"):
        score(folder, DATASET, CONFIG, data_dir, metrics=("ssim",), resize=True, progress=False)
    with pytest.raises(PMFInputError, match="neither a split"):
        score(folder, DATASET, CONFIG, data_dir, fid_reference="validation", progress=False)
    # The CLI prints such errors on one line and exits 2.
    base = ["eval", "score", "--data-dir", str(data_dir), "--no-progress"]
    assert cli.main(base + ["--generated", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(base + ["--generated", str(folder), "--dataset", "deepfashion/256x176"]) == 2
    assert "unknown dataset 'deepfashion'" in capsys.readouterr().err
    assert cli.main(base + ["--generated", str(folder), "--metrics", "ssim,fidd"]) == 2
    assert "unknown fidd" in capsys.readouterr().err
