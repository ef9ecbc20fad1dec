"""tests/cuda_emulation.{h,py}: the CPU emulation that runs our CUDA kernels' tests where there is no GPU.
What those tests rely on, checked on small kernels written here: thread and block indices, warp
shuffles, barriers and shared memory behave as on a GPU, a float atomic adds, a deadlock at the
barriers is an error (not a hang), a compile error names the kernel, and the package's kernels load
through nvrtc's interface."""
from __future__ import annotations

import pytest
import torch

import cuda_emulation
from mambapeft.models import nvrtc, scan_short

cuda_emulation.skip_without_a_compiler()

# each block sums its threads' values: over each warp by a butterfly of shuffles, then the warps' sums
# through shared memory after a barrier; thread 0 adds the block's sum to out[blockIdx.y] atomically,
# and every thread writes what its warp's butterfly left it
SUMS = r"""
extern "C" __global__ void sums(const float* __restrict__ values, float* __restrict__ out,
                                float* __restrict__ warp_sums) {
    __shared__ float partial[THREADS / 32];
    const int i = blockIdx.y * gridDim_x * THREADS + blockIdx.x * THREADS + threadIdx.x;
    float v = values[i];
    for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
    warp_sums[i] = v;
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float block = 0.f;
        for (int w = 0; w < THREADS / 32; ++w) block += partial[w];
        atomicAdd(out + blockIdx.y, block);
    }
}
"""

# thread 0 leaves before the barrier the others wait at
DEADLOCK = r"""
extern "C" __global__ void stuck(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}
"""


def _kernel(source: str, name: str, *options: str) -> cuda_emulation.EmulatedKernel:
    return cuda_emulation.EmulatedKernel(cuda_emulation.library(source, options, (name,)), name)


def test_shuffles_barriers_shared_memory_and_atomics_sum_as_on_a_gpu():
    threads, blocks_x, blocks_y = 64, 3, 2
    kernel = _kernel(SUMS, "sums", f"-DTHREADS={threads}", f"-DgridDim_x={blocks_x}")
    values = torch.randn(blocks_y, blocks_x, threads)
    out, warp_sums = torch.zeros(blocks_y), torch.empty(blocks_y, blocks_x, threads)
    kernel(grid=(blocks_x, blocks_y, 1), block=(threads, 1, 1), args=[values, out, warp_sums])
    expected_warps = values.view(blocks_y, blocks_x, threads // 32, 32).sum(-1, keepdim=True).expand(-1, -1, -1, 32)
    torch.testing.assert_close(warp_sums, expected_warps.reshape(warp_sums.shape))  # every lane of a warp: its sum
    torch.testing.assert_close(out, values.sum((1, 2)))  # every block of a row added to its row's sum


def test_a_deadlock_at_the_barriers_is_an_error_not_a_hang():
    kernel = _kernel(DEADLOCK, "stuck")
    with pytest.raises(RuntimeError, match="stuck deadlocked at its barriers"):
        kernel(grid=(1, 1, 1), block=(32, 1, 1), args=[torch.zeros(32)])


def test_a_compile_error_names_the_kernel_and_the_compilers_message():
    with pytest.raises(RuntimeError, match=r"(?s)broken did not compile for the CPU emulation.*undefined_name"):
        cuda_emulation.library('extern "C" __global__ void broken() { undefined_name; }', (), ("broken",))


def test_gpu_tensors_are_refused():
    kernel = _kernel(DEADLOCK, "stuck")
    meta = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="takes CPU tensors, got one on meta"):
        kernel(grid=(1, 1, 1), block=(32, 1, 1), args=[meta])


def test_the_package_kernels_load_through_nvrtcs_interface(monkeypatch):
    """Under ``emulated`` the package's own wrappers run the kernel file on CPU tensors: a 16-state scan
    of one step, whose output (no z, D 0, zero state before) is C . B dt u with dt = softplus(delta)."""
    cuda_emulation.emulated(monkeypatch)
    u, delta = torch.full((1, 32, 1), 2.0), torch.full((1, 32, 1), 0.5)
    A, B, C = -torch.ones(32, 16), torch.full((1, 16, 1), 0.25), torch.full((1, 16, 1), 3.0)
    out, out_z, kept = scan_short.forward(u, delta, A, B, C, None, None, None, True)
    dt = torch.nn.functional.softplus(torch.tensor(0.5))
    torch.testing.assert_close(out, torch.full((1, 32, 1), float(16 * 3.0 * 0.25 * dt * 2.0)))
    assert out_z is None and kept is None and nvrtc.load_kernels is cuda_emulation.load_kernels
