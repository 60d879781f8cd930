"""Will a sampling call fit in memory? Checked before anything runs, from the compiled programs themselves.

:func:`program_bytes` reads what XLA's ``compiled.memory_analysis()`` says one program holds at once on a device
(arguments + outputs + temporaries − outputs aliased to arguments); a call needs the largest of its programs, times
:data:`RUNTIME_OVERHEAD` of the platform: XLA:CPU's runtime holds more than its buffer assignment says (on the tiny
export, 64x64 to 320x320 and 1 to 4 images, the peak resident memory grew by 1.3 to 2.0 times the analysis).
:func:`available_bytes` says what a device has:

  * ``$PMF_JAX_MEMORY_LIMIT_BYTES`` (:data:`MEMORY_LIMIT_ENV`) when set: the bytes a sampling program may use per
    device, a user setting (e.g. to leave room for other processes on a shared GPU);
  * else the device's ``memory_stats()["bytes_limit"]`` (GPU, TPU);
  * else (CPU, whose devices report none) the host's ``MemAvailable`` (/proc/meminfo) plus what the call's inputs
    already hold (they are counted in the programs' arguments and already resident);
  * else unknown: no check.

:func:`check_fits` turns a program that cannot fit into one :class:`~pmf_jax.errors.PMFInputError` line that says
how much it needs, how much there is, and a size that fits (:func:`suggest_size`).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

from pmf_jax.errors import PMFInputError

MEMORY_LIMIT_ENV = "PMF_JAX_MEMORY_LIMIT_BYTES"
MEMINFO = "/proc/meminfo"
RUNTIME_OVERHEAD = {"cpu": 2.0}  # platform -> factor on the analysed bytes (others: 1)


def program_bytes(compiled, platform: str = "cpu") -> int:
    """Bytes one compiled program holds at once on a device of ``platform`` (0 when the backend gives no
    analysis), with the platform's :data:`RUNTIME_OVERHEAD`."""
    stats = compiled.memory_analysis()
    if stats is None:
        return 0
    analysed = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                - stats.alias_size_in_bytes)
    return int(analysed * RUNTIME_OVERHEAD.get(platform, 1.0))


def memory_limit_setting() -> Optional[int]:
    """``$PMF_JAX_MEMORY_LIMIT_BYTES`` as an int (None when unset)."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(float(text))
    except ValueError:
        value = -1
    if value <= 0:
        raise PMFInputError(f"{MEMORY_LIMIT_ENV}={text!r} must be a positive number of bytes")
    return value


def host_available_bytes() -> Optional[int]:
    """The host's MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(devices: Sequence, resident: int) -> Tuple[Optional[int], str]:
    """``(bytes, where the number comes from)`` one sampling program may use on each of ``devices`` (module
    docstring); ``resident``: bytes of the program's inputs already in memory (counted on CPU only). None: unknown."""
    setting = memory_limit_setting()
    if setting is not None:
        return setting, MEMORY_LIMIT_ENV
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    if limits and len(limits) == len(devices):
        return min(limits), f"{devices[0].device_kind} memory"
    host = host_available_bytes()
    if host is None:
        return None, "unknown"
    return host + resident, "available host memory"


def suggest_size(size: Tuple[int, int], need: int, have: int, fixed: int,
                 multiple: int = 8) -> Optional[Tuple[int, int]]:
    """A smaller (H, W) that fits, or None: memory taken as ``fixed`` (the parameters) plus a part proportional to
    the pixels (an attention map grows faster, so the size found is on the safe side), each side scaled by the same
    factor and rounded down to a multiple of 64 (of ``multiple`` below 64)."""
    if have <= fixed or need <= fixed:
        return None
    scale = math.sqrt((have - fixed) / (need - fixed))

    def side(value: int) -> int:
        scaled = value * scale
        step = 64 if scaled >= 64 else multiple
        return int(scaled // step) * step

    h, w = side(size[0]), side(size[1])
    if h < multiple or w < multiple:
        return None
    return h, w


def human_bytes(value: int) -> str:
    """e.g. "1.50 GiB", "12.3 MiB", "900 bytes"."""
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value} bytes"


def check_fits(need: int, have: Optional[int], where: str, *, size: Tuple[int, int], num_images: int, fixed: int,
               multiple: int = 8) -> None:
    """Raises a one-line :class:`PMFInputError` when ``need`` bytes exceed ``have`` (None: unknown, no check)."""
    if have is None or need <= have:
        return
    what = f"sampling {num_images} image{'s' if num_images != 1 else ''} at {size[0]}x{size[1]}"
    smaller = suggest_size(size, need, have, fixed, multiple)
    if smaller is not None:
        hint = (f"try a smaller size such as {smaller[0]}x{smaller[1]} (--height {smaller[0]} --width {smaller[1]})"
                f"{' or fewer images' if num_images > 1 else ''}")
    elif have <= fixed:
        hint = f"the model's parameters alone take {human_bytes(fixed)}; try a smaller dtype (--dtype bfloat16)"
    else:
        hint = "try fewer images or a smaller size"
    source = (f"the limit {MEMORY_LIMIT_ENV} sets" if where == MEMORY_LIMIT_ENV
              else f"{where}; {MEMORY_LIMIT_ENV} sets another limit")
    raise PMFInputError(f"{what} needs {human_bytes(need)} of memory per device, but {human_bytes(have)} are "
                        f"available ({source}): {hint}")


__all__ = ["MEMORY_LIMIT_ENV", "RUNTIME_OVERHEAD", "available_bytes", "check_fits", "host_available_bytes",
           "human_bytes", "memory_limit_setting", "program_bytes", "suggest_size"]
