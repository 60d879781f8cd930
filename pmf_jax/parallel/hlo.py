"""Reading collectives out of compiled HLO text, to check what a sharded program communicates.

The design promise (docs/architecture.md, "Sharding"): parameters may be all-gathered (FSDP), activations never —
the batch stays split, so e.g. the reference bank's K/V concat is local to each device.
:func:`unexpected_all_gathers` lists the all-gathers whose operand is not a parameter shard::

    text = jax.jit(f, ...).lower(params, batch).compile().as_text()
    assert unexpected_all_gathers(text, param_piece_shapes(params, mesh)) == []
"""

from __future__ import annotations

import collections
import itertools
import math
import re
from typing import Any, Dict, Iterable, List, Set, Tuple

import jax

from pmf_jax.parallel.mesh import mesh_axis_sizes

# `%name = f32[2,4]{1,0} op(...)` or a tuple result `%name = (f32[2]{0}, s32[]) op(...)`.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*"            # name
                    r"(\(.*?\)|[a-z]\w*\[[^\]]*\](?:\{[^}]*\})?)\s+"      # result shape (or tuple; big tuples carry /*index=N*/)
                    r"([\w\-]+)\((.*)$")                                   # opcode(operands...
_ARRAY = re.compile(r"[a-z]\w*\[([^\]]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

Shape = Tuple[int, ...]


def _shapes(text: str) -> List[Shape]:
    return [tuple(int(d) for d in m.group(1).split(",") if d.strip()) for m in _ARRAY.finditer(text)]


def _operand_names(args: str) -> List[str]:
    # The operand list ends at the first ')' that closes the call; operands print as `%name` (optionally with a type).
    depth, end = 0, len(args)
    for i, ch in enumerate(args):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
    return re.findall(r"%([\w.\-]+)", args[:end])


def parse_instructions(hlo_text: str) -> List[Tuple[str, List[Shape], str, List[str]]]:
    """Every instruction as (name, result array shapes, opcode, operand names)."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.append((m.group(1), _shapes(m.group(2)), m.group(3), _operand_names(m.group(4))))
    return out


def collective_counts(hlo_text: str) -> Dict[str, int]:
    """Opcode → count for the collectives in ``hlo_text`` (async ``-start`` forms counted under the base name)."""
    counts: collections.Counter = collections.Counter()
    for _, _, op, _ in parse_instructions(hlo_text):
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            counts[base] += 1
    return dict(counts)


def all_gather_operand_shapes(hlo_text: str) -> List[Tuple[str, List[Shape]]]:
    """(instruction name, operand shapes) of every all-gather (sync or async start)."""
    instrs = parse_instructions(hlo_text)
    shape_of = {name: shapes for name, shapes, _, _ in instrs}
    out = []
    for name, _, op, operands in instrs:
        if op in ("all-gather", "all-gather-start"):
            out.append((name, [s for o in operands for s in shape_of.get(o, [])]))
    return out


def param_piece_shapes(params: Any, mesh_sizes: Any) -> Set[Shape]:
    """Every shape a piece of a parameter (or of its gradient) can have on ``mesh_sizes``: each dimension whole or
    divided by a product of mesh axis sizes. FSDP gathers parameter shards; tensor-parallel gradients of replicated
    biases are gathered from per-shard partial sums — both are pieces, an activation [B, L, C] is not.
    (Checks are meaningful when activation dims such as L differ from the parameter dims, as in real models.)"""
    sizes = [s for s in mesh_axis_sizes(mesh_sizes).values() if s > 1]
    divisors = {math.prod(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r)}
    out = set()
    for leaf in jax.tree.leaves(params):
        options = [[d // k for k in sorted(divisors) if d % k == 0] for d in leaf.shape]
        out.update(itertools.product(*options))
    return out


def unexpected_all_gathers(hlo_text: str, allowed_shapes: Iterable[Shape]) -> List[str]:
    """All-gathers whose operand is not (up to a transpose/relayout) one of ``allowed_shapes``.

    Shapes are compared as sorted dimension lists without 1s, since XLA may gather a transposed or bitcast
    parameter shard.
    Returns ``["name: operand shapes"]`` for each offender — empty when only parameters are gathered.
    """
    key = lambda s: tuple(sorted(d for d in s if d != 1))  # noqa: E731
    allowed = {key(s) for s in allowed_shapes}
    bad = []
    for name, shapes in all_gather_operand_shapes(hlo_text):
        if not shapes or any(key(s) not in allowed for s in shapes):
            bad.append(f"{name}: {shapes}")
    return bad
