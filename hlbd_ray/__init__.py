"""hlbd-ray: hyperparameter sweeps of causal APT language models on HLBD data with Ray."""

__version__ = "0.1.0"
