"""`mambapeft bench profile`: GPU kernels sorted into families by name (names as the H200 profiles of a
Vim-S and a Mamba-1.4b step print them), per-step sums, the Markdown record, and the CPU error."""
import json

import pytest

from mambapeft.bench.profile import (
    KERNEL_FAMILIES,
    OTHER,
    KernelTime,
    family_breakdown,
    kernel_rows,
    kernel_family,
    markdown,
    write_reports,
)
from mambapeft.cli import main as cli

COPY = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
        "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#10}>")
NAMES = {
    "void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<32, 16, 1, true, false, true>>": "selective scan backward (mamba-ssm)",
    "void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 8, 1, true, false, true>>": "selective scan forward (mamba-ssm)",
    "scan_bwd": "selective scan backward (ours, scan_short.cu)",
    "scan_fwd": "selective scan forward (ours, scan_short.cu)",
    "conv_bwd": "causal conv1d",
    "_chunk_scan_fwd_kernel": "Mamba-2 chunked scan (mamba-ssm SSD)",
    "void causal_conv1d_bwd_kernel<Causal_conv1d_bwd_kernel_traits<128, 4, true, true>>": "causal conv1d",
    "_conv_fwd_kernel": "causal conv1d",
    "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN": "GEMM",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>": "GEMM",
    "void implicit_convolve_sgemm<__nv_bfloat16, __nv_bfloat16, 1024, 5, 5, 3, 3, 3, 1, false>": "patch embedding (convolution)",
    "_layer_norm_bwd_kernel": "residual add + RMSNorm",
    "_rms_normed_kernel": "residual add + RMSNorm",
    "_rms_norm_bwd_kernel": "residual add + RMSNorm",
    "_dropout_kernel": "LoRA dropout",
    "_cross_entropy_fwd_kernel": "cross-entropy",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::PointwiseOpScalarFunctor<float, 4, 4, 0>>":
        "optimizer (foreach kernels)",
    COPY: "copies: casts, layout, padding, cat, flip",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
    "unsigned int, 3, 128, 1>": "copies: casts, layout, padding, cat, flip",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<...flip_kernel...>>":
        "copies: casts, layout, padding, cat, flip",
    "Memcpy DtoD (Device -> Device)": "copies: casts, layout, padding, cat, flip",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul>>":
        "copies: casts, layout, padding, cat, flip",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()>>": "reductions",
    "void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<c10::BFloat16, c10::BFloat16, "
    "c10::BFloat16, at::native::binary_internal::MulFunctor<float>>>": "other elementwise",
    "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long, long, long, long, bool)":
        "embedding lookup",
    "some_kernel_nobody_named": OTHER,
}


@pytest.mark.parametrize("name", NAMES)
def test_kernels_fall_in_their_family(name):
    assert kernel_family(name) == NAMES[name]


def test_every_family_is_reachable():
    assert set(NAMES.values()) == {family for family, _ in KERNEL_FAMILIES} | {OTHER}


def test_breakdown_sums_families_per_step_most_time_first():
    kernels = [KernelTime("void selective_scan_bwd_kernel<x>", 3000.0, 6), KernelTime(COPY, 500.0, 30),
               KernelTime("Memcpy DtoD (Device -> Device)", 700.0, 3), KernelTime("nvjet_sm90_a", 800.0, 9)]
    rows = family_breakdown(kernels, steps=3)
    assert [r["family"] for r in rows] == ["selective scan backward (mamba-ssm)",
                                          "copies: casts, layout, padding, cat, flip", "GEMM"]
    copies = rows[1]
    assert copies["ms"] == pytest.approx(1200.0 / 1e3 / 3) and copies["calls"] == 11
    assert copies["kernels"] == ["Memcpy DtoD (Device -> Device)", COPY]  # most time first
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_kernels_are_listed_most_launches_first_with_their_family():
    kernels = [KernelTime("nvjet_sm90_a", 800.0, 9), KernelTime(COPY, 500.0, 30), KernelTime("scan_bwd", 3000.0, 9)]
    rows = kernel_rows(kernels, steps=3)
    assert [r["kernel"] for r in rows] == [COPY, "scan_bwd", "nvjet_sm90_a"]  # launches, then time
    assert rows[0] == {"kernel": COPY, "family": "copies: casts, layout, padding, cat, flip", "calls": 10,
                       "ms": pytest.approx(500.0 / 1e3 / 3)}


def test_report_files_and_table(tmp_path):
    report = {"backbone": "vim-s", "method": "lorap_x", "backend": "cuda", "batch": 32, "tokens_per_sequence": None,
              "device": "NVIDIA H200", "profiled_steps": 2, "wall_ms": 60.0, "gpu_ms": 1.5, "launches": 12,
              "families": family_breakdown([KernelTime("nvjet_a|b", 3000.0, 24)], steps=2),
              "kernels": kernel_rows([KernelTime("nvjet_a|b", 3000.0, 24)], steps=2)}
    path = write_reports([report], tmp_path)
    assert path == tmp_path / "NVIDIA_H200.vim-s.profile.json"
    assert json.loads(path.read_text())["reports"][0]["families"][0]["ms"] == 1.5
    table = (tmp_path / "NVIDIA_H200.vim-s.profile.md").read_text()
    assert table == markdown([report])
    assert "## vim-s lorap_x, 32 images (NVIDIA H200, backend cuda)" in table
    assert "| GEMM | 1.50 | 100.0% | 12 | `nvjet_a/b` |" in table  # a | in a name would split the row
    assert "| 12 | 1.500 | GEMM | `nvjet_a/b` |" in table  # the kernels' table
    without = {key: value for key, value in report.items() if key != "kernels"}  # a report before kernel_rows
    assert "Kernels, most launches" not in markdown([without])


def test_a_graphed_report_is_named_and_labelled_apart(tmp_path):
    """A graphed profile's files sit beside the eager one's (``-cuda_graphs``), its table says so; a report
    written before the option (no ``cuda_graphs`` key) reads as eager."""
    report = {"backbone": "vim-s", "method": "lorap_x", "backend": "cuda", "batch": 32, "tokens_per_sequence": None,
              "device": "NVIDIA H200", "profiled_steps": 2, "wall_ms": 18.0, "gpu_ms": 1.5, "launches": 12,
              "families": family_breakdown([KernelTime("nvjet_a", 3000.0, 24)], steps=2), "cuda_graphs": True}
    path = write_reports([report], tmp_path)
    assert path == tmp_path / "NVIDIA_H200.vim-s-cuda_graphs.profile.json"
    table = (tmp_path / "NVIDIA_H200.vim-s-cuda_graphs.profile.md").read_text()
    assert "## vim-s lorap_x, 32 images (NVIDIA H200, backend cuda, CUDA graphs)" in table
    assert "18.0 ms wall (CUDA graphs), 1.5 ms of GPU kernels in 12 launches per step." in table
    old = {key: value for key, value in report.items() if key != "cuda_graphs"}
    assert "18.0 ms wall (eager)" in markdown([old]) and "CUDA graphs" not in markdown([old])


def test_profile_passes_cuda_graphs_on(monkeypatch, tmp_path):
    from mambapeft.bench import profile

    asked = []

    def report_of(domain, method, backbone, batch, steps, cuda_graphs):
        asked.append((method, cuda_graphs))
        return {"backbone": backbone, "method": method, "backend": "cuda", "batch": batch, "tokens_per_sequence": None,
                "device": "Test GPU", "profiled_steps": steps, "wall_ms": 1.0, "gpu_ms": 1.0, "launches": 1,
                "families": [], "cuda_graphs": cuda_graphs}

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(profile, "profile_report", report_of)
    assert cli(["bench", "profile", "--backbone", "vim-mini", "--methods", "lorap_x", "--cuda-graphs",
                "--out", str(tmp_path)]) == 0
    assert asked == [("lorap_x", True)]
    assert (tmp_path / "Test_GPU.vim-mini-cuda_graphs.profile.json").exists()


def test_report_files_carry_the_runs_provenance(tmp_path):
    report = {"backbone": "vim-s", "method": "full", "backend": "cuda", "batch": 32, "tokens_per_sequence": None,
              "device": "NVIDIA H200", "profiled_steps": 1, "wall_ms": 60.0, "gpu_ms": 1.0, "launches": 1,
              "families": family_breakdown([KernelTime("nvjet_a", 1000.0, 1)], steps=1)}
    source = {"started_utc": "2026-12-02 05:14", "source_sha256": "ab" * 32, "git_commit": "a3fcf8b" + "0" * 33,
              "git_changed": True}
    path = write_reports([report], tmp_path, source)
    assert json.loads(path.read_text())["provenance"] == source
    assert ("Started 2026-12-02 05:14 UTC; source sha256 abababababababab (`mambapeft bench source-digest`; "
            "git a3fcf8b000, files changed since).") in (tmp_path / "NVIDIA_H200.vim-s.profile.md").read_text()


def test_profile_without_a_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli(["bench", "profile", "--backbone", "vim-mini"]) == 2
    assert "no CUDA device is visible here" in capsys.readouterr().err


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_report_of_a_step(monkeypatch, cuda_graphs):
    """profile_report's record around the profiler (which needs a GPU: stood in for here); the step built
    eager or graphed as asked."""
    from mambapeft.bench import profile, train

    built = []

    def language_step(method, backbone, batch, length, graphed):
        built.append(graphed)
        return None, None, "cuda-fused", None

    monkeypatch.setattr(train, "_language_step", language_step)
    monkeypatch.setattr(profile, "timed_calls", lambda step, n, device: [0.5] * 3 + [0.03, 0.01, 0.02])
    monkeypatch.setattr(profile, "device_name", lambda device: "Test GPU" if device.type == "cuda" else "cpu")
    monkeypatch.setattr(profile, "profiled_kernels", lambda step, steps: [KernelTime("nvjet_a", 3000.0, 6 * steps)])
    report = profile.profile_report("language", "lora_in_proj", "mamba-1.4b", 32, steps=3, cuda_graphs=cuda_graphs)
    assert built == [cuda_graphs] and report["cuda_graphs"] == cuda_graphs
    assert report["wall_ms"] == pytest.approx(20.0)  # the median after the warm-up steps
    assert report["gpu_ms"] == pytest.approx(1.0) and report["launches"] == 6
    assert (report["device"], report["backend"], report["tokens_per_sequence"]) == ("Test GPU", "cuda-fused", 256)
    assert report["families"][0]["family"] == "GEMM"
    assert report["kernels"] == [{"kernel": "nvjet_a", "family": "GEMM", "calls": 6, "ms": pytest.approx(1.0)}]
