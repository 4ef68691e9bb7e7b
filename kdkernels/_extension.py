"""Loads the compiled kernels: the best CPU build for this processor, and the CUDA build if any.

Import never fails: when no compiled module is importable, ``kdkernels`` warns once, saying what
happened and what to run, and every loss runs on the pure-PyTorch reference backend. The usual
cause is a shadowed install: Python imports ``kdkernels`` from the current directory first, so
running from a source checkout that was installed with ``pip install .`` (not ``-e``) imports the
checkout's sources, which have no compiled modules next to them.
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import urllib.parse
import urllib.request
import warnings
from typing import Dict, List, Optional

import torch

# What the running CPU can run, best first; torch reports "AVX512", "AVX2", "DEFAULT", ...
_SUPPORTED = {
    "AVX512": ("avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}
_CPU_MODULE_PREFIX = "_C_"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_EDITABLE_INSTALL = "pip install --no-build-isolation -e ."

_cpu_build: Optional[str] = None
_cpu_error: Optional[str] = None
_cuda_loaded = False


def compiled_modules(package_dir: str) -> List[str]:
    """The compiled CPU modules (``_C_<isa>`` shared libraries) in a ``kdkernels`` folder."""
    found = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found += glob.glob(os.path.join(package_dir, f"{_CPU_MODULE_PREFIX}*{suffix}"))
    return sorted(os.path.basename(path) for path in found if "_C_cuda" not in os.path.basename(path))


def _installed_package_dirs() -> List[str]:
    """``kdkernels`` folders on ``sys.path`` or recorded by pip (an editable install points at its
    source tree), in that order."""
    folders = [os.path.join(entry or os.getcwd(), "kdkernels") for entry in sys.path]
    try:
        distributions = list(importlib.metadata.distributions(name="kdkernels"))
    except Exception:  # broken metadata never stops the import
        distributions = []
    for distribution in distributions:
        folders.append(str(distribution.locate_file("kdkernels")))
        try:
            origin = json.loads(distribution.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = origin.get("url", "")
        if origin.get("dir_info", {}).get("editable") and url.startswith("file:"):
            tree = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
            folders.append(os.path.join(tree, "kdkernels"))
    return list(dict.fromkeys(os.path.realpath(folder) for folder in folders if os.path.isdir(folder)))


def _source_tree(package_dir: str) -> Optional[str]:
    """The checkout around ``package_dir`` (a folder with setup.py beside it), if it is one."""
    root = os.path.dirname(package_dir)
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def missing_build_message(package_dir: str, installed_dirs: List[str]) -> str:
    """Why ``package_dir`` (the imported ``kdkernels``, without compiled modules) cannot run the
    compiled kernels, and the command that fixes it. ``installed_dirs``: other ``kdkernels``
    folders that may hold a build (see ``_installed_package_dirs``)."""
    here = os.path.realpath(package_dir)
    built = [d for d in installed_dirs if os.path.realpath(d) != here and compiled_modules(d)]
    tree = _source_tree(here)
    if built and tree:
        return (f"kdkernels was imported from the source tree {tree}, whose kdkernels/ has no compiled "
                f"modules, and it shadows the build installed in {built[0]}: Python imports from the "
                f"current directory first. Run from another directory to use the installed build, "
                f"or build this tree in place with `{_EDITABLE_INSTALL}` (run in {tree}).")
    if tree:
        return (f"kdkernels was imported from the source tree {tree}, which is not built: its kdkernels/ "
                f"has no compiled modules. Build it in place with `{_EDITABLE_INSTALL}` (run in {tree}).")
    return (f"the kdkernels installed in {here} has no compiled modules (it was installed while torch "
            f"could not be imported). Install torch, then reinstall from the source tree with "
            f"`pip install --no-build-isolation .`.")


def _warn_if_built_elsewhere(module) -> None:
    """An editable install of another checkout serves the compiled modules of a source tree that
    has none (its import hook maps every ``kdkernels.*`` name it can): sources and kernels may
    then not match."""
    origin = os.path.dirname(os.path.realpath(getattr(module, "__file__", None) or _PACKAGE_DIR))
    if origin != os.path.realpath(_PACKAGE_DIR):
        warnings.warn(f"kdkernels: the Python sources come from {_PACKAGE_DIR} but the compiled kernels "
                      f"from {origin} (another install); the two may not match. Run from another "
                      f"directory, or build this tree in place with `{_EDITABLE_INSTALL}`.",
                      RuntimeWarning, stacklevel=4)


def _load_cpu() -> None:
    global _cpu_build, _cpu_error
    capability = torch.backends.cpu.get_cpu_capability()
    errors = []
    for build in _SUPPORTED.get(capability, ("default",)):
        try:
            module = importlib.import_module(f"kdkernels.{_CPU_MODULE_PREFIX}{build}")
        except ImportError as exc:
            errors.append(f"{_CPU_MODULE_PREFIX}{build}: {exc}")
            continue
        _cpu_build = build
        _warn_if_built_elsewhere(module)
        return
    if not compiled_modules(_PACKAGE_DIR):
        _cpu_error = missing_build_message(_PACKAGE_DIR, _installed_package_dirs())
    else:  # built, but not loadable on this machine: another torch, or a build for another processor
        where = _source_tree(_PACKAGE_DIR)
        fix = (f"`{_EDITABLE_INSTALL}` in {where}" if where
               else "`pip install --no-build-isolation --force-reinstall .` from the source tree")
        _cpu_error = (f"the compiled modules in {_PACKAGE_DIR} do not load on this machine and torch "
                      f"{torch.__version__} ({'; '.join(errors) or 'no CPU build matches this processor'}). "
                      f"Rebuild them against this torch with {fix}.")
    warnings.warn(f"kdkernels: compiled CPU kernels are not available: {_cpu_error} Until then every "
                  "loss runs on the pure-PyTorch reference backend.", RuntimeWarning, stacklevel=3)


def _load_cuda() -> None:
    global _cuda_loaded
    if torch.version.cuda is None:
        return
    try:
        importlib.import_module("kdkernels._C_cuda")
        _cuda_loaded = True
    except ImportError:
        _cuda_loaded = False


_load_cpu()
_load_cuda()


def cpu_available() -> bool:
    return _cpu_build is not None


def cuda_available() -> bool:
    return _cuda_loaded


def info() -> Dict[str, object]:
    """What was loaded: used by kdkernels.backend_info()."""
    result: Dict[str, object] = {"cpu_build": _cpu_build, "cuda_build": _cuda_loaded}
    if _cpu_build is not None:
        raw = torch.ops.kdkernels.build_info()
        for item in raw.split(";"):
            key, _, value = item.partition("=")
            result[key] = int(value) if value.isdigit() else value
        result["cpu_cached_buffer_bytes"] = int(torch.ops.kdkernels.cached_buffer_bytes())
    else:
        result["cpu_error"] = _cpu_error
    try:
        result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    return result
