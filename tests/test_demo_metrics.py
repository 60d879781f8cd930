"""The demo's person colour error (train/demo_metrics.py) on hand-made images whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from train.demo_metrics import person_colour_error, person_mask, score

GREY, WHITE, BLACK = (128, 128, 128), (255, 255, 255), (0, 0, 0)


def _truth() -> np.ndarray:
    """4x4 grey background with a 2x2 white 'person' (4 of 16 pixels) in the top-left corner."""
    image = np.empty((4, 4, 3), np.uint8)
    image[:] = GREY
    image[:2, :2] = WHITE
    return image


def test_person_mask_is_every_pixel_off_the_most_frequent_colour():
    truth = _truth()
    truth[3, 3] = (128, 128, 129)  # one channel off by one is still the person
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = expected[3, 3] = True
    np.testing.assert_array_equal(person_mask(truth), expected)


def test_colour_error_is_mean_delta_e_over_the_person_only():
    truth = _truth()
    generated = truth.copy()
    generated[2:, 2:] = BLACK  # background errors do not count
    assert person_colour_error(generated, truth) == pytest.approx(0.0, abs=1e-9)
    generated[0, :2] = BLACK  # half the person white -> black: ΔE(white, black) = 100 (L* 100 -> 0)
    assert person_colour_error(generated, truth) == pytest.approx(50.0, abs=1e-3)
    generated[:2, :2] = BLACK
    assert person_colour_error(generated, truth) == pytest.approx(100.0, abs=1e-3)
    blank = np.full((4, 4, 3), 7, np.uint8)
    assert np.isnan(person_colour_error(blank, blank))


def test_score_averages_over_images_in_minus_one_to_one():
    truth = np.repeat(np.repeat(_truth(), 2, axis=0), 2, axis=1)  # 8x8: SSIM's 7x7 window must fit
    wrong = truth.copy()
    wrong[:4, :4] = BLACK
    to_unit = lambda x: x.astype(np.float32) / 127.5 - 1.0  # noqa: E731
    result = score(to_unit(np.stack([truth, wrong])), to_unit(np.stack([truth, truth])))
    assert result["person_colour_error"] == pytest.approx((0.0 + 100.0) / 2, abs=1e-3)
    assert set(result) == {"ssim", "psnr", "person_colour_error"}
