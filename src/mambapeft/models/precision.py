"""Parameter dtypes: frozen Linear weights stored in bf16 for bf16-autocast training; the SSM's
A_log and D kept in fp32 in a model cast to bf16 (as mamba_ssm keeps them).

Under ``torch.autocast(dtype=bfloat16)`` every ``nn.Linear`` casts its fp32 weight and bias to bf16
on each call, and a frozen weight's bf16 copy is kept for the backward pass (autocast's weight
cache only holds tensors that require grad). Storing those frozen tensors in bf16 once gives the
same matmuls bit for bit, without the cast kernels and without holding both copies: for
Mamba-1.4b (1.26 B such weights) 2.5 GB of storage and 2.5 GB of per-step copies less (measured
on an H100, LoRA(in_proj) at 4 x 256 tokens: peak 11.5 -> 6.8 GiB).

Only weights whose every use is a plain ``nn.Linear`` forward qualify. Kept in fp32: trainable
tensors (the optimizer updates fp32 masters), biases (a fused mixer kernel reads dt_proj's bias in
fp32; they are small), norms, A_log, D, convolutions and embeddings (used outside autocast's
casts), weights a LoRA folds its update into (``W + delta`` must round once), parametrised weights
(``original + delta``) and weights shared with an embedding (tied LM heads).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


def _folded_bases(model: nn.Module) -> set[int]:
    """ids of the Linears whose weight a wrapper reads directly instead of calling them: a wrapper
    says so with ``folds_weight_of()`` (a LoRA folding a merged-style or DoRA update into ``W``)."""
    return {id(base) for m in model.modules() if hasattr(m, "folds_weight_of") for base in m.folds_weight_of()}


def frozen_linear_parameters(model: nn.Module) -> list[nn.Parameter]:
    """fp32 weights that require no grad and enter the model only through a plain Linear's forward."""
    uses: dict[int, list[tuple[nn.Module, str]]] = {}  # id -> every (module, attribute) holding it
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            uses.setdefault(id(p), []).append((module, name))
            params[id(p)] = p
    folded = _folded_bases(model)

    def plain_linear_weight(module: nn.Module, name: str) -> bool:
        return (name == "weight" and type(module) is nn.Linear and id(module) not in folded
                and not parametrize.is_parametrized(module))

    return [p for key, p in params.items() if not p.requires_grad and p.dtype == torch.float32
            and all(plain_linear_weight(*use) for use in uses[key])]


def store_frozen_linears_in_bf16(model: nn.Module) -> int:
    """Convert :func:`frozen_linear_parameters` to bf16 in place; returns how many elements moved.

    Only for models that run under bf16 autocast: outside it, a bf16 weight meets fp32 inputs.
    """
    moved = 0
    with torch.no_grad():
        for p in frozen_linear_parameters(model):
            p.data = p.data.to(torch.bfloat16)
            moved += p.numel()
    return moved


SSM_FP32_PARAMETERS = ("A_log", "D")  # mamba_ssm's Mamba creates these in fp32 whatever the model dtype


def keep_ssm_parameters_in_fp32(model: nn.Module) -> None:
    """After ``model.to(bfloat16)``: A_log and D of every mixer back in fp32, as mamba_ssm's own
    modules keep them. Every scan and step reads them in fp32, so in bf16 each generation step would
    otherwise spend one cast kernel per layer on A_log (measured: 1 of the ~11 kernels of a
    mamba-130m decode step on an H200, 7% of its GPU time)."""
    with torch.no_grad():
        for module in model.modules():
            for name in SSM_FP32_PARAMETERS:
                parameter = module._parameters.get(name)
                if parameter is not None and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
