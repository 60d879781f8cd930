"""FLOP and memory counts of the benchmarked programs: XLA's cost and memory analyses, the device allocators' peaks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # common imports this module
    from common import Env


def compiled_flops(compiled) -> Optional[float]:
    """XLA's FLOP count of a compiled program (``compiled.cost_analysis()['flops']``)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def lowered_flops(lowered) -> Optional[float]:
    """FLOPs of a lowered (not compiled) program: XLA's cost analysis of the unoptimised HLO. Within 0.1% of the
    compiled count for our models on the CPU; used where the compiled program hides work in custom calls (cuDNN
    attention) whose FLOPs XLA does not count."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def program_flops(compiled, xla_lowering: Optional[Callable[[], Any]] = None) -> Optional[float]:
    """FLOPs of a timed program; ``xla_lowering()`` lowers the same computation with XLA attention, used when the
    timed program runs a non-XLA attention kernel (its FLOPs are invisible to the cost analysis)."""
    if xla_lowering is not None:
        return lowered_flops(xla_lowering())
    return compiled_flops(compiled)


def compiled_peak_bytes(compiled) -> Optional[int]:
    """Device memory a compiled program needs: arguments + outputs + temporaries − donated (aliased) buffers."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def jax_device_peak_bytes() -> Optional[int]:
    """The device allocator's peak so far (GPU); None where the backend keeps no statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def torch_reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def torch_peak_bytes(device) -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def uses_xla_attention(env: Env) -> bool:
    """Whether all our attention runs as XLA ops (then XLA's cost analysis sees every FLOP): on the CPU always, on
    the GPU with ``--backend xla`` (``auto`` picks cuDNN flash for long sequences there)."""
    return env.platform != "gpu" or env.args.backend == "xla"
