"""Checks shared by the mixer tests: step mode continues a prefilled sequence, the scan backend a
run records for a model, and the ATen operations a call dispatches (each a kernel on a GPU, views and
allocations aside); and a model's mixers put on a scan backend."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mambapeft import runtime
from mambapeft.models.mamba import Mixer


def assert_steps_continue_the_forward(model, ids, prefix: int):
    """Prefilling ``ids[:, :prefix]`` into fresh states and then stepping token by token gives what the
    parallel forward over all of ``ids`` gives for the remaining positions."""
    with torch.no_grad():
        full = model(ids)
        states = model.empty_states(ids.shape[0], "cpu")
        model(ids[:, :prefix], states)
        stepped = torch.stack([model._step_token(ids[:, t], t, states) for t in range(prefix, ids.shape[1])], 1)
    torch.testing.assert_close(stepped, full[:, prefix:], rtol=1e-4, atol=1e-4)


def recorded_backend(monkeypatch, model, resolved) -> str:
    """The backend name a run records for ``model`` on CPU when the scan backend resolves to ``resolved``."""
    monkeypatch.setattr(runtime, "resolve_backend", lambda device, requested: resolved)
    settings = {"scan_backend": "auto", "allow_torch_fallback": False}
    return runtime.select_backend(model, torch.device("cpu"), settings)


class OpNames(TorchDispatchMode):
    """Records the name of each ATen operation dispatched inside ``with OpNames() as ops:`` in ``ops.names``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def set_backend(model, backend):
    """``model``, with every mixer (and so every block's fused add + norm) running on ``backend``."""
    for m in model.modules():
        if isinstance(m, Mixer):
            m.backend = backend
    return model
