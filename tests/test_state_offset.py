"""State-offset tuning: the extra output term equals an offset added to the state a naive per-step
recurrence reads, in both scan directions, in step mode, and on the fused path (the offset read with
the state inside our short scan: here its PyTorch reference) only where it can be read raw."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from mixer_helpers import assert_steps_continue_the_forward

from mambapeft.models import build_model
from mambapeft.models.mamba import FORWARD, Mamba
from mambapeft.models.scan import TORCH_BACKEND, ScanBackend, mamba_inner_torch
from mambapeft.peft import PeftConfigError, apply_peft
from mambapeft.peft.state_offset import StateOffsetSpec
from mambapeft.peft.state_offset import apply as add_offsets

STATE_OFFSET = [{"family": "state_offset"}]


def _with_offsets(mixer: Mamba) -> Mamba:
    """The mixer with random (trained-looking) offsets in every direction."""
    with torch.no_grad():
        for group in add_offsets(mixer, StateOffsetSpec()):
            for p in group.params:
                p.normal_()
    return mixer


def _naive_direction(mixer: Mamba, xz: torch.Tensor, d) -> torch.Tensor:
    """xz: (B, 2*D_inner, L) -> y (B, D_inner, L) from a per-step loop: the output reads h_t + h'."""
    x, z = xz.chunk(2, dim=1)
    conv = getattr(mixer, d.conv1d)
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=mixer.d_conv - 1, groups=mixer.d_inner)[..., :x.shape[-1]])
    dt, B, C = getattr(mixer, d.x_proj)(x.transpose(1, 2)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], -1)
    delta = F.softplus(getattr(mixer, d.dt_proj)(dt))  # (B, L, D_inner)
    A = -torch.exp(getattr(mixer, d.A_log))
    offset = mixer.state_offsets[d.key].offset
    h = x.new_zeros(x.shape[0], mixer.d_inner, mixer.d_state)
    ys = []
    for t in range(x.shape[-1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[..., t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h + offset, C[:, t]) + getattr(mixer, d.D) * x[..., t])
    return torch.stack(ys, -1) * F.silu(z)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_output_term_equals_an_offset_in_the_state_of_a_naive_recurrence(bidirectional):
    mixer = _with_offsets(Mamba(16, d_state=4, bidirectional=bidirectional).double())
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    xz = mixer.in_proj(hidden).transpose(1, 2)
    y = _naive_direction(mixer, xz, FORWARD)
    if bidirectional:
        y = (y + _naive_direction(mixer, xz.flip(-1), mixer.directions[1]).flip(-1)) / 2
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), mixer.out_proj(y.transpose(1, 2)))


def test_step_mode_continues_the_parallel_forward():
    model = build_model("mamba-mini", vocab_size=64).eval()
    for m in model.modules():
        if isinstance(m, Mamba):
            _with_offsets(m)
    assert_steps_continue_the_forward(model, torch.randint(0, 64, (2, 16)), 10)


FUSES_OFFSETS = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch,
                            takes_state_offset=lambda xz, n_states: xz.shape[-1] <= 12)  # as if for short inputs


def test_a_mixer_with_an_offset_fuses_only_where_its_offset_is_read_raw():
    """The fused path with offsets: only on a backend whose fused function takes them, for the inputs it
    takes them for, and where the offset module stands for its call (a hook on it keeps the chain)."""
    mixer = Mamba(16, d_state=4)
    mixer.backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch)
    assert mixer.uses_fused_inner()
    _with_offsets(mixer)
    assert not mixer.uses_fused_inner()  # this backend's fused function takes no offset
    mixer.backend = FUSES_OFFSETS
    assert mixer.uses_fused_inner() and mixer.uses_fused_inner(torch.zeros(2, 64, 12))
    assert not mixer.uses_fused_inner(torch.zeros(2, 64, 13))  # an input it takes no offset for
    handle = mixer.state_offsets[FORWARD.key].register_forward_hook(lambda module, args, out: out)
    assert not mixer.uses_fused_inner()
    handle.remove()
    assert mixer.uses_fused_inner()


@pytest.mark.parametrize("backbone", ["vim-mini", "mamba-mini"])
@pytest.mark.parametrize("length_fuses", [True, False])
def test_the_fused_path_with_offsets_trains_as_the_chain(backbone, length_fuses):
    """Every mixer's offsets read by the fused function (both Vim directions, affix-free) give the
    chain's output and every gradient, the offsets' included; an input the fused function takes no
    offset for runs the chain (here: 17 steps of Vim-mini, 12 tokens of the language mini)."""
    from test_fused_inner import assert_fused_equals_unfused

    torch.manual_seed(0)
    vision = backbone == "vim-mini"
    model = build_model(backbone, **({"num_classes": 4} if vision else {"vocab_size": 64}))
    apply_peft(model, STATE_OFFSET, "state_offset")
    for m in model.modules():
        if isinstance(m, Mamba):
            _with_offsets(m)
    steps = 17 if vision else 12  # Vim-mini: 16 patches + the class token
    backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch,
                          takes_state_offset=lambda xz, n_states: length_fuses and xz.shape[-1] == steps)
    inputs = torch.randn(2, 3, 32, 32) if vision else torch.randint(0, 64, (2, 12))
    calls = []
    fused_backend = dataclasses.replace(backend,
                                        mamba_inner=lambda *a, **k: calls.append(k) or mamba_inner_torch(*a, **k))
    assert_fused_equals_unfused(model.eval(), fused_backend, inputs, True, backbone)
    assert bool(calls) == length_fuses and all("state_offset" in k for k in calls)


def test_with_additional_scan_the_offset_covers_the_extended_state():
    model = build_model("mamba-mini", vocab_size=64)
    apply_peft(model, [{"family": "state_offset"}, {"family": "additional_scan", "n": 2}], "both")
    mixer = next(m for m in model.modules() if isinstance(m, Mamba))
    assert mixer.state_offsets[FORWARD.key].offset.shape == (mixer.d_inner, mixer.d_state + 2)
    model(torch.randint(0, 64, (2, 7))).sum().backward()


def test_with_additional_scan_the_fused_path_takes_the_offset_of_the_extended_state():
    """Both on the fused path: x_proj's weight and A extended, the offset over the extended state; the
    backend asked whether it takes an offset for the extended count; the chain's output and gradients."""
    from test_fused_inner import assert_fused_equals_unfused

    torch.manual_seed(0)
    model = build_model("vim-mini", num_classes=4)
    apply_peft(model, [{"family": "additional_scan", "n": 2}, {"family": "state_offset"}], "both")
    for m in model.modules():
        if isinstance(m, Mamba):
            _with_offsets(m)
    asked = []
    backend = ScanBackend("torch", TORCH_BACKEND.selective_scan, TORCH_BACKEND.causal_conv1d, mamba_inner_torch,
                          takes_state_offset=lambda xz, n_states: asked.append(n_states) or True)
    assert_fused_equals_unfused(model.eval(), backend, torch.randn(2, 3, 32, 32), True, "additional_scan+state_offset")
    mixer = next(m for m in model.modules() if isinstance(m, Mamba))
    assert set(asked) == {mixer.d_state + 2}


def test_an_offset_needs_mamba1_mixers():
    with pytest.raises(PeftConfigError, match="Mamba-1"):
        apply_peft(build_model("mamba2-mini", vocab_size=64), STATE_OFFSET, "state_offset")



def test_state_offset_and_prodial_train_and_evaluate_on_cpu(tmp_path):
    """The training and evaluation jobs of one method with both 2025 families (one round trip for
    CI's time) on a bidirectional Vim: an offset per block and direction, ProDiaL on both projections."""
    from run_helpers import metrics, run, tiny_vision_run

    spec = tiny_vision_run(tmp_path / "run", method="state_offset")
    spec["method"]["peft"] += [{"family": "prodial", "name": "prodial", "rank": 4}]
    run(spec, tmp_path / "out")
    record = metrics(tmp_path / "out")
    blocks, d_model, d_inner, d_state = 4, 48, 96, 8
    offsets = blocks * 2 * d_inner * d_state
    prodial = blocks * (1 + 4) * ((d_model + 2 * d_inner) + (d_inner + d_model))  # (D_b diagonal + s) + rank 4 B A
    assert record["status"] == "ok" and record["trainable_params"] == offsets + prodial
