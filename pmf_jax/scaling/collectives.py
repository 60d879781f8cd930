"""Every collective of a compiled (SPMD-partitioned, per-device) HLO module, with its size and how often it runs.

Sizes are per device, from the instruction's result shapes (the compiled module is the one program each device
runs):

* ``operand_bytes`` — what one device puts in; ``result_bytes`` — what it gets back. They are equal for all-reduce,
  all-to-all and collective-permute; an all-gather's operand is its result / n, a reduce-scatter's result is its
  operand / n (n = the replica group size).
* ``bytes`` — the larger of the two: the unsharded size of the data the collective works on (the gathered
  parameter, the full gradient being reduced). This is the number the report lists per collective.
* ``wire_bytes`` — what one device sends over the interconnect with the bandwidth-optimal ring algorithms:
  all-reduce 2(n−1)/n·S, all-gather and reduce-scatter (n−1)/n·S (S = the full size), all-to-all (n−1)/n·S,
  collective-permute S. The roofline's communication term is built from these.

``count`` and the byte totals are per execution of the program: a collective inside a ``while`` loop with a known
trip count is counted that many times (``known_trip_count`` in the loop's backend config); loops without one count
once (per iteration).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|[a-z]\w*\[[^\]]*\](?:\{[^}]*\})?)\s+([\w\-]+)\(")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_CALLEES = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str                 # one of KINDS
    name: str                 # the HLO instruction name
    group_size: int           # devices in one replica group (for collective-permute: 2, a pair)
    operand_bytes: int
    result_bytes: int
    shapes: Tuple[str, ...]   # the result arrays, e.g. ("f32[320,1280]", ...)
    repeats: int = 1          # executions per program run (trip counts of enclosing loops)
    groups: Tuple[Tuple[int, ...], ...] = ()  # device ids of every replica group (pairs for collective-permute)

    @property
    def bytes(self) -> int:
        return max(self.operand_bytes, self.result_bytes)

    @property
    def wire_bytes(self) -> float:
        n, size = self.group_size, self.bytes
        if self.kind == "collective-permute":
            return float(self.operand_bytes)
        if n <= 1:
            return 0.0
        factor = 2.0 * (n - 1) / n if self.kind == "all-reduce" else (n - 1) / n
        return factor * size


def array_bytes(text: str) -> Tuple[int, List[str]]:
    total, shapes = 0.0, []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        size = math.prod(int(d) for d in dims.split(",") if d.strip()) if dims.strip() else 1
        total += size * _DTYPE_BYTES[dtype]
        shapes.append(f"{dtype}[{dims}]")
    return int(total), shapes


def _device_ids(text: Optional[str], count: int) -> np.ndarray:
    """A mesh's ``device_ids=(...)``: an iota ``[2,4]T(1,0)`` (reshape, then transpose) or a list ``0,2,1,3``."""
    if not text:
        return np.arange(count)
    m = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
    if m:
        ids = np.arange(count).reshape([int(x) for x in m.group(1).split(",")])
        if m.group(2):
            ids = ids.transpose([int(x) for x in m.group(2).split(",")])
        return ids.reshape(-1)
    return np.array([int(x) for x in text.split(",") if x.strip()])


def replica_groups(line: str, num_devices: Optional[int] = None) -> Tuple[Tuple[int, ...], ...]:
    """The device groups of a collective instruction, from any of the printed forms: ``{{0,1},{2,3}}``, the iota
    form ``[2,4]<=[8]`` (optionally ``<=[4,2]T(1,0)``), the mesh form ``mesh['axis_0'=8,'axis_1'=2] {'axis_0'}``
    (groups vary the listed axes), or a collective-permute's ``source_target_pairs`` (one group per pair). Empty
    groups mean all ``num_devices`` devices."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(v) for _, v in axes]
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3)) if a in names]
        devices = _device_ids(m.group(2), math.prod(sizes))  # the mesh's devices in row-major order
        ids = devices.reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in grouped]
        ids = ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i] for i in grouped) if grouped else 1)
        return tuple(tuple(int(x) for x in row) for row in ids)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return tuple(tuple(int(x) for x in row) for row in ids.reshape(-1, shape[-1]))
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        return tuple(tuple(int(x) for x in pair.split(",")) for pair in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", line)
    if m and m.group(1).strip():
        found = re.findall(r"\{([\d,\s]*)\}", m.group(1))
        return tuple(tuple(int(x) for x in g.split(",") if x.strip()) for g in found)
    return (tuple(range(num_devices or 1)),)


def _base_kind(op: str) -> Optional[str]:
    base = op[: -len("-start")] if op.endswith("-start") else op
    return base if base in KINDS else None


def parse_collectives(hlo_text: str, num_devices: Optional[int] = None) -> List[Collective]:
    """Every collective in ``hlo_text`` (sync ops and async ``-start`` ops; ``-done`` halves are skipped)."""
    computation, entry = None, None
    members: Dict[str, List[Tuple[str, str, str, str]]] = collections.defaultdict(list)
    calls: Dict[str, List[Tuple[str, int]]] = collections.defaultdict(list)
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")):
            header = _HEADER.match(line)
            if header:
                computation = header.group(2)
                if header.group(1):
                    entry = computation
            continue
        m = _INSTR.match(line)
        if not m or computation is None:
            continue
        name, result, op = m.group(1), m.group(2), m.group(3)
        trip = 1
        if op == "while":
            t = _TRIP.search(line)
            trip = int(t.group(1)) if t else 1
        callees = _CALLEES.findall(line)
        b = _BRANCHES.search(line)
        if b:
            callees += re.findall(r"%?([\w.\-]+)", b.group(1))
        for callee in callees:
            calls[computation].append((callee, trip if op == "while" else 1))
        if _base_kind(op):
            members[computation].append((name, result, op, line))
    repeats = _multipliers(entry, calls)
    out = []
    for comp, instrs in members.items():
        for name, result, op, line in instrs:
            kind = _base_kind(op)
            groups = replica_groups(line, num_devices)
            n = 2 if kind == "collective-permute" else len(groups[0])
            size, shapes = array_bytes(result)
            if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
                size //= 2  # the async start returns (operands, results[, context])
            operand, res = size, size
            if kind == "all-gather":
                operand = size // max(n, 1)
            elif kind == "reduce-scatter":
                operand = size * n
            out.append(Collective(kind, name, n, operand, res, tuple(shapes), repeats.get(comp, 1), groups))
    return out


def _multipliers(entry: Optional[str], calls: Dict[str, List[Tuple[str, int]]]) -> Dict[str, int]:
    """Executions of each computation per run of the entry computation (while bodies × their trip counts)."""
    if entry is None:
        return {}
    counts: Dict[str, int] = collections.defaultdict(int)
    stack = [(entry, 1)]
    seen = 0
    while stack and seen < 1_000_000:
        comp, mult = stack.pop()
        counts[comp] += mult
        seen += 1
        for callee, trip in calls.get(comp, ()):
            stack.append((callee, mult * trip))
    return dict(counts)


def summarize(collectives: List[Collective]) -> Dict[str, Dict[str, float]]:
    """kind → {"count", "bytes", "wire_bytes"} per program run (every kind present, zeros included)."""
    table = {k: {"count": 0, "bytes": 0, "wire_bytes": 0.0} for k in KINDS}
    for c in collectives:
        row = table[c.kind]
        row["count"] += c.repeats
        row["bytes"] += c.bytes * c.repeats
        row["wire_bytes"] += c.wire_bytes * c.repeats
    return table


def to_json(collectives: List[Collective]) -> str:
    return json.dumps([dict(dataclasses.asdict(c), bytes=c.bytes, wire_bytes=c.wire_bytes) for c in collectives])
