"""The one place that imports basicsr, lazily, with its fix for current torchvision.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module that torchvision
removed in 0.17. Registering the public ``functional`` module under the old name is enough for
every part of basicsr this package uses. Importing basicsr also resets numpy's global error
state, which is restored here so that importing it has no side effect on callers.
"""

import importlib
import sys
from types import ModuleType

import numpy as np

_LEGACY_MODULE = "torchvision.transforms.functional_tensor"


def _install_torchvision_alias() -> None:
    if _LEGACY_MODULE in sys.modules:
        return
    try:
        importlib.import_module(_LEGACY_MODULE)
    except ImportError:
        functional = importlib.import_module("torchvision.transforms.functional")
        sys.modules[_LEGACY_MODULE] = functional


def import_basicsr(module: str) -> ModuleType:
    """Import ``basicsr.<module>`` (for example ``"archs.rrdbnet_arch"``) with the fix applied."""
    _install_torchvision_alias()
    saved = np.geterr()
    try:
        return importlib.import_module(f"basicsr.{module}")
    finally:
        np.seterr(**saved)


def rrdb_block(n_features: int, n_growth: int = 32):
    """basicsr's Residual-in-Residual Dense Block."""
    return import_basicsr("archs.rrdbnet_arch").RRDB(n_features, n_growth)


def imresize(image, scale: float):
    """MATLAB-compatible antialiased bicubic resize (numpy HWC or torch CHW, floats)."""
    return import_basicsr("utils.matlab_functions").imresize(image, scale)
