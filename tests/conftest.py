"""Shared fixtures: tiny models and the official reference folder."""

import os
from pathlib import Path

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REFERENCE = Path(__file__).resolve().parent / "reference"


def tiny_config(**overrides):
    """A DeFlow config small enough for exact float64 checks."""
    from deflow_synth.config import preset

    values = dict(
        n_coupling_steps=2,
        coupling_hidden=8,
        encoder_features=8,
        encoder_blocks=2,
        stacked_blocks=(0, 1),
        encoder_growth=8,
    )
    values.update(overrides)
    return preset("small", **values)
