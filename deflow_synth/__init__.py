"""deflow-synth: learn a degradation from unpaired images with DeFlow, make LR/HR pairs."""

__version__ = "0.1.0"
