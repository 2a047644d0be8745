"""Errors the command line turns into one-line messages."""


class DeflowError(Exception):
    """A failure with a message meant for the user (bad file, bad option, bad checkpoint)."""


class CheckpointError(DeflowError):
    """A checkpoint file that cannot be read safely or does not describe a DeFlow model."""
