"""How the Triton tests run without a GPU: the interpreter must be chosen before triton is first
imported (triton's own library functions are decorated at that moment), so a normal test run
executes a file's interpreter cases in one child pytest process with TRITON_INTERPRET=1, whose
outcome one parent test reports; the AOT compile checks run in a child without the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")


def interpreter_case(test):
    """A test that runs in the interpreter's child process (not collected in the parent)."""
    return test if INTERPRETING else None


def parent_case(test):
    """A test that runs in the ordinary process (not collected in the interpreter's child)."""
    return None if INTERPRETING else test


def child_env(**extra) -> dict:
    """The environment of a child process: the repository and tests/ importable, no interpreter
    unless `extra` asks for it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_interpreter_cases(test_file: str, *pytest_args: str, timeout: int = 1200) -> str:
    """Runs `test_file`'s interpreter cases (narrowed by `pytest_args`, e.g. "-k", "triton") in a
    child pytest process with TRITON_INTERPRET=1; fails with its output unless they passed, and,
    for a whole file, unless none was skipped (a skipped case would hide a failure). Returns the
    child's summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *pytest_args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout,
                          env=child_env(TRITON_INTERPRET="1"))
    summary = (proc.stdout.strip().splitlines()[-1:] or ["(no output)"])[0]
    print("interpreter cases:", summary)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in summary and (pytest_args or "skipped" not in summary), summary
    return summary


def compile_in_child(script: str) -> None:
    """Runs an ahead-of-time compile `script` (which prints "compiled" at its end) without the
    interpreter."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(),
                          cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def compile_for_gpu(kernel, types: dict, constexprs: dict, *, arch: int, num_warps: int):
    """Compiles the Triton `kernel` for CUDA sm_<arch> without a GPU (run in a compile_in_child
    script). types: the argument types that differ from the defaults, ``*bf16`` for pointers
    (``..._ptr``) and ``fp32`` for scalars. Returns the compiled kernel, whose cubin it checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "*bf16" if p.name.endswith("_ptr")
                                                                       else "fp32") for p in kernel.params}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    assert compiled.asm["cubin"], (kernel.__name__, arch, constexprs)
    return compiled
