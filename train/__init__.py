"""The PMF training program (run from the repository root: ``python -m train --config configs/X.yaml key=value``)."""
