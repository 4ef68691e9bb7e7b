"""Imports of the optional packages behind kdkernels' ``[hf]`` extra, with one message when one is
missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, needed_by: str) -> ModuleType:
    """``module`` imported, or an ImportError saying that ``needed_by`` needs its package."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        package = module.split(".")[0]
        raise ImportError(f"{needed_by} needs the {package} package: pip install {package} "
                          "(or pip install 'kdkernels[hf]')") from error
