"""Planning multi-chip runs from compiled programs (``pmf scaling``).

* :mod:`~pmf_jax.scaling.abstract` — the run's real components and train state as shapes (``jax.eval_shape``; no
  weights read; built-in SD1.5 configs stand in for model folders that are not on this machine).
* :mod:`~pmf_jax.scaling.compile` — ahead-of-time compilation of the train step (the trainer's shardings) and of the
  retarget pipeline's sampling programs for a mesh.
* :mod:`~pmf_jax.scaling.collectives` — every collective of the compiled HLO, its size and how often it runs.
* :mod:`~pmf_jax.scaling.roofline` — the chip table and the step-time prediction; weak scaling.
* :mod:`~pmf_jax.scaling.report`, :mod:`~pmf_jax.scaling.plot` — Markdown, JSON and PNG.
* :mod:`~pmf_jax.scaling.planner` — :func:`plan` and :func:`measure`, what the command calls.
"""
