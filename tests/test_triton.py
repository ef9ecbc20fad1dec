"""Our Triton kernels compile for the GPU they run on (sm_90, an H100/H200: PTX, then ptxas to a
cubin, both in Triton's wheel), on this CPU machine: the other tests run them in Triton's
interpreter (conftest.py), which executes their Python but not the compiler's lowering, so a kernel
that only fails to compile would otherwise show first on the GPU machine. And Triton stays optional:
without it the package imports and trains (the quickstart installs none)."""
import os
import subprocess
import sys
import textwrap

import pytest

# kernel -> (argument types where they are not bf16 pointers (``*_ptr``) or int32 scalars, constexprs)
KERNELS = {
    "mambapeft.models.conv_triton:_conv_fwd_kernel": (
        {"w_ptr": "*fp32", "b_ptr": "*fp32"},
        {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "BLOCK_D": 16, "BLOCK_L": 256}),
    "mambapeft.models.conv_step_triton:_conv_update_kernel": (
        {"weight_ptr": "*fp32", "bias_ptr": "*fp32"},
        {"WIDTH": 4, "BLOCK_WIDTH": 4, "BLOCK": 256, "HAS_BIAS": True, "SILU": True}),
    "mambapeft.models.norm_triton:_rms_normed_kernel": (
        {"x_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32"}, {"BLOCK_M": 4, "BLOCK_N": 1024}),
    "mambapeft.models.dropout_triton:_dropout_kernel": (
        {"seed_ptr": "*i64", "b_out_ptr": "*fp32", "p": "fp32", "scale": "fp32"}, {"HAS_B": True, "QUARTER": 512}),
    "mambapeft.train.cross_entropy_triton:_cross_entropy_fwd_kernel": (
        {"targets_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32"}, {"VOCAB": 50280, "BLOCK_V": 4096}),
    "mambapeft.train.cross_entropy_triton:_cross_entropy_bwd_kernel": (
        {"targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32"}, {"VOCAB": 50280, "BLOCK_V": 4096}),
}

COMPILE = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, (types, constexprs) in json.loads(sys.argv[1]).items():
        module, kernel = name.split(":")
        fn = getattr(importlib.import_module(module), kernel)
        default = {p.name: "*bf16" if p.name.endswith("_ptr") else "i32" for p in fn.params}
        signature = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, default[p.name]) for p in fn.params}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        print(name, len(compiled.asm["cubin"]), flush=True)
""")


def test_every_triton_kernel_compiles_to_a_cubin_for_sm90():
    pytest.importorskip("triton", reason="Triton has wheels for Linux only")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default today, said explicitly (3.9 warns otherwise)
    run = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(KERNELS)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())
    assert compiled.keys() == KERNELS.keys() and all(int(size) > 0 for size in compiled.values())


WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
    import torch
    from mambapeft.models import build_model
    from mambapeft.peft import apply_peft
    from mambapeft.peft.registry import discover_families
    from mambapeft.runspec import method_definition
    import mambapeft.train.language

    discover_families()  # imports every family module, as every job that builds a method does
    model = build_model("mamba-mini", vocab_size=64).train()
    apply_peft(model, method_definition("language", "lora_in_proj", "mamba-mini", None)["peft"], "lora_in_proj")
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    print("ok")
""")


def test_the_package_trains_where_triton_is_not_installed():
    """The quickstart installs no Triton (a CPU torch wheel does not bring it): our kernels' modules are
    optional imports, never imported by a module that everything imports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
