"""The examples run (each in its own process, as a user would run them) and say what they did;
the HF trainer benchmark runs at a tiny size and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "examples")

pytest.importorskip("transformers")


def run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("script, expected", [
    ("plain_loop.py", "step 9: loss"),
    ("hf_kd_trainer.py", "step 4: loss"),
    ("hf_compute_loss_func.py", "losses:"),
    ("trl_gkd_swap.py", "step 5: generalized JSD"),
    ("torch_compile.py", "fused_linear_kd_loss: 0 graph breaks"),
])
def test_example_runs(script, expected):
    if script.startswith("hf_"):
        pytest.importorskip("accelerate")  # transformers.Trainer needs it
    assert expected in run([os.path.join(EXAMPLES, script)])


def test_hf_trainer_benchmark_smoke():
    pytest.importorskip("accelerate")
    out = run(["-m", "benchmarks.hf_trainer", "--vocab", "300", "--layers", "1", "--hidden", "64", "--seq", "16",
               "--batch", "2", "--repeat", "1", "--warmup", "0", "--threads", "1"])
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("kdkernels", "eager"))}
    assert set(rows) == {"kdkernels", "eager"}
    for row in rows.values():
        float(row[1])  # a measured median, not "n/a"
