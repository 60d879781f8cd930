"""The demo's person and clothing colour errors (train/demo_metrics.py) on hand-made images whose answers are known."""

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


def _figure():
    """32x32 grey image: a red shirt (the quadrilateral of shoulders and hips) and two blue trouser legs 3 px wide;
    returns (image, keypoints [18, 3])."""
    import cv2

    keypoints = np.zeros((18, 3), np.float32)
    joints = {2: (10, 6), 5: (20, 6), 8: (11, 16), 11: (19, 16), 9: (10, 22), 10: (10, 29), 12: (20, 22),
              13: (20, 29)}
    for j, (x, y) in joints.items():
        keypoints[j] = (x, y, 1.0)
    image = np.full((32, 32, 3), 128, np.uint8)
    for leg in ((8, 9, 10), (11, 12, 13)):   # legs first, the shirt over them (as synthetic_pairs draws)
        for a, b in zip(leg, leg[1:]):
            cv2.line(image, joints[a], joints[b], (30, 30, 200), 3)
    cv2.fillPoly(image, [np.array([joints[j] for j in (2, 5, 11, 8)], np.int32)], (200, 30, 30))
    return image, keypoints


def test_clothing_colour_error_asks_whether_the_clothes_have_the_right_colours():
    from train.demo_metrics import clothing_colour_error, clothing_regions

    truth, keypoints = _figure()
    assert len(clothing_regions(keypoints, truth.shape[:2])) == 3   # the shirt and two legs
    assert clothing_colour_error(truth, truth, keypoints) == pytest.approx(0.0, abs=1e-9)
    # Shifted by a pixel: the clothes keep their colours, the pixel-wise error counts every moved edge.
    shifted = np.roll(truth, 1, axis=1)
    assert clothing_colour_error(shifted, truth, keypoints) < 7.0      # measured 5.8
    assert person_colour_error(shifted, truth) > 15.0                  # measured 18.2
    # The shirt in another colour: its region's full ΔE, averaged with the legs' (right but for their hip ends,
    # which the shirt covers).
    recoloured = truth.copy()
    recoloured[np.all(truth == (200, 30, 30), axis=-1)] = (30, 200, 30)
    from skimage.color import rgb2lab

    shirt_delta = np.linalg.norm(rgb2lab(np.uint8([[[200, 30, 30]]]))[0, 0] - rgb2lab(np.uint8([[[30, 200, 30]]]))[0, 0])
    assert shirt_delta / 3 < clothing_colour_error(recoloured, truth, keypoints) < shirt_delta * 2 / 3
    keypoints[[9, 12], 2] = 0.0   # both knees missing: only the shirt is placed
    assert len(clothing_regions(keypoints, truth.shape[:2])) == 1
    keypoints[2, 2] = 0.0
    assert np.isnan(clothing_colour_error(truth, truth, keypoints))
    result = score(np.stack([truth]) / 127.5 - 1.0, np.stack([truth]) / 127.5 - 1.0, _figure()[1][None])
    assert result["clothing_colour_error"] == pytest.approx(0.0, abs=1e-6)
