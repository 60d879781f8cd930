"""The DeepFashion pose-transfer files (PATN's split, reused by GFLA, PIDM, CFLD, PCDMs): names, pairs, keypoints.

- Image names flatten the In-shop path: ``img/MEN/Denim/id_00000080/01_1_front.jpg`` is
  ``fashionMENDenimid0000008001_1front.jpg`` ("fashion" + gender + category + id folder without "_" + file name
  with only its first "_" kept).
- ``fasion-resize-pairs-{split}.csv``: comma-separated, header ``from,to``, one (source, target) name pair a line.
- ``fasion-resize-annotation-{split}.csv``: colon-separated, header ``name:keypoints_y:keypoints_x``; the two
  keypoint fields are JSON lists of 18 ints (rows, then columns, COCO-18 order) in 256x176 pixels, -1 = missing.
Every problem raises PMFInputError naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np

from pmf_jax.errors import PMFInputError

ANNOTATION_SIZE = (256, 176)  # (height, width) the keypoints are given in
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def flat_name(relative_path: str | Path) -> str:
    """``MEN/Denim/id_00000080/01_1_front.jpg`` -> ``fashionMENDenimid0000008001_1front.jpg``."""
    parts = Path(relative_path).parts
    if len(parts) != 4:
        raise PMFInputError(f"{relative_path}: expected GENDER/Category/id_XXXXXXXX/NN_N_view.jpg")
    gender, category, identity, file = parts
    head, _, rest = file.partition("_")
    return "fashion" + gender + category + identity.replace("_", "") + head + "_" + rest.replace("_", "")


def person_id(name: str) -> str:
    """``fashionMENDenimid0000008001_1front.jpg`` -> ``id_00000080`` (the In-shop item/person folder)."""
    match = re.search(r"id(\d{8})", name)
    return f"id_{match.group(1)}" if match else name


def index_images(image_root: Path) -> dict[str, Path]:
    """Flattened name -> path for every image under ``image_root`` (``GENDER/Category/id_*/file``)."""
    index = {}
    for dirpath, _, files in os.walk(image_root):
        for file in files:
            if file.lower().endswith(IMAGE_SUFFIXES):
                path = Path(dirpath) / file
                relative = path.relative_to(image_root)
                if len(relative.parts) == 4:
                    index[flat_name(relative)] = path
    return index


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PMFInputError(f"{path}: file not found (see data/deepfashion_pairs/README.md for the layout)")
    return path.read_text().splitlines()


def read_pairs(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, source name, target name)`` for each pair; the header must name ``from`` and ``to``."""
    lines = _lines(path)
    rows = list(csv.reader(lines))
    if not rows:
        raise PMFInputError(f"{path}:1: empty file; expected a header 'from,to'")
    header = [h.strip() for h in rows[0]]
    if "from" not in header or "to" not in header:
        raise PMFInputError(f"{path}:1: expected a header with columns 'from' and 'to', got {lines[0]!r}")
    i_from, i_to = header.index("from"), header.index("to")
    pairs = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header) or not row[i_from].strip() or not row[i_to].strip():
            expected = f"expected {len(header)} comma-separated names"
            raise PMFInputError(f"{path}:{lineno}: {expected}, got {lines[lineno - 1]!r}")
        pairs.append((lineno, row[i_from].strip(), row[i_to].strip()))
    return pairs


def _coordinates(field: str, path: Path, lineno: int, what: str) -> list[int]:
    try:
        values = json.loads(field)
    except json.JSONDecodeError:
        raise PMFInputError(f"{path}:{lineno}: {what} is not a JSON list: {field.strip()!r}") from None
    if not isinstance(values, list) or len(values) != 18 or not all(isinstance(v, int) for v in values):
        raise PMFInputError(f"{path}:{lineno}: {what} must be a list of 18 integers, got {field.strip()!r}")
    return values


def read_annotations(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Name -> ``(line number, keypoints)``; keypoints float32 ``[18, 3]`` (x, y in 256x176 pixels, confidence 1;
    missing joints 0, 0, 0)."""
    lines = _lines(path)
    if not lines or [h.strip() for h in lines[0].split(":")] != ["name", "keypoints_y", "keypoints_x"]:
        raise PMFInputError(f"{path}:1: expected the header 'name:keypoints_y:keypoints_x'")
    annotations = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) != 3:
            expected = "expected 3 colon-separated fields (name:keypoints_y:keypoints_x)"
            raise PMFInputError(f"{path}:{lineno}: {expected}, got {line!r}")
        name = fields[0].strip()
        ys = _coordinates(fields[1], path, lineno, "keypoints_y")
        xs = _coordinates(fields[2], path, lineno, "keypoints_x")
        keypoints = np.zeros((18, 3), np.float32)
        for j, (x, y) in enumerate(zip(xs, ys)):
            if x >= 0 and y >= 0:
                keypoints[j] = (x, y, 1.0)
        annotations[name] = (lineno, keypoints)
    return annotations
