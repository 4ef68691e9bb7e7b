"""Importing kdkernels from a source tree that has no compiled modules: the warning says what
happened and names the command that fixes it; the fix it names works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import kdkernels
from kdkernels import _extension

PACKAGE_DIR = os.path.dirname(os.path.abspath(kdkernels.__file__))

# An editable install elsewhere in this environment (make test's own) adds an import hook that
# would serve kdkernels' submodules from its tree; the scenario is a plain `pip install .`, so the
# child drops such hooks first.
_IMPORT_AND_REPORT = textwrap.dedent("""
    import json, sys, warnings
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kdkernels
    print(json.dumps({"file": kdkernels.__file__, "cpu_build": kdkernels.backend_info()["cpu_build"],
                      "warnings": [str(w.message) for w in caught if "kdkernels" in str(w.message)]}))
""")


def _source_copy_without_builds(root):
    """A checkout-like folder: setup.py and kdkernels/ with its Python files only."""
    shutil.copytree(PACKAGE_DIR, root / "kdkernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (root / "setup.py").write_text("# stands for the checkout's setup.py\n")
    return root


def _import_in(cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_AND_REPORT], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_shadowed_install_names_the_installed_build_and_both_fixes(tmp_path):
    assert _extension.compiled_modules(PACKAGE_DIR), "this test needs a built kdkernels"
    tree = _source_copy_without_builds(tmp_path / "checkout")
    site = tmp_path / "site"
    site.mkdir()
    os.symlink(PACKAGE_DIR, site / "kdkernels")  # stands for the build pip installed

    shadowed = _import_in(tree, [site])
    assert shadowed["file"] == str(tree / "kdkernels" / "__init__.py")
    assert shadowed["cpu_build"] is None
    assert len(shadowed["warnings"]) == 1, shadowed["warnings"]
    message = shadowed["warnings"][0]
    assert f"source tree {tree}" in message
    assert f"shadows the build installed in {os.path.realpath(site / 'kdkernels')}" in message
    assert "Run from another directory" in message
    assert "`pip install --no-build-isolation -e .`" in message and f"(run in {tree})" in message
    assert "reference backend" in message

    # The first fix the message names: from another directory the installed build loads.
    elsewhere = _import_in(tmp_path, [site])
    assert elsewhere["cpu_build"] is not None and elsewhere["warnings"] == []


def test_an_unbuilt_tree_without_an_installed_build_is_told_to_build_in_place(tmp_path):
    tree = _source_copy_without_builds(tmp_path / "checkout")
    message = _extension.missing_build_message(str(tree / "kdkernels"), installed_dirs=[])
    assert "is not built" in message and str(tree) in message
    assert "`pip install --no-build-isolation -e .`" in message


def test_an_installed_package_without_builds_is_told_to_reinstall_with_torch(tmp_path):
    site_package = tmp_path / "site-packages" / "kdkernels"
    site_package.mkdir(parents=True)
    message = _extension.missing_build_message(str(site_package), installed_dirs=[])
    assert "installed while torch could not be imported" in message
    assert "`pip install --no-build-isolation .`" in message


def test_the_built_tree_itself_is_not_reported_as_another_install(tmp_path):
    # Only other folders with compiled modules count as "the installed build".
    tree = _source_copy_without_builds(tmp_path / "checkout")
    message = _extension.missing_build_message(str(tree / "kdkernels"),
                                               installed_dirs=[str(tree / "kdkernels"), str(tmp_path)])
    assert "shadows" not in message and "is not built" in message
