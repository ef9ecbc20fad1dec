"""A new PEFT family is one module plus a YAML entry: written here as a package of its own (a
module and the entry point that names it, as `pip install` would leave them), it trains and is
evaluated in the tiny config without editing any file of this repository."""
import json
import os
import shutil
import textwrap

import pytest
from run_helpers import metrics, run, tiny_vision_run
from workflow_helpers import REPO

FAMILY_MODULE = '''
"""Output scaling: a learnable per-channel scale on the output of each targeted Linear (starts at 1)."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from mambapeft.peft.registry import ORDER_WRAPPERS, SpecBase, register
from mambapeft.peft.targets import find_modules, replace_module


@dataclass(frozen=True)
class OutputScaleSpec(SpecBase):
    targets: tuple[str, ...] = ("mixer.out_proj",)
    """Linear modules whose outputs are scaled."""


class ScaledLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(base.out_features, device=base.weight.device))

    def forward(self, x):
        return self.base(x) * self.scale


@register("output_scale", spec=OutputScaleSpec, order=ORDER_WRAPPERS + 50)
def apply(model, spec):
    params = []
    for path, base in find_modules(model, list(spec.targets), spec.layers, kinds=(nn.Linear,)).items():
        wrapper = ScaledLinear(base)
        replace_module(model, path, wrapper)
        params.append(wrapper.scale)
    return [spec.group("output_scale", params)]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The family's package on sys.path (here and in subprocesses) and a checkout whose
    vision/methods.yaml has one more entry using it."""
    site = tmp_path / "site"
    (site / "output_scale_family-0.1.dist-info").mkdir(parents=True)
    (site / "output_scale_family.py").write_text(textwrap.dedent(FAMILY_MODULE))
    (site / "output_scale_family-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: output-scale-family\nVersion: 0.1\n")
    (site / "output_scale_family-0.1.dist-info" / "entry_points.txt").write_text(
        "[mambapeft.peft_families]\noutput_scale = output_scale_family\n")
    root = tmp_path / "checkout"
    for folder in ("vision", "language", "workflow/schemas"):
        shutil.copytree(REPO / folder, root / folder)
    with open(root / "vision" / "methods.yaml", "a") as methods:
        methods.write("output_scale:\n  label: Output scaling\n  peft: [{family: output_scale, name: scales, lr_mult: 2}]\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MAMBAPEFT_ROOT", str(root))
    return tmp_path


def test_a_family_in_its_own_package_trains_and_evaluates(plugin):
    spec = tiny_vision_run(plugin / "run", method="output_scale")
    run(spec, plugin / "out")
    record = metrics(plugin / "out")
    assert record["status"] == "ok" and 0 <= record["value"] <= 100
    vim_mini_blocks, d_model = 4, 48
    assert record["trainable_params"] == vim_mini_blocks * d_model  # one out_proj per block (both directions share it)
    groups = {g["group"]: g for g in record["param_groups"]}
    assert groups["scales"]["lr_mult"] == 2 and groups["scales"]["elements"] == record["trainable_params"]
    assert json.loads((plugin / "out" / "train.json").read_text())["config"]["method"]["peft"][0]["family"] == "output_scale"
