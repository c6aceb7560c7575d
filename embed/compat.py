"""What ``import imagebind`` needs on today's torchvision, in one place.

``imagebind-unofficial`` imports ``pytorchvideo``, whose ``transforms.augmentations`` does
``import torchvision.transforms.functional_tensor``. torchvision 0.17 renamed that private module
to ``_functional_tensor`` and later releases removed the old name, so the import fails before any
ImageBind code runs. We alias the old name to the new module (the functions pytorchvideo uses are
unchanged) instead of patching the installed package. ``imagebind.data`` also imports
``pkg_resources`` (hence ``setuptools<81`` in pyproject.toml); its deprecation warning is silenced
here so it does not drown the logs.

Call :func:`import_imagebind` instead of ``import imagebind`` anywhere in this project.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def alias_functional_tensor() -> None:
    """Make ``torchvision.transforms.functional_tensor`` importable again (idempotent)."""
    name = "torchvision.transforms.functional_tensor"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)  # an old torchvision still has it
    except ModuleNotFoundError:
        sys.modules[name] = importlib.import_module("torchvision.transforms._functional_tensor")


def import_imagebind() -> ModuleType:
    """``import imagebind`` (with ``imagebind.data`` and ``imagebind.models.imagebind_model``)."""
    alias_functional_tensor()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import imagebind
        import imagebind.data
        import imagebind.models.imagebind_model
    return imagebind
