"""How far apart the two scan backends are on real block sizes (CUDA kernels vs PyTorch scan),
and the recurrent step mode vs the parallel forward: relative errors of outputs and gradients."""
from __future__ import annotations

import copy

import torch

from ..models import build_model
from ..models.mamba import Mamba
from ..models.scan import CUDA_BACKEND, TORCH_BACKEND


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def block_errors(d_model: int, bidirectional: bool, length: int = 197, batch: int = 2) -> dict:
    torch.manual_seed(0)
    mixer = Mamba(d_model, bidirectional=bidirectional).cuda()
    x = torch.randn(batch, length, d_model, device="cuda")
    runs = []
    for backend in (TORCH_BACKEND, CUDA_BACKEND):
        m = copy.deepcopy(mixer)
        m.backend = backend
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().mean().backward()
        runs.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    grads = {n: _rel(runs[1][2][n], g) for n, g in runs[0][2].items()}
    return {"output": _rel(runs[1][0], runs[0][0]), "input_grad": _rel(runs[1][1], runs[0][1]),
            "max_param_grad": max(grads.values()), "worst_param": max(grads, key=grads.get)}


def step_mode_error(backbone: str = "mamba-130m", length: int = 64, prefill: int = 32) -> dict:
    model = build_model(backbone).cuda().eval()
    for m in model.modules():
        if isinstance(m, Mamba):
            m.backend = CUDA_BACKEND
    ids = torch.randint(0, 50000, (2, length), device="cuda")
    with torch.no_grad():
        full = model(ids)
        states = model.empty_states(2, "cuda")
        model(ids[:, :prefill], states)
        stepped = torch.stack([model._step_token(ids[:, t], t, states) for t in range(prefill, length)], 1)
    return {"backbone": backbone, "logits": _rel(stepped, full[:, prefill:])}


def equivalence_report() -> dict:
    return {"device": torch.cuda.get_device_name(),
            "vim-s block (d=384, bidirectional, L=197)": block_errors(384, True),
            "mamba-130m block (d=768, L=256)": block_errors(768, False, length=256),
            "step mode": step_mode_error()}
