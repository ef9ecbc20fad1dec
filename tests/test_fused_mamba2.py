"""Mamba-2's fused path (a backend's ``split_conv1d_scan``, mamba_ssm's
mamba_split_conv1d_scan_combined on CUDA) computes what the unfused chain computes, and only mixers
whose conv1d, gated norm and out_proj no method touches take it. Here with the PyTorch reference of
the fused function; tests/test_gpu.py runs the CUDA one."""

import pytest
import torch
from mixer_helpers import assert_steps_continue_the_forward, recorded_backend
from test_fused_inner import _mixers, assert_fused_equals_unfused
from test_mamba2 import MEMBER_METHODS, YAML_METHODS, members

from mambapeft.models import build_model
from mambapeft.models.mamba2 import Mamba2
from mambapeft.models.scan import TORCH_BACKEND, ScanBackend, split_conv1d_scan_torch
from mambapeft.peft import apply_peft

FUSED_TORCH = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d,
                          split_conv1d_scan=split_conv1d_scan_torch)
# methods that leave conv1d, norm and out_proj plain (in_proj wrappers and A_log/dt_bias deltas are
# upstream of the kernel or read through the parameters; a LoRA folded into out_proj's weight is read
# through that weight)
FUSED = {"zero_shot", "full", "lora_in_proj", "lorap_x", "prefix", "periodic", "lorap_z", "lorap_B", "lorap_C",
         "lorap_dt", "partial_direct", "lorap_B_and_partial_A", "lora_out_proj",
         "partial"}  # deltas parametrising conv1d's weight and bias, read through the parametrisation


def _adapted(method: str):
    torch.manual_seed(0)
    model = build_model("mamba2-mini", vocab_size=64)
    result = apply_peft(model, members(method), method)
    with torch.no_grad():  # non-zero updates: a skipped adapter would change the output
        for p in result.trainable.values():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", YAML_METHODS + sorted(MEMBER_METHODS))
def test_fused_path_equals_the_unfused_chain_for_every_mamba2_method(method):
    inputs = torch.randint(0, 64, (2, 40))  # longer than mamba2-mini's chunk of 16
    assert_fused_equals_unfused(_adapted(method), FUSED_TORCH, inputs, method in FUSED, method)


def test_a_hook_wrapper_or_odd_conv_width_keeps_the_unfused_chain():
    mixer = Mamba2(32, d_state=8, headdim=16)
    mixer.backend = FUSED_TORCH
    assert mixer.uses_fused_inner()
    handle = mixer.norm.register_forward_hook(lambda module, args, out: out * 2)
    assert not mixer.uses_fused_inner()
    handle.remove()
    mixer.out_proj = torch.nn.Sequential(mixer.out_proj)
    assert not mixer.uses_fused_inner()
    odd = Mamba2(32, d_state=6, headdim=16)  # conv channels 64 + 12: causal-conv1d's kernel needs multiples of 8
    odd.backend = FUSED_TORCH
    assert not odd.uses_fused_inner()


def test_step_mode_after_a_prefill_continues_the_fused_sequence():
    """Generation prefills with a state (the unfused chain, which fills it) and then steps."""
    model = _adapted("lora_in_proj")
    for m in _mixers(model):
        m.backend = FUSED_TORCH
    assert_steps_continue_the_forward(model, torch.randint(0, 64, (2, 40)), 25)


def test_the_recorded_backend_says_the_fused_path_ran(monkeypatch):
    model = build_model("mamba2-mini", vocab_size=64)
    assert recorded_backend(monkeypatch, model, FUSED_TORCH) == "torch-fused"
