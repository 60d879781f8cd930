"""Writes dummy_data/: a tiny fake manual download in the real DeepFashion layout and CSV formats.

    python data/deepfashion_pairs/make_dummy_data.py [OUT_DIR]

7 square 64x64 JPEGs under img/ (each a flat colour with a darker "person" block), 3 train and 2 test pairs,
keypoints in 256x176 pixels with a few -1 (missing) entries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = {  # path under img/ -> flattened CSV name
    "MEN/Denim/id_00000080/01_1_front.jpg": "fashionMENDenimid0000008001_1front.jpg",
    "MEN/Denim/id_00000080/01_2_side.jpg": "fashionMENDenimid0000008001_2side.jpg",
    "MEN/Denim/id_00000080/01_4_full.jpg": "fashionMENDenimid0000008001_4full.jpg",
    "WOMEN/Blouses_Shirts/id_00000044/02_1_front.jpg": "fashionWOMENBlouses_Shirtsid0000004402_1front.jpg",
    "WOMEN/Blouses_Shirts/id_00000044/02_3_back.jpg": "fashionWOMENBlouses_Shirtsid0000004402_3back.jpg",
    "WOMEN/Tees_Tanks/id_00006370/03_1_front.jpg": "fashionWOMENTees_Tanksid0000637003_1front.jpg",
    "WOMEN/Tees_Tanks/id_00006370/03_7_additional.jpg": "fashionWOMENTees_Tanksid0000637003_7additional.jpg",
}
NAMES = list(IMAGES.values())
PAIRS = {
    "train": [(NAMES[0], NAMES[1]), (NAMES[1], NAMES[2]), (NAMES[3], NAMES[4])],
    "test": [(NAMES[5], NAMES[6]), (NAMES[6], NAMES[5])],
}


def keypoints_yx(index: int) -> tuple[list[int], list[int]]:
    """Deterministic 256x176 keypoints for image ``index``: rows, columns; joints 16/17 (ears) of odd images are -1."""
    rng = np.random.default_rng(index)
    ys = [int(v) for v in rng.integers(10, 246, 18)]
    xs = [int(v) for v in rng.integers(10, 166, 18)]
    if index % 2:
        ys[16] = ys[17] = xs[16] = xs[17] = -1
    return ys, xs


def colour(index: int) -> tuple[int, int, int]:
    return (40 + 30 * index, 200 - 25 * index, 60 + 20 * (index % 3))


def main(out: Path) -> None:
    for index, (path, _) in enumerate(IMAGES.items()):
        image = np.empty((64, 64, 3), np.uint8)
        image[:] = colour(index)
        image[20:50, 26:38] //= 2  # a "person" in the middle columns that survive the 176/256 crop
        file = out / "img" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(file, quality=95)
    for split, pairs in PAIRS.items():
        rows = ["from,to"] + [f"{a},{b}" for a, b in pairs]
        (out / f"fasion-resize-pairs-{split}.csv").write_text("\n".join(rows) + "\n")
        names = sorted({n for pair in pairs for n in pair}, key=NAMES.index)
        lines = ["name:keypoints_y:keypoints_x"]
        for name in names:
            ys, xs = keypoints_yx(NAMES.index(name))
            lines.append(f"{name}: {ys}: {xs}")
        (out / f"fasion-resize-annotation-{split}.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "dummy_data")
