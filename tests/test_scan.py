"""The PyTorch selective scan equals a naive sequential float64 loop, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from mambapeft.models.scan import causal_conv1d_torch, resolve_backend, selective_scan_torch, selective_state_step


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """One time step at a time, exactly the recurrence of the Mamba paper (float64)."""
    delta = F.softplus(delta + delta_bias[:, None])
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, 2) + u * D[:, None]) * F.silu(z), state


def rel_err(ours, ref):
    return float(((ours - ref).norm() / ref.norm().clamp_min(1e-30)).detach())


def random_inputs(b, d, length, n, dtype):
    g = torch.Generator().manual_seed(b * 1000 + d * 10 + length + n)
    shapes = [(b, d, length), (b, d, length), (d, n), (b, n, length), (b, n, length), (d,), (b, d, length), (d,)]
    u, delta, A, B, C, D, z, bias = (torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    return u, delta, -torch.exp(A), B, C, D, z, bias


@pytest.fixture(params=["step_by_step", "in_chunks"])
def recurrence(request, monkeypatch):
    """Both ways the PyTorch scan solves its recurrence on a CPU (chosen by the size of a step's block)."""
    from mambapeft.models import scan
    monkeypatch.setattr(scan, "SEQUENTIAL_MIN_BLOCK", 0 if request.param == "step_by_step" else 10**12)
    return request.param


@pytest.mark.parametrize("b,d,length,n", [(2, 8, 1, 4), (2, 8, 2, 16), (3, 16, 65, 8), (2, 16, 197, 4), (1, 4, 100, 3), (2, 4, 256, 16)])
def test_scan_matches_sequential_float64_loop(b, d, length, n, recurrence):
    args = random_inputs(b, d, length, n, torch.float64)
    ref_in = [x.clone().requires_grad_() for x in args]
    our_in = [x.clone().requires_grad_() for x in args]
    y_ref, last_ref = naive_scan(*ref_in)
    u, delta, A, B, C, D, z, bias = our_in
    y, last = selective_scan_torch(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    weights = torch.randn_like(y_ref)
    (y_ref * weights).sum().backward()
    (y * weights).sum().backward()
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(last, last_ref) < 1e-6
    for ours, ref in zip(our_in, ref_in):
        assert rel_err(ours.grad, ref.grad) < 1e-6


def test_scan_float32_close_to_float64(recurrence):
    args = random_inputs(2, 16, 120, 16, torch.float64)
    y64 = selective_scan_torch(*args[:7], args[7], delta_softplus=True)
    y32 = selective_scan_torch(*(x.float() for x in args[:7]), args[7].float(), delta_softplus=True)
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), y64) < 1e-5


def test_large_decays_do_not_overflow(recurrence):
    """exp(-delta*A) of a cumulative product would overflow here; neither way of the scan divides."""
    u, delta, A, B, C, D, z, bias = random_inputs(1, 4, 300, 4, torch.float32)
    y = selective_scan_torch(u, delta * 0 + 30.0, A * 50, B, C, D, z, bias, delta_softplus=True)
    assert torch.isfinite(y).all()


def test_the_recurrence_runs_step_by_step_on_a_cpu_where_a_step_holds_a_large_block():
    """The whole length in one chunk (no chunks carried) from SEQUENTIAL_MIN_BLOCK elements per step, on a
    CPU only; ~sqrt(L) chunks below it, and on a GPU, where every step would be a kernel launch."""
    from mambapeft.models.scan import SEQUENTIAL_MIN_BLOCK, _chunk_length
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert _chunk_length(197, SEQUENTIAL_MIN_BLOCK, cpu) == 197
    assert _chunk_length(17, 32 * 8 * 96, cpu) == 17  # Vim-mini's scan in the default run
    assert _chunk_length(197, SEQUENTIAL_MIN_BLOCK - 1, cpu) == 15
    assert _chunk_length(197, 32 * 8 * 96, gpu) == 15
    assert _chunk_length(256, 1, cpu) == 16


def test_step_matches_scan():
    u, delta, A, B, C, D, z, bias = random_inputs(2, 8, 10, 4, torch.float64)
    y = selective_scan_torch(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    state = u.new_zeros(2, 8, 4)
    steps = [selective_state_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias,
                                  delta_softplus=True) for t in range(10)]
    assert torch.allclose(torch.stack(steps, -1), y, rtol=1e-10, atol=1e-12)


def test_causal_conv_is_causal():
    x = torch.randn(1, 3, 12)
    w, bias = torch.randn(3, 4), torch.randn(3)
    y = causal_conv1d_torch(x, w, bias)
    x2 = x.clone()
    x2[..., 7:] += 1.0  # changing the future must not change the past
    assert torch.equal(causal_conv1d_torch(x2, w, bias)[..., :7], y[..., :7])


def test_backend_resolution_on_cpu(monkeypatch):
    assert resolve_backend("cpu").name == "torch"
    with pytest.raises(ValueError, match="not on a CUDA device"):
        resolve_backend("cpu", "cuda")
    monkeypatch.setenv("MAMBAPEFT_SCAN_BACKEND", "fast")
    with pytest.raises(ValueError, match="Unknown scan backend"):
        resolve_backend("cpu")


def test_reference_kernels_compute_in_fp32_under_autocast():
    """An active bf16 autocast (a CUDA run on the PyTorch fallback) neither lowers the scan's precision
    nor hands its backward mixed dtypes."""
    u, delta, A, B, C, D, z, bias = random_inputs(2, 8, 33, 4, torch.float32)
    plain_in = [x.clone().requires_grad_() for x in (u, delta, B, C)]
    mixed_in = [x.clone().requires_grad_() for x in (u, delta, B, C)]
    plain = selective_scan_torch(plain_in[0], plain_in[1], A, *plain_in[2:], D, z, bias, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = selective_scan_torch(mixed_in[0], mixed_in[1], A, *mixed_in[2:], D, z, bias, delta_softplus=True)
    assert torch.equal(plain, mixed)
    plain.sum().backward()
    mixed.sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain_in, mixed_in))
    state = torch.zeros(2, 8, 4)
    stepped = selective_state_step(state.clone(), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(stepped, selective_state_step(state.clone(), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0],
                                                         D, z[..., 0], bias, True))


def test_lengths_are_padded_to_whole_kernel_blocks_only_where_measured():
    from mambapeft.models.scan import whole_kernel_chunks
    assert [whole_kernel_chunks(n) for n in (197, 256, 64, 100, 40, 1500, 2048, 3000)] == \
        [256, 256, 128, 128, 40, 2048, 2048, 3000]


def test_a_scan_zero_padded_at_the_end_computes_the_same_outputs_and_gradients():
    """padded_to_whole_chunks (what the CUDA scan runs through) around the PyTorch scan: outputs and
    every gradient equal the unpadded scan's; a channel-major input stays channel-major."""
    from mambapeft.models.scan import padded_to_whole_chunks

    torch.manual_seed(0)
    b, d, length, n = 2, 4, 100, 3
    u = torch.randn(d, b, length).transpose(0, 1).requires_grad_()  # channel-major, as the mixer stores it
    delta = torch.randn(b, d, length, requires_grad=True)
    z = torch.randn(b, d, length, requires_grad=True)
    A = (-torch.rand(d, n) - 0.5).requires_grad_()
    B, C = torch.randn(b, n, length, requires_grad=True), torch.randn(b, n, length, requires_grad=True)
    D, bias = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    leaves = (u, delta, z, A, B, C, D, bias)
    seen = []

    def recording_scan(u, *args, **kwargs):
        seen.append((u.shape[-1], u.transpose(0, 1).is_contiguous()))
        return selective_scan_torch(u, *args, **kwargs)

    runs = []
    for scan in (selective_scan_torch, padded_to_whole_chunks(recording_scan)):
        out = scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
        runs.append((out.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    assert seen == [(128, True)]
    (reference, reference_grads), (out, grads) = runs
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)
    # the final state is asked for: no padding (the added steps would move it)
    padded_to_whole_chunks(recording_scan)(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    assert seen[-1][0] == length
