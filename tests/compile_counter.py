"""Counting XLA backend compilations in tests."""

import jax


class CompileCounter:
    """Counts XLA backend compilations (every jit, not only the pipelines') inside a ``with`` block."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self.listen)
        return self

    def __exit__(self, *_):
        jax.monitoring.unregister_event_duration_listener(self.listen)

    def listen(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
