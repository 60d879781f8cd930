"""Roofline step-time prediction from a compiled program's FLOPs, bytes and collectives, per chip.

    compute       = FLOPs per device / peak bf16 FLOP/s
    memory        = HBM bytes accessed per device / HBM bandwidth
    communication = Σ over collectives of wire bytes / the bandwidth of the slowest link the group spans
    step time     = max(compute, memory, communication)        (perfect overlap: a lower bound)

FLOPs and bytes accessed come from ``compiled.cost_analysis()`` of the per-device SPMD program (verified per device:
the same per-device batch gives the same FLOPs on 1 and on 8 devices). Every FLOP is charged at the chip's dense bf16
peak and every byte at full HBM bandwidth, so the prediction is optimistic: real steps reach some fraction of it
(model FLOP utilisation) — compare with ``--measure``.

Chip numbers (dense, no sparsity; per chip), from the vendors' public spec pages:

* ``tpu-v5p`` — cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, inter-chip interconnect
  4,800 Gbps per chip (600 GB/s), 3D torus of up to 8,960 chips per pod.
* ``tpu-v5e`` — cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1,600 Gbps per chip
  (200 GB/s), 2D torus of up to 256 chips per pod.
* ``h100`` — NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s,
  NVLink 900 GB/s per GPU (both directions; 450 GB/s one way) within an 8-GPU HGX node; between nodes one 400 Gb/s
  NDR InfiniBand ConnectX-7 per GPU (50 GB/s) as in DGX H100.
* ``a100`` — NVIDIA A100 SXM4 80 GB datasheet: 312 TFLOP/s bf16 dense, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s
  per GPU (300 GB/s one way) within an 8-GPU node; between nodes one 200 Gb/s HDR InfiniBand per GPU (25 GB/s) as in
  DGX A100.

Links: devices ``i`` and ``j`` share a fast domain (NVLink node, TPU pod) when ``i // domain == j // domain`` (device
ids in mesh order, as ``make_mesh`` lays the mesh along the interconnect). A collective whose replica group spans
several domains is charged at the slow (between-domain) bandwidth. TPU runs beyond one pod (multislice over the data
centre network) are not modelled: their points are flagged.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float          # dense bf16 FLOP/s
    hbm_bandwidth: float       # bytes/s
    hbm_bytes: float           # capacity
    link_bandwidth: float      # bytes/s one way per chip inside the fast domain (ICI / NVLink)
    domain: int                # chips in one fast domain (TPU pod, NVLink node)
    slow_bandwidth: Optional[float]  # bytes/s per chip between domains (InfiniBand); None: not modelled
    source: str


CHIPS: Dict[str, Chip] = {c.name: c for c in (
    Chip("tpu-v5p", 459e12, 2765e9, 95e9, 600e9, 8960, None, "cloud.google.com/tpu/docs/v5p"),
    Chip("tpu-v5e", 197e12, 819e9, 16e9, 200e9, 256, None, "cloud.google.com/tpu/docs/v5e"),
    Chip("h100", 989e12, 3350e9, 80e9, 450e9, 8, 50e9, "NVIDIA H100 SXM5 datasheet; DGX H100 (400 Gb/s NDR per GPU)"),
    Chip("a100", 312e12, 2039e9, 80e9, 300e9, 8, 25e9,
         "NVIDIA A100 SXM4 80GB datasheet; DGX A100 (200 Gb/s HDR per GPU)"),
)}
TERMS = ("compute", "memory", "communication")


def get_chip(name: str) -> Chip:
    from pmf_jax.errors import PMFInputError

    if name not in CHIPS:
        raise PMFInputError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]


def domains_spanned(groups: Sequence[Sequence[int]], chip: Chip) -> int:
    """The most fast domains any one of the replica ``groups`` (device ids) touches."""
    return max((len({int(d) // chip.domain for d in g}) for g in groups if len(g)), default=1)


def collective_seconds(wire_bytes: float, groups: Sequence[Sequence[int]], chip: Chip) -> float:
    """Time of one collective: its wire bytes at the bandwidth of the slowest link its groups use."""
    if wire_bytes <= 0:
        return 0.0
    if domains_spanned(groups, chip) > 1 and chip.slow_bandwidth is not None:
        return wire_bytes / chip.slow_bandwidth
    return wire_bytes / chip.link_bandwidth


@dataclasses.dataclass(frozen=True)
class Prediction:
    compute_s: float
    memory_s: float
    communication_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.communication_s)

    @property
    def limit(self) -> str:
        terms = dict(zip(TERMS, (self.compute_s, self.memory_s, self.communication_s)))
        return max(terms, key=terms.get)

    def as_dict(self) -> dict:
        return {"compute_s": self.compute_s, "memory_s": self.memory_s, "communication_s": self.communication_s,
                "step_s": self.step_s, "limit": self.limit}


def predict(flops: float, bytes_accessed: float, collectives: Iterable[dict], chip: Chip) -> Prediction:
    """``collectives``: dicts with ``wire_bytes`` (per execution), ``repeats`` and ``groups`` (device ids of the
    replica groups)."""
    comm = sum(collective_seconds(c["wire_bytes"], c.get("groups", ()), chip) * c.get("repeats", 1)
               for c in collectives)
    return Prediction(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth, comm)


def weak_scaling(points: List[dict]) -> List[dict]:
    """Adds ``images_per_s`` (global batch / step time) and ``efficiency`` (per-device throughput relative to the
    smallest device count: t(N0) / t(N) at a fixed per-device batch) to each sweep point (sorted by devices).
    Each point has ``devices``, ``global_batch`` and ``step_s``."""
    points = sorted(points, key=lambda p: p["devices"])
    if not points:
        return points
    base = points[0]["global_batch"] / points[0]["step_s"] / points[0]["devices"]
    for p in points:
        p["images_per_s"] = p["global_batch"] / p["step_s"]
        p["efficiency"] = p["images_per_s"] / p["devices"] / base
    return points


def sweep_mesh(mesh: Dict[str, int], devices: int) -> Dict[str, int]:
    """The mesh of a sweep point: ``tensor`` as given, ``fsdp`` as given but at most what the devices leave
    (largest divisor), ``data`` takes the rest. ``mesh`` must be resolved (no -1)."""
    from pmf_jax.errors import PMFInputError

    tensor = mesh.get("tensor", 1)
    if devices % tensor:
        raise PMFInputError(f"sweep point {devices} devices is not divisible by tensor={tensor}")
    rest = devices // tensor
    fsdp = max(d for d in range(1, min(mesh.get("fsdp", 1), rest) + 1) if rest % d == 0)
    return {"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor}
