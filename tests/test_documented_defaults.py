"""The defaults the README states, checked against the code: the public signatures, the
backend_info() keys, the fused-linear chunk budget, the trainer's output folder and demo preset,
the torch pin. A change to either side fails here until the other follows."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re

import pytest

import kdkernels
from kdkernels.train import __main__ as trainer_cli
from kdkernels.train import experiments

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def readme() -> str:
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def _documented_signature(readme: str, qualified_name: str) -> inspect.Signature:
    """The signature the README's API block writes as a line starting ``kdkernels.<name>(``,
    parsed as Python."""
    pattern = re.compile(r"^" + re.escape(qualified_name) + r"\(", re.M)
    match = pattern.search(readme)
    assert match, f"README shows no signature of {qualified_name}"
    depth, end = 0, match.end() - 1
    for end in range(match.end() - 1, len(readme)):
        depth += {"(": 1, ")": -1}.get(readme[end], 0)
        if depth == 0:
            break
    parameters = readme[match.end():end]
    function = ast.parse(f"def documented({parameters}): pass").body[0]
    arguments = function.args
    result = []
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + arguments.defaults
    for arg, default in zip(positional, defaults):
        result.append(inspect.Parameter(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=inspect.Parameter.empty if default is None
                                        else ast.literal_eval(default)))
    for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        result.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=inspect.Parameter.empty if default is None
                                        else ast.literal_eval(default)))
    return inspect.Signature(result)


@pytest.mark.parametrize("name", ["kd_loss", "cakd_loss", "dkd_loss"])
def test_readme_signatures_match_the_code(readme, name):
    documented = _documented_signature(readme, f"kdkernels.{name}")
    actual = inspect.signature(getattr(kdkernels, name))
    assert list(documented.parameters) == list(actual.parameters)
    for parameter in documented.parameters.values():
        code = actual.parameters[parameter.name]
        assert (parameter.kind, parameter.default) == (code.kind, code.default), parameter.name


def test_readme_backend_info_sample_has_the_keys_backend_info_returns(readme):
    sample = re.search(r">>> kdkernels\.backend_info\(\)\n(\{.*?\})\n", readme, re.S)
    assert sample, "README shows no backend_info() sample"
    documented = ast.literal_eval(sample.group(1))
    info = kdkernels.backend_info()
    assert info["cpu_build"] is not None, "the sample shows a loaded CPU build"
    assert set(documented) == set(info)


def _fused_linear_module():
    for name in ("kdkernels.ops.fused_linear", "kdkernels.fused_linear"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "DEFAULT_CHUNK_BYTES"):
            return module
    raise AssertionError("no module holds the fused-linear chunk budget")


def test_readme_chunk_budget_matches_the_code(readme):
    stated = re.search(r"memory budget \((\d+) MiB of per-chunk logits and gradient on CPU, (\d+) GiB on CUDA, "
                       r"but at least (\d+)\s+rows", readme)
    assert stated, "README states no chunk budget"
    cpu_mib, cuda_gib, min_rows = (int(value) for value in stated.groups())
    module = _fused_linear_module()
    assert module.DEFAULT_CHUNK_BYTES["cpu"] == cpu_mib * MIB
    assert module.DEFAULT_CHUNK_BYTES["cuda"] == cuda_gib * 1024 * MIB
    assert module.MIN_CHUNK_ROWS == min_rows
    example = re.search(r"(\d+) tokens at V=(\d+) fp32 are (\d+)\s+chunks of (\d+) rows", readme)
    assert example, "README gives no balanced-chunk example"
    tokens, vocab, chunks, rows = (int(value) for value in example.groups())
    # fp32 student and teacher logits per row (the gradient is written over the student's)
    assert module.chunk_rows(tokens, vocab, 2 * 4, "cpu") == rows
    assert -(-tokens // rows) == chunks


def test_readme_trainer_output_folder_is_the_default(readme):
    stated = re.search(r"`--out` \(default `([^`]+)`\)", readme)
    assert stated, "README states no default --out"
    assert os.path.normpath(stated.group(1)) == os.path.normpath(trainer_cli.DEFAULT_OUT)
    assert trainer_cli.build_parser().parse_args([]).out == trainer_cli.DEFAULT_OUT


def test_readme_demo_preset_is_the_default_preset(readme):
    stated = re.search(r"a (\d+)×(\d+) teacher trained for (\d+) steps.*?then a (\d+)×(\d+) student for (\d+) steps",
                       readme, re.S)
    assert stated, "README does not describe the default demo"
    t_layers, t_width, t_steps, s_layers, s_width, s_steps = (int(value) for value in stated.groups())
    preset = experiments.PRESETS["default"]
    assert (preset.teacher.layers, preset.teacher.d_model, preset.teacher_optim.steps) == (t_layers, t_width, t_steps)
    assert (preset.student.layers, preset.student.d_model, preset.student_optim.steps) == (s_layers, s_width, s_steps)
    assert (preset.temperature, preset.kd_weight) == (1.0, 0.5)  # the table's "T=1 λ=0.5"
    assert re.search(rf"\| kd \| {s_layers}x{s_width} \| KD forward_kl T=1 λ=0.5 \|", readme)


def test_readme_torch_pin_is_the_requirements_pin(readme):
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as handle:
        pins = [line.strip() for line in handle if line.startswith("torch==")]
    assert len(pins) == 1
    assert f"`{pins[0]}`" in readme
