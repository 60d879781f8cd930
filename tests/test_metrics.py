"""pmf_jax.metrics: JAX SSIM/PSNR against scikit-image, FID statistics and distance against numpy / pytorch-fid,
FID behaviour with an injected feature network, and the LPIPS / Inception / CLIP loaders with local weight files
(random weights written here; nothing is downloaded) or without them (unavailable, with the reason)."""


import numpy as np
import pytest
from metric_fixtures import fake_alexnet, random_conv_features, tiny_clip
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pmf_jax.metrics import FeatureStats, MetricUnavailable, frechet_distance, psnr, ssim
from pmf_jax.metrics.availability import WEIGHTS_ENV, find_weights, weight_dirs


@pytest.fixture(autouse=True)
def no_cached_weights(tmp_path, monkeypatch):
    """An empty torch hub cache and no $PMF_METRIC_WEIGHTS, whatever this machine has cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


def _images(seed=0, n=3, h=64, w=48):
    """Pairs of three kinds: noisy copies, smooth images with a flat patch (float32 cancellation), unrelated."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    smooth = ndimage.gaussian_filter(rng.uniform(0, 255, (n, h, w, 3)), (0, 4, 4, 0))
    smooth = np.clip((smooth - smooth.mean()) * 6 + 128, 0, 255).astype(np.uint8)
    smooth[:, : h // 3, : w // 3] = 250
    jitter = lambda a, k: np.clip(a.astype(int) + rng.integers(-k, k + 1, a.shape), 0, 255).astype(np.uint8)  # noqa: E731
    return [(jitter(noise, 40), noise), (jitter(smooth, 4), smooth), (smooth, noise)]


def _sk_ssim(gen, ref, sigma=1.5, data_range=None):
    return np.array([structural_similarity(r, g, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                           channel_axis=-1,
                                           data_range=float(g.max()) - float(g.min()) if data_range is None
                                           else data_range)
                     for g, r in zip(gen, ref)])


@pytest.mark.parametrize("sigma", [1.5, 1.2])
def test_ssim_matches_scikit_image_protocol(sigma):
    for gen, ref in _images():
        np.testing.assert_allclose(np.asarray(ssim(gen, ref, sigma=sigma)), _sk_ssim(gen, ref, sigma), rtol=0,
                                   atol=1e-4)


def test_ssim_data_range_options_and_identity():
    gen, ref = _images(seed=1)[1]
    np.testing.assert_allclose(np.asarray(ssim(gen, ref, data_range="dtype")), _sk_ssim(gen, ref, data_range=255),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ssim(gen, ref, data_range=200.0)), _sk_ssim(gen, ref, data_range=200),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ssim(ref, ref)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim(gen, ref[:, :-1])
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(gen[:, :8, :8], ref[:, :8, :8])


def test_psnr_matches_scikit_image():
    for gen, ref in _images(seed=2):
        expected = [peak_signal_noise_ratio(r, g, data_range=255) for g, r in zip(gen, ref)]
        np.testing.assert_allclose(np.asarray(psnr(gen, ref)), expected, rtol=0, atol=1e-4)
    gen, ref = _images(seed=2)[0]
    assert np.isinf(np.asarray(psnr(ref, ref))).all()  # identical images, as skimage


# ------------------------------------------------------------------------------------------------------------ FID

def test_feature_stats_match_numpy_and_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(37, 6)) * [1, 2, 3, 4, 5, 6] + 10.0
    stats = FeatureStats()
    for chunk in np.array_split(features, 4):  # streaming over uneven batches
        stats.update(chunk)
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9)
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz", extractor="test"))
    assert loaded.n == 37 and str(np.load(tmp_path / "s.npz")["extractor"]) == "test"
    np.testing.assert_allclose(loaded.sigma, stats.sigma, rtol=1e-9)


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    a, b = FeatureStats(), FeatureStats()
    a.update(rng.normal(size=(50, 16)))
    b.update(rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3)
    expected = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    np.testing.assert_allclose(frechet_distance(a, b), expected, rtol=1e-6)


def _stats(extractor, images):
    stats = FeatureStats()
    for start in range(0, len(images), extractor.batch_size):
        stats.update(extractor(images[start : start + extractor.batch_size]))
    return stats


def test_fid_with_injected_features_is_zero_on_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    base = ndimage.gaussian_filter(rng.uniform(0, 255, (64, 32, 32, 3)), (0, 2, 2, 0))
    images = np.clip((base - base.mean()) * 4 + 128, 0, 255).astype(np.uint8)
    shift = lambda k: np.clip(images.astype(int) + k, 0, 255).astype(np.uint8)  # noqa: E731
    extractor = random_conv_features()
    real = _stats(extractor, images)
    assert abs(frechet_distance(real, _stats(extractor, images))) < 1e-8
    small = frechet_distance(real, _stats(extractor, shift(20)))
    large = frechet_distance(real, _stats(extractor, shift(60)))
    assert 0 < small < large
    assert small > 1e3 * abs(frechet_distance(real, real))


# ------------------------------------------------------------------------------------------------ weights lookup

def test_weight_search_order(tmp_path, monkeypatch):
    mine, env = tmp_path / "mine", tmp_path / "env"
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    for folder in (mine, env, hub):
        folder.mkdir(parents=True)
        (folder / "w.pth").write_bytes(b"x")
    monkeypatch.setenv(WEIGHTS_ENV, str(env))
    assert weight_dirs(mine) == [mine, env, hub]
    assert find_weights("M", "w.pth", "URL", mine) == mine / "w.pth"
    assert find_weights("M", "w.pth", "URL") == env / "w.pth"
    monkeypatch.delenv(WEIGHTS_ENV)
    assert find_weights("M", "w.pth", "URL") == hub / "w.pth"
    with pytest.raises(MetricUnavailable, match=r"other\.pth not found in .*checkpoints.*URL") as info:
        find_weights("M", "other.pth", "URL", mine)
    assert info.value.metric == "M" and str(mine) in info.value.reason


def _fake_inception(folder):
    """Random weights with the FID Inception's keys and shapes (its blocks only patch torchvision's forward)."""
    import torch
    import torchvision

    from pmf_jax.metrics.fid import INCEPTION_FILE

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), folder / INCEPTION_FILE)
    return folder


def test_inception_extractor_loads_a_local_file_only(tmp_path):
    from pmf_jax.metrics.fid import INCEPTION_FILE, inception_extractor

    with pytest.raises(MetricUnavailable, match=INCEPTION_FILE + ".*not found"):
        inception_extractor(tmp_path / "empty")
    extractor = inception_extractor(_fake_inception(tmp_path / "w"), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    features = extractor(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all() and extractor.name.startswith("pytorch-fid")
    bad = tmp_path / "bad"
    bad.mkdir()
    import torch

    torch.save({"conv.weight": torch.zeros(1)}, bad / INCEPTION_FILE)
    with pytest.raises(MetricUnavailable, match="does not hold the FID Inception weights"):
        inception_extractor(bad)


# ------------------------------------------------------------------------------------------------------- LPIPS

def test_lpips_with_a_local_backbone(tmp_path):
    import torch

    from pmf_jax.metrics.lpips import ALEXNET_FILE, LPIPS

    with pytest.raises(MetricUnavailable, match=ALEXNET_FILE):
        LPIPS(tmp_path / "empty")
    folder = fake_alexnet(tmp_path / "w")
    metric = LPIPS(folder, device="cpu")
    state = torch.load(folder / ALEXNET_FILE)
    for key, value in metric.model.net.state_dict().items():  # slice<k>.<i>.weight <- features.<i>.weight
        torch.testing.assert_close(value, state[f"features.{key.split('.', 1)[1]}"])
    gen, ref = _images(seed=4, n=2)[0]
    d_same, d_diff = metric(ref, ref), metric(gen, ref)
    assert d_same.shape == (2,) and np.allclose(d_same, 0.0, atol=1e-6) and (d_diff > 1e-4).all()
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"features.0.weight": torch.zeros(1)}, bad / ALEXNET_FILE)
    with pytest.raises(MetricUnavailable, match="not torchvision's AlexNet"):
        LPIPS(bad)


# -------------------------------------------------------------------------------------------------- CLIP score

def test_clip_score_with_a_local_model(tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from pmf_jax.metrics.clip_score import CLIPScore

    with pytest.raises(MetricUnavailable, match="CLIP model not available locally"):
        CLIPScore(tmp_path / "no_clip")
    folder = tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    prompts = ["a red shirt", "blue jeans", "a dress"]
    metric = CLIPScore(folder, device="cpu")
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    # Independently: the model's own normalised embeddings, 100 * mean cosine, clamped at 0.
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(images), return_tensors="pt", padding=True))
    cosines = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    assert cosines.mean() > 0.01  # (a seed where the clamp does not hide the value)
    np.testing.assert_allclose(metric.compute(), 100 * cosines.mean(), rtol=1e-4)
