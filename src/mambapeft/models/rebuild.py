"""Autograd saves of one tensor kept as a way to rebuild it, not as the tensor.

A pre-norm block's normalised input is saved by whatever in its mixer needs it for a backward
(LoRA's down-projection on in_proj: 32 MiB a layer at mamba-1.4b, micro-batch 32 x 256 tokens),
while the norm itself keeps the fp32 residual and 1/rms it was computed from. Inside
:func:`rebuilt_when_saved`, a save of that tensor, or of any view of it, keeps a zero-argument
``rebuild`` instead (PyTorch's ``saved_tensors_hooks``), called again in the backward; ``rebuild``
must return the tensor bit for bit (``scan.add_rms_norm_cuda`` and ``add_rms_norm_torch`` give one).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch


class _Rebuilt:
    """A saved view of the rebuilt tensor: its size, stride and offset in that tensor's storage."""

    def __init__(self, rebuild: Callable[[], torch.Tensor], view: torch.Tensor):
        self.rebuild, self.size, self.stride, self.offset = rebuild, view.size(), view.stride(), view.storage_offset()

    def __call__(self) -> torch.Tensor:
        return self.rebuild().as_strided(self.size, self.stride, self.offset)


def _whole_storage(tensor: torch.Tensor) -> bool:
    """Contiguous over all of its storage: every view of its storage is a view of it."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


@contextlib.contextmanager
def rebuilt_when_saved(tensor: torch.Tensor, rebuild: Callable[[], torch.Tensor] | None) -> Iterator[None]:
    """Saves of ``tensor`` (contiguous over its whole storage) or of a view of it, made inside, keep
    ``rebuild`` instead. A save after ``tensor`` was changed in place is kept as usual (autograd then
    reports the change, as it would). No-op when ``rebuild`` is None or nothing records a graph."""
    if rebuild is None or not torch.is_grad_enabled() or not _whole_storage(tensor):
        yield
        return
    # pack runs on every save in the block (Python, in an eager step), so it compares identities; it
    # holds a weak reference: autograd keeps a pack hook as long as what it saved
    root = weakref.ref(tensor if tensor._base is None else tensor._base)
    version, dtype = tensor._version, tensor.dtype

    def pack(saved: torch.Tensor):
        target = root()  # alive inside the context (the caller holds the tensor)
        if (target is not None and (saved is target or saved._base is target) and saved.dtype == dtype
                and saved._version == version):
            return _Rebuilt(rebuild, saved)
        # detached: the tensor itself, where an op saves its own output, would hold that op's node from its
        # own save, a cycle through C++ that no collection frees where the node never runs backward (a
        # value detached in the forward, as DoRA's column norms: each eager Vim-S step kept ~290 MiB of
        # activations on one H200). Unpacking gives autograd's own grad_fn back (pytorch/pytorch#153049)
        return saved.detach()

    def unpack(packed):
        return packed() if isinstance(packed, _Rebuilt) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def checked(rebuild: Callable[[], torch.Tensor], *sources: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``rebuild``, raising as autograd does when one of ``sources`` (the tensors it reads) has been
    changed in place since: it would no longer rebuild the saved values."""
    versions = [source._version for source in sources]

    def run() -> torch.Tensor:
        if any(source._version != version for source, version in zip(sources, versions)):
            raise RuntimeError("one of the tensors a saved activation is rebuilt from has been modified by an "
                               "inplace operation since it was saved")
        return rebuild()

    return run
