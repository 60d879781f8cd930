"""What the three benchmarks share: command-line options and devices, and device-synchronised timing of runners
(ours and the peers). FLOP and memory counts: ``counts.py``; the report (table + JSON): ``reporting.py``.

Timing rule (every row): ``warmup`` untimed calls first (compilation, autotuning, CUDA-graph capture), then ``iters``
(>= 20) calls, each timed alone between device synchronisations (``jax.block_until_ready`` /
``torch.cuda.synchronize``); the table shows the median and the 10th-90th percentiles.

Order: on the CPU every implementation is built first and the timed calls are interleaved (ours, peer, peer, ours,
...), so that a shared host's load drifts over all rows alike. On the GPU the peers run first, one at a time, and
torch's cached memory is released before ours runs (JAX's allocator keeps what it has used, torch's can give it back).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import counts
import models

if TYPE_CHECKING:  # reporting imports this module
    from reporting import Report

MIN_ITERS = 20
_START = time.perf_counter()
SPEEDUP = "speedup = peer_ms / our_ms (> 1: pmf_jax is faster)"
OURS = "pmf_jax"

# ------------------------------------------------------------------------------------------------- options, devices

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models, float32 (the CI smoke mode; ratios only)")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cudnn"),
                   help="pmf_jax attention backend (default auto: cuDNN flash on GPU for long sequences)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="compute dtype of both sides (default: bfloat16, float32 with --tiny)")
    p.add_argument("--iters", type=int, default=MIN_ITERS, help=f"timed calls per row (>= {MIN_ITERS})")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (>= 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile(mode='reduce-overhead') (default: on GPU yes, on CPU no)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU threads for each side (XLA intra-op and torch); 0 = the libraries' defaults "
                        "(default: 1 with --tiny, else 0). One thread each keeps CPU ratios meaningful on a shared "
                        "2-vCPU box, where torch's OpenMP threads collapse under oversubscription")
    p.add_argument("--order", default="auto", choices=("auto", "interleaved", "sequential"),
                   help="auto: interleaved on CPU; sequential (peers first, torch memory released, then ours) on GPU")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file too")
    return p


@dataclasses.dataclass
class Env:
    """The device both sides run on, and the run's settings."""

    args: argparse.Namespace
    platform: str             # jax platform: "cpu" | "gpu"
    torch_device: Any         # torch.device on the same hardware
    dtype: str                # compute dtype name, both sides
    compile: bool             # time torch.compile too
    compile_skip_reason: str  # why not, when compile is False
    cfg: Dict[str, Any]       # model_configs(...)

    @property
    def tiny(self) -> bool:
        return self.args.tiny

    def jnp_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> Dict[str, Any]:
        import jax
        import torch

        dev = jax.devices()[0]
        info = {"jax_device": f"{dev.platform}:{dev.device_kind}", "jax_device_count": jax.device_count(),
                "torch_device": str(self.torch_device), "host": platform.node(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                # other processes on the host skew CPU timings (torch's OpenMP threads most): recorded with each run
                "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
        if self.torch_device.type == "cuda":
            info["torch_device_name"] = torch.cuda.get_device_name(self.torch_device)
        return info


def setup(args: argparse.Namespace) -> Env:
    """Picks the device (the same one for JAX and torch), the dtype and whether torch.compile runs.

    Must run before anything imports jax: ``--tiny`` pins JAX to the CPU.
    """
    if args.iters < MIN_ITERS:
        raise SystemExit(f"--iters {args.iters}: medians are taken over at least {MIN_ITERS} calls")
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first call compiles)")
    if args.tiny:
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX and torch share the GPU in one process: JAX must not grab 75% of it up front (its allocator still keeps
    # and reuses what it has used, so our timings are unaffected).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    threads = args.cpu_threads if args.cpu_threads is not None else (1 if args.tiny else 0)
    if threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={threads}").strip()
    import jax
    import torch

    from pmf_jax import runtime

    runtime.setup(compilation_cache=False)  # the benches time warm programs; compiles happen in the warm-up
    if threads:
        torch.set_num_threads(threads)
    args.cpu_threads = threads
    # ref UNet, ControlNet and UNet share diffusers' forward code object, so their compiled variants share one dynamo
    # cache: room for all of them (past the limit dynamo would silently run eager)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    plat = jax.default_backend()
    if plat == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("JAX runs on the GPU but torch sees no CUDA device: the peer must run on the same device")
        device = torch.device("cuda", 0)
    elif plat == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"JAX runs on {plat}; the torch peer cannot run there (use a GPU, or --tiny for the CPU)")
    if args.backend == "cudnn" and plat != "gpu":
        raise SystemExit("--backend cudnn needs a GPU")
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    compile_on = args.compile if args.compile is not None else plat == "gpu"
    reason = "" if compile_on else ("--no-compile" if args.compile is False else
                                    "skipped on CPU (slow to compile; pass --compile to include it)")
    cfg = models.model_configs(args.tiny)
    if not args.tiny and plat == "cpu":
        print("warning: full SD1.5 shapes on the CPU will be very slow; use --tiny for the CPU smoke mode",
              file=sys.stderr)
    return Env(args, plat, device, dtype, compile_on, reason, cfg)


# ---------------------------------------------------------------------------------------------------------- timing

def log(message: str) -> None:
    """Progress on stderr, with the seconds since the bench started (where set-up and compile time go)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Timing:
    times_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def jax_sync(out):
    import jax

    return jax.block_until_ready(out)


def torch_sync_for(device) -> Callable[[Any], None]:
    import torch

    if device.type == "cuda":
        return lambda _out: torch.cuda.synchronize(device)
    return lambda _out: None  # CPU ops are synchronous


@dataclasses.dataclass
class Runner:
    """One implementation of one case, ready to time: ``call()`` is one measured unit, ``sync(out)`` waits for it.

    ``peak_bytes`` is known up front (XLA memory analysis); ``peak_after()`` reads an allocator's peak after the
    timed calls (reset by ``before()``). ``flops`` on a peer's runner defaults to our count for the same case.
    """

    case: str
    impl: str
    call: Callable[[], Any]
    sync: Callable[[Any], Any]
    warmup: int = 1
    flops: Optional[float] = None
    peak_bytes: Optional[int] = None
    peak_after: Optional[Callable[[], Optional[int]]] = None
    before: Optional[Callable[[], None]] = None
    peak_source: str = ""
    note: str = ""


def _time_once(runner: Runner) -> float:
    start = time.perf_counter()
    runner.sync(runner.call())
    return (time.perf_counter() - start) * 1e3


def measure(runners: Sequence[Runner], iters: int) -> List[Timing]:
    """Warms every runner up, then times ``iters`` rounds of one call each (interleaved when several)."""
    for runner in runners:
        if runner.before is not None:
            runner.before()
        for _ in range(runner.warmup):
            runner.sync(runner.call())
    times: List[List[float]] = [[] for _ in runners]
    for _ in range(iters):
        for i, runner in enumerate(runners):
            times[i].append(_time_once(runner))
    return [Timing(t) for t in times]


# (case or cases, impl, build -> the runners of those cases)
Factory = Tuple[Any, str, Callable[[], Sequence[Runner]]]


def run_all(report: "Report", env: Env, ours: Sequence[Factory], peers: Sequence[Factory],
            release_peers: Callable[[], None] = lambda: None) -> None:
    """Builds and times every runner (see the module docstring for the order) and adds the rows to ``report``.

    A factory returns the runners it built (one per case it covers). A peer factory that raises becomes a
    'failed' row for its (case, impl); ours must work.
    """
    order = env.args.order if env.args.order != "auto" else ("interleaved" if env.platform == "cpu" else "sequential")
    env.args.order = order
    if order == "interleaved":
        built = [r for _, _, f in ours for r in f()]
        for case, impl, factory in peers:
            built += _try_build(report, case, impl, factory)
        log(f"built {len(built)} runners; timing them interleaved")
        for runner, timing in zip(built, measure(built, env.args.iters)):
            report.add(runner, timing, runner.peak_after() if runner.peak_after else None)
        return
    for case, impl, factory in peers:
        for runner in _try_build(report, case, impl, factory):
            try:
                timing = measure([runner], env.args.iters)[0]
                report.add(runner, timing, runner.peak_after() if runner.peak_after else None)
            except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                report.fail(runner.case, runner.impl, err)
    release_peers()
    gc.collect()
    _release_torch_memory(env)
    for _, _, factory in ours:
        for runner in factory():
            timing = measure([runner], env.args.iters)[0]
            report.add(runner, timing, runner.peak_after() if runner.peak_after else None)


def _try_build(report, cases, impl, factory) -> List[Runner]:
    try:
        return list(factory())
    except Exception as err:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
        for case in ([cases] if isinstance(cases, str) else cases):
            report.fail(case, impl, err)
        return []


def _release_torch_memory(env) -> None:
    import torch

    if env.torch_device.type == "cuda":
        torch.cuda.synchronize(env.torch_device)
        torch.cuda.empty_cache()


def torch_runner(env: Env, case: str, impl: str, call: Callable[[], Any], *, compiled: bool = False,
                 note: str = "") -> Runner:
    """A peer's runner: synchronised on its device, peak from ``torch.cuda.max_memory_allocated`` (reset before its
    warm-up), three warm-up calls when compiled (compile, CUDA-graph recording, first replay)."""
    device = env.torch_device
    if compiled:
        note = (note + "; " if note else "") + "reduce-overhead" + (
            " (CUDA graphs)" if device.type == "cuda" else " (no CUDA graphs on CPU)")
    return Runner(case, impl, call, torch_sync_for(device), warmup=max(env.args.warmup, 3 if compiled else 1),
                  before=lambda: counts.torch_reset_peak(device), peak_after=lambda: counts.torch_peak_bytes(device),
                  peak_source="max_memory_allocated", note=note)
