"""The package logger; the library logs here and never prints."""

import logging

logger = logging.getLogger("deflow_synth")
