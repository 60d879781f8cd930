"""A stick-figure doodle (the strokes drawn with a mouse) -> one person's OpenPose COCO-18 keypoints, by fitting the
18-joint skeleton to the strokes: :func:`fit_doodle`. numpy only (no detector, no weights), so it always works.

The strokes become one graph: every stroke is resampled into nodes a small step apart and chained; strokes that
touch or cross are joined where they meet, and separate pieces are joined at their closest points (a limb drawn a
little off the torso still belongs to it). On that graph:

* **head**: the topmost closed loop (a stroke that ends near where it started and is much longer than it is wide);
  the nose is its centre, the neck the body node nearest to it; eyes and ears sit inside / on the circle, turned
  with the neck→nose direction. Without a loop the topmost free end is the nose and there are no eyes or ears.
* **limbs**: the free ends (graph leaves) farthest from the neck along the strokes are the ankles (legs are the
  longest paths), the next two the wrists. Left and right follow OpenPose: the person faces us, so their right is
  the one on the image's left.
* **hip centre**: where the two paths neck→ankle part; **arms** leave the torso path (neck→hip centre) where their
  path from the neck parts from it. Along a limb's own branch the shoulder / hip joint sits a fixed fraction from
  its start, the elbow / knee at the branch's sharpest bend after it (or half-way along a straight limb), and the
  wrist / ankle at the free end. Every body joint therefore lies on a drawn stroke.

Joints the doodle does not show (a missing arm, no head loop's eyes) are missing (confidence 0).
"""

from __future__ import annotations

import heapq
from typing import List, Sequence

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import KEYPOINT_NAMES, NUM_KEYPOINTS

J = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
NODES_PER_EXTENT = 100      # resampling step: the figure's extent / this
MAX_NODES = 4000            # a longer scribble is resampled more coarsely
JOIN_STEPS = 1.5            # nodes of two strokes closer than this many steps touch (a crossing or a T-joint)
SHOULDER_FRACTION = 0.25    # shoulder: this far along the arm's branch (neck/torso -> wrist)
HIP_FRACTION = 0.2          # hip joint: this far along the leg's branch (hip centre -> ankle)
BEND_FRACTION = 0.06        # an elbow / knee is a bend whose distance from the chord exceeds this fraction of it
HEAD_MAX_FRACTION = 0.6     # a head loop is at most this fraction of the figure's extent ...
LOOP_LENGTH_RATIO = 2.0     # ... at least this many times longer than its own extent (a circle: pi) ...
LOOP_GAP_FRACTION = 0.35    # ... and its ends are closer than this fraction of its extent


def check_strokes(strokes, name: str = "doodle") -> List[np.ndarray]:
    """float64 ``[n_i, 2]`` (x, y) arrays of a list of strokes, each a list of ``[x, y]`` points; PMFInputError when
    there is no point, a point is not two finite numbers."""
    if not isinstance(strokes, (list, tuple)) or not strokes:
        raise PMFInputError(f"{name}: expected a non-empty list of strokes (lists of [x, y] points)")
    out = []
    for i, stroke in enumerate(strokes):
        try:
            points = np.asarray(stroke, np.float64)
        except (TypeError, ValueError):
            raise PMFInputError(f"{name}: stroke {i} is not a list of [x, y] numbers") from None
        if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
            raise PMFInputError(f"{name}: stroke {i} must be a non-empty list of [x, y] points, got shape "
                                f"{points.shape}")
        if not np.all(np.isfinite(points)):
            raise PMFInputError(f"{name}: stroke {i} has a coordinate that is not a finite number")
        out.append(points)
    return out


def fit_doodle(strokes: Sequence) -> np.ndarray:
    """Keypoints of the stick figure drawn as ``strokes`` (module docstring).

    Args:
      strokes: a list of strokes, each ``[n_i, 2]`` points (x, y) in pixels of the drawing, in drawing order.
    Returns:
      float32 ``[18, 3]`` in the same pixels (confidence 1 for the joints found, all-zero for the others).
    Raises:
      PMFInputError: no strokes, or a malformed stroke.
    """
    strokes = check_strokes(strokes)
    every = np.concatenate(strokes)
    extent = max(float(np.ptp(every[:, 0])), float(np.ptp(every[:, 1])), 1.0)
    total = sum(_length(s) for s in strokes)
    step = max(extent / NODES_PER_EXTENT, total / MAX_NODES, 0.25)
    head = _head_loop(strokes, extent)
    graph = _Graph([s for i, s in enumerate(strokes) if i != head], step)  # a lone stroke is never a head
    out = np.zeros((NUM_KEYPOINTS, 3), np.float32)

    def put(joint: str, point) -> None:
        out[J[joint]] = (float(point[0]), float(point[1]), 1.0)

    leaves = graph.leaves()
    if head is not None:
        centre, radius = _circle(strokes[head], step)
        neck = int(np.argmin(np.linalg.norm(graph.nodes - centre, axis=1)))
        top = None
    else:  # the topmost free end is the head's top
        top = min(leaves, key=lambda n: graph.nodes[n, 1]) if leaves else int(np.argmin(graph.nodes[:, 1]))
        neck = top
    origin = neck
    dist, prev = graph.shortest_paths(origin)
    ends = sorted((n for n in leaves if n not in (origin, top) and np.isfinite(dist[n])), key=lambda n: -dist[n])
    ankles, wrists = ends[:2], ends[2:4]
    if top is not None:  # the neck: where the arms part (or a quarter of the way down to the feet)
        paths = [graph.path(prev, w) for w in wrists] or [graph.path(prev, a) for a in ankles]
        if len(paths) >= 2:
            neck = paths[0][_parting(paths[0], paths[1])]
        elif paths:
            neck = paths[0][_at_fraction(graph, paths[0], 0.25)]
        dist, prev = graph.shortest_paths(neck)
        put("nose", graph.nodes[top])
    put("neck", graph.nodes[neck])

    leg_paths = [graph.path(prev, a) for a in ankles]
    hip_index = 0
    if len(leg_paths) == 2:
        hip_index = _parting(leg_paths[0], leg_paths[1])
    elif leg_paths:
        hip_index = _at_fraction(graph, leg_paths[0], 0.45)
    torso = leg_paths[0][: hip_index + 1] if leg_paths else [neck]
    hip_centre = torso[-1]

    def limb(path, start_index, fraction, names) -> None:
        branch = path[start_index:]
        root = branch[_at_fraction(graph, branch, fraction)]
        rest = branch[branch.index(root):]
        put(names[0], graph.nodes[root])
        put(names[1], graph.nodes[_bend(graph, rest)])
        put(names[2], graph.nodes[rest[-1]])

    sides = _sides(graph, ankles, graph.nodes[hip_centre, 0])
    for ankle, path in zip(ankles, leg_paths):
        side = sides[ankle]
        limb(path, hip_index, HIP_FRACTION, (f"{side}_hip", f"{side}_knee", f"{side}_ankle"))
    sides = _sides(graph, wrists, graph.nodes[neck, 0])
    for wrist in wrists:
        path = graph.path(prev, wrist)
        limb(path, _parting(path, torso), SHOULDER_FRACTION,
             (f"{sides[wrist]}_shoulder", f"{sides[wrist]}_elbow", f"{sides[wrist]}_wrist"))
    if head is not None:
        _face(out, centre, radius, graph.nodes[neck], put)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Strokes


def _length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum()) if len(points) > 1 else 0.0


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    """The polyline with points at most ``step`` apart (its own points kept)."""
    if len(points) < 2:
        return points.copy()
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        count = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        out.append(a + (b - a) * (np.arange(1, count + 1)[:, None] / count))
    return np.concatenate(out)


def _head_loop(strokes: List[np.ndarray], extent: float):
    """Index of the topmost closed loop small enough to be a head, or None."""
    found = []
    for i, s in enumerate(strokes):
        size = max(float(np.ptp(s[:, 0])), float(np.ptp(s[:, 1])))
        if len(s) < 4 or size <= 0 or size > HEAD_MAX_FRACTION * extent:
            continue
        if _length(s) >= LOOP_LENGTH_RATIO * size and np.linalg.norm(s[0] - s[-1]) <= LOOP_GAP_FRACTION * size:
            found.append((float(s[:, 1].mean()), i))
    return min(found)[1] if found else None


def _circle(stroke: np.ndarray, step: float):
    """(centre [2], radius) of a loop: the mean and mean distance of its evenly resampled points."""
    points = _resample(stroke, step)
    centre = points.mean(axis=0)
    return centre, float(np.linalg.norm(points - centre, axis=1).mean())


def _face(out: np.ndarray, centre, radius: float, neck, put) -> None:
    """Eyes inside the head circle and ears on it, turned so that 'up' points from the neck to the head centre."""
    put("nose", centre)
    up = centre - neck
    up = up / np.linalg.norm(up) if np.linalg.norm(up) > 0 else np.array([0.0, -1.0])
    right = np.array([up[1], -up[0]])  # the person's right: the image's left for an upright figure facing us
    for side, sign in (("right", 1.0), ("left", -1.0)):
        put(f"{side}_eye", centre + radius * (0.3 * up + 0.4 * sign * right))
        put(f"{side}_ear", centre + radius * (0.1 * up + 0.9 * sign * right))


# ----------------------------------------------------------------------------------------------------------------
# The stroke graph


class _Graph:
    """Nodes ``[N, 2]`` of the resampled strokes; edges along each stroke, where strokes touch, and between separate
    pieces at their closest nodes."""

    def __init__(self, strokes: List[np.ndarray], step: float):
        pieces = [_resample(s, step) for s in strokes]
        self.nodes = np.concatenate(pieces)
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(pieces)])
        self.edges: List[dict] = [dict() for _ in range(len(self.nodes))]
        start = 0
        for p in pieces:
            for a in range(start, start + len(p) - 1):
                self._link(a, a + 1)
            start += len(p)
        gaps = np.linalg.norm(self.nodes[:, None] - self.nodes[None], axis=-1)
        touching = (gaps <= JOIN_STEPS * step) & (owner[:, None] != owner[None])
        for a, b in zip(*np.nonzero(np.triu(touching))):
            self._link(int(a), int(b))
        self._join_pieces(gaps)

    def _link(self, a: int, b: int) -> None:
        weight = float(np.linalg.norm(self.nodes[a] - self.nodes[b]))
        self.edges[a][b] = weight
        self.edges[b][a] = weight

    def _join_pieces(self, gaps: np.ndarray) -> None:
        """Links the connected pieces into one, closest pair first (a spanning tree over the pieces)."""
        while True:
            label = self._components()
            if label.max() == 0:
                return
            mask = (label[:, None] == 0) & (label[None] != 0)
            a, b = np.unravel_index(int(np.argmin(np.where(mask, gaps, np.inf))), gaps.shape)
            self._link(int(a), int(b))

    def _components(self) -> np.ndarray:
        label = np.full(len(self.nodes), -1)
        count = 0
        for seed in range(len(self.nodes)):
            if label[seed] >= 0:
                continue
            label[seed], stack = count, [seed]
            while stack:
                for n in self.edges[stack.pop()]:
                    if label[n] < 0:
                        label[n] = count
                        stack.append(n)
            count += 1
        return label

    def leaves(self) -> List[int]:
        """The free ends: nodes with one edge."""
        return [n for n, e in enumerate(self.edges) if len(e) == 1]

    def shortest_paths(self, source: int):
        """(distance [N] along the strokes from ``source``, predecessor [N]) by Dijkstra."""
        dist = np.full(len(self.nodes), np.inf)
        prev = np.full(len(self.nodes), -1)
        dist[source] = 0.0
        heap = [(0.0, source)]
        while heap:
            d, n = heapq.heappop(heap)
            if d > dist[n]:
                continue
            for m, w in self.edges[n].items():
                if d + w < dist[m]:
                    dist[m], prev[m] = d + w, n
                    heapq.heappush(heap, (d + w, m))
        return dist, prev

    @staticmethod
    def path(prev: np.ndarray, target: int) -> List[int]:
        """Nodes from the source of ``prev`` to ``target``."""
        out = [int(target)]
        while prev[out[-1]] >= 0:
            out.append(int(prev[out[-1]]))
        return out[::-1]


def _parting(a: List[int], b: List[int]) -> int:
    """Index of the last node two paths from the same source share."""
    i = 0
    while i + 1 < min(len(a), len(b)) and a[i + 1] == b[i + 1]:
        i += 1
    return i


def _at_fraction(graph: _Graph, path: List[int], fraction: float) -> int:
    """Index of the node of ``path`` nearest to ``fraction`` of its length."""
    points = graph.nodes[path]
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    return int(np.argmin(np.abs(along - fraction * along[-1])))


def _bend(graph: _Graph, path: List[int]) -> int:
    """The node of ``path`` farthest from its chord when that is a clear bend, else the one half-way along."""
    points = graph.nodes[path]
    chord = points[-1] - points[0]
    length = float(np.linalg.norm(chord))
    if len(path) > 2 and length > 0:
        off = np.abs(chord[0] * (points[:, 1] - points[0, 1]) - chord[1] * (points[:, 0] - points[0, 0])) / length
        if off.max() > BEND_FRACTION * length:
            return path[int(np.argmax(off))]
    return path[_at_fraction(graph, path, 0.5)]


def _sides(graph: _Graph, ends: List[int], middle_x: float) -> dict:
    """'right' or 'left' per end node: of two, the one on the image's left is the person's right; a single one by
    its side of ``middle_x``."""
    if len(ends) == 2:
        first, second = sorted(ends, key=lambda n: graph.nodes[n, 0])
        return {first: "right", second: "left"}
    return {n: "right" if graph.nodes[n, 0] <= middle_x else "left" for n in ends}


__all__ = ["check_strokes", "fit_doodle"]
