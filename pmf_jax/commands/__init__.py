"""Subcommands of the ``pmf`` console script (see :mod:`pmf_jax.cli`); one module per subcommand."""
