"""Reading orbax checkpoints in one process without the others: in a multi-process run (``pmf eval generate`` on a
pod) every process loads the model on its own, at its own time, so its reads must neither wait at orbax's
cross-process barriers nor place arrays on devices of another process."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp


def host_sharding() -> jax.sharding.SingleDeviceSharding:
    """This process's first CPU device (``jax.devices("cpu")[0]`` is process 0's in a multi-process run)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])


def this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options whose barriers and primary host are this process alone (the same as the defaults in a
    one-process run)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
