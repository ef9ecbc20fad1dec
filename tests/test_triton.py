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
        {"WIDTH": 4, "HAS_BIAS": True, "SILU": True, "REVERSE": True, "BLOCK_D": 16, "BLOCK_L": 256}),
    "mambapeft.models.conv_step_triton:_conv_update_kernel": (
        {"weight_ptr": "*fp32", "bias_ptr": "*fp32"},
        {"WIDTH": 4, "BLOCK_WIDTH": 4, "BLOCK": 256, "HAS_BIAS": True, "SILU": True}),
    "mambapeft.models.norm_triton:_rms_normed_kernel": (
        {"x_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32"}, {"BLOCK_M": 4, "BLOCK_N": 1024}),
    "mambapeft.models.norm_triton:_rms_norm_bwd_kernel": (
        {"x_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": "*fp32", "dres_ptr": "*fp32", "dres_in_ptr": "*fp32",
         "dw_ptr": "*fp32"},
        {"HAS_DRESIDUAL": True, "STORE_DRESIDUAL": True, "WEIGHT_GRAD": True, "BLOCK_M": 8, "BLOCK_N": 512}),
    "mambapeft.models.dropout_triton:_dropout_kernel": (
        {"seed_ptr": "*i64", "b_out_ptr": "*fp32", "p": "fp32", "scale": "fp32"}, {"HAS_B": True, "QUARTER": 512}),
    "mambapeft.models.scaled_weight_triton:_scaled_weight_kernel": (
        {"w_ptr": "*fp32", "r_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 1024}),
    "mambapeft.models.scaled_weight_triton:_scaled_weight_bwd_kernel": (
        {"g_ptr": "*fp32", "w_ptr": "*fp32", "r_ptr": "*fp32", "s_ptr": "*fp32", "ds_ptr": "*fp32",
         "column_sums_ptr": "*fp32"}, {"BLOCK_ROWS": 16, "BLOCK_COLS": 128}),
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

    def compiled(name, types, constexprs, **options):
        module, kernel = name.split(":")
        fn = getattr(importlib.import_module(module), kernel)
        default = {p.name: "*bf16" if p.name.endswith("_ptr") else "i32" for p in fn.params}
        signature = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, default[p.name]) for p in fn.params}
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
""")
ALL_KERNELS = COMPILE + textwrap.dedent("""
    for name, (types, constexprs) in json.loads(sys.argv[1]).items():
        print(name, len(compiled(name, types, constexprs).asm["cubin"]), flush=True)
""")
FMAS = COMPILE + textwrap.dedent("""
    (name, (types, constexprs)), = json.loads(sys.argv[1]).items()
    LAUNCH = importlib.import_module(name.split(":")[0]).LAUNCH  # the options the kernel's module launches it with
    for options in (LAUNCH, {key: value for key, value in LAUNCH.items() if key != "enable_fp_fusion"}):
        print(compiled(name, types, constexprs, **options).asm["ptx"].count("fma.rn.f32"))
""")


def _fmas(name: str, default_fusion: str) -> tuple[int, int]:
    """The fp32 FMAs in the PTX of kernel ``name`` compiled with its module's launch options, and without
    their enable_fp_fusion, Triton's default contraction on ("1") or off ("0")."""
    with_launch_options, without_the_option = _compile_run(FMAS, {name: KERNELS[name]}, default_fusion).split()
    return int(with_launch_options), int(without_the_option)


def _compile_run(script: str, kernels: dict, default_fusion: str = "1") -> str:
    """stdout of ``script`` run on ``kernels`` in a subprocess that compiles (no interpreter), FMA
    contraction on by default or not (``TRITON_DEFAULT_FP_FUSION``; Triton 3.9 warns where it is unset)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["TRITON_DEFAULT_FP_FUSION"] = default_fusion
    run = subprocess.run([sys.executable, "-c", script, json.dumps(kernels)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_every_triton_kernel_compiles_to_a_cubin_for_sm90():
    pytest.importorskip("triton", reason="Triton has wheels for Linux only")
    compiled = dict(line.rsplit(" ", 1) for line in _compile_run(ALL_KERNELS, KERNELS).splitlines())
    assert compiled.keys() == KERNELS.keys() and all(int(size) > 0 for size in compiled.values())


def test_the_conv_forward_is_launched_with_fused_multiply_adds():
    """Its launch options contract its multiply-adds to FMAs (as nvcc compiles causal-conv1d, whose output
    it equals bit for bit on the GPU: tests/test_gpu.py) where Triton's default does not, as Triton 3.10's
    will not: compiled with contraction off by default, its PTX has FMAs, and none without the option."""
    pytest.importorskip("triton", reason="Triton has wheels for Linux only")
    with_launch_options, without_the_option = _fmas("mambapeft.models.conv_triton:_conv_fwd_kernel", "0")
    assert with_launch_options > 0 and without_the_option == 0


@pytest.mark.parametrize("kernel", ["_scaled_weight_kernel", "_scaled_weight_bwd_kernel"])
def test_prodials_scaled_weight_is_launched_without_fused_multiply_adds(kernel):
    """Its launch options keep each product rounded before its sum, as PyTorch's chain computes s (W + W r)
    (the forward's output bit for bit the chain's: tests/test_prodial.py), where Triton's default contracts:
    compiled with contraction on by default, its PTX has no FMA, and FMAs without the option."""
    pytest.importorskip("triton", reason="Triton has wheels for Linux only")
    with_launch_options, without_the_option = _fmas(f"mambapeft.models.scaled_weight_triton:{kernel}", "1")
    assert with_launch_options == 0 and without_the_option > 0


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
