"""Training as library code: the run's components, the PMF objective, the train state and the update step.

The training *program* (loop, checkpoints, logging, demo) is ``train/`` at the repository root; ``pmf scaling`` and
the benchmarks compile the same step from here.
"""
