"""LoRA family: low-rank updates on Linear, Conv2d (patch embedding) and Embedding modules.

Two application styles, as in MambaPEFT:
  * ``activation``: ``base(x) + s * up(dropout(down(x)))`` (in_proj, X/Z halves, out_proj, embed);
  * ``merged``: ``x @ (W + s * up.weight @ down.weight)^T``, no dropout (x_proj, its dt/B/C rows,
    dt_proj; SLL LoRA's out_proj/x_proj).
``part`` restricts the update to a named block of output rows of a mixer projection (Mamba-1: the X
or Z half of in_proj, the dt, B or C rows of x_proj; Mamba-2: the z, x, B, C or dt rows of in_proj),
which is how LoRA_p(X), LoRA_p(B)... are defined; :data:`ROW_BLOCKS` holds the layouts.
``dora`` re-normalises the updated weight per input column (DoRA), with a trainable magnitude, on
every kind of target: a Linear's (in) columns, a patch-embedding Conv2d's (in x k x k) columns and
an Embedding's rows (the columns of the Linear it is on one-hot inputs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.mamba import BACKWARD, FORWARD, Mamba, Mixer, plain, unhooked
from ..models.mamba2 import Mamba2
from ..models.scan import gemm_dtype, linear_on_columns, scaled_operand, weight_gradient
from .registry import ORDER_WRAPPERS, ParamGroup, PeftConfigError, SpecBase, register
from .targets import find_modules, fold_wrappers, owning_mixer, plain_linear, replace_module

try:  # the dropout and down-projection as one node keeping x and a seed (CUDA; None without Triton)
    from ..models.dropout_triton import MAX_ELEMENTS as _DROPOUT_MAX_ELEMENTS
    from ..models.dropout_triton import dropout_linear as _dropout_linear
    from ..models.dropout_triton import seeded_dropout, seeded_dropout_pair
except ImportError:  # pragma: no cover - depends on the machine
    _dropout_linear = seeded_dropout = seeded_dropout_pair = None
    _DROPOUT_MAX_ELEMENTS = 0

STYLES = ("activation", "merged")


def dora_rescaled(magnitude: torch.Tensor, updated: torch.Tensor, dim: int) -> torch.Tensor:
    """DoRA: ``updated`` with its L2 norm along ``dim`` replaced by ``magnitude``; the norm is a
    constant in the backward pass (as in the original code)."""
    return magnitude * updated / updated.norm(p=2, dim=dim, keepdim=True).detach()


def dora_magnitude(weight: torch.Tensor, dim: int) -> nn.Parameter:
    """The trainable DoRA magnitude of a pretrained ``weight``: its L2 norm along ``dim``."""
    return nn.Parameter(weight.detach().float().norm(p=2, dim=dim))


@dataclass(frozen=True)
class LoraSpec(SpecBase):
    targets: tuple[str, ...] = ()
    """Modules to adapt: exact path, dotted suffix (``mixer.in_proj``) or ``re:<regex>``."""
    rank: int = 8
    """Bottleneck width (the original code's ``dim_*``)."""
    scale: float = 1.0
    """Multiplier of the low-rank update (the original's ``s_*``; there is no alpha/rank)."""
    dropout: float = 0.0
    """Dropout on the adapter input (activation style only)."""
    style: str = "activation"
    """``activation`` or ``merged`` (see module docstring)."""
    part: str | None = None
    """Named row block of a mixer projection: Mamba-1 in_proj x|z, x_proj(_b) dt|B|C; Mamba-2 in_proj z|x|B|C|dt."""
    dora: bool = False
    """Weight-decomposed LoRA: trainable per-column magnitude of the updated weight."""
    embedding_init_std: float = 1.0
    """Std of the down-projection of an Embedding target (SLL LoRA uses N(0, 1))."""

    def __post_init__(self):
        super().__post_init__()
        if not self.targets:
            raise ValueError("lora needs at least one entry in `targets`")
        if self.rank < 1:
            raise ValueError(f"lora `rank` must be >= 1, got {self.rank}")
        if self.style not in STYLES:
            raise ValueError(f"lora `style` must be one of {STYLES}, got {self.style!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora `dropout` must be in [0, 1), got {self.dropout}")
        if self.style == "merged" and self.dropout:
            raise ValueError("lora `dropout` only applies to style `activation` (merged updates have none)")


class LowRankUpdate(nn.Module):
    """One low-rank update of output rows [start, stop) of a Linear.

    down (kaiming-uniform, no bias) -> up (zeros): the update is exactly zero at init.
    """

    def __init__(self, in_features: int, rows: tuple[int, int], spec: LoraSpec, base_weight: torch.Tensor):
        super().__init__()
        self.rows, self.style, self.scale = rows, spec.style, spec.scale
        self.lora_down = nn.Linear(in_features, spec.rank, bias=False, device=base_weight.device)
        self.lora_up = nn.Linear(spec.rank, rows[1] - rows[0], bias=False, device=base_weight.device)
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(spec.dropout)
        self.magnitude = None
        if spec.dora:  # DoRA: magnitude of each input column of the adapted rows, from the pretrained W
            self.magnitude = dora_magnitude(self._block(base_weight), dim=0)

    def _block(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[self.rows[0]:self.rows[1]]

    @property
    def acts_on_weight(self) -> bool:
        """True when the update is folded into the weight (merged style or DoRA)."""
        return self.style == "merged" or self.magnitude is not None

    def block_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        """Update of the adapted rows: (stop - start, in_features)."""
        delta = self.scale * self.lora_up.weight @ self.lora_down.weight
        if self.magnitude is None:
            return delta
        block = self._block(base_weight)
        return dora_rescaled(self.magnitude, block + delta, dim=0) - block

    @property
    def dropout_p(self) -> float:
        """The dropout rate a call applies now: 0 in eval mode."""
        return self.dropout.p if self.dropout.training else 0.0

    def _down_plain(self) -> bool:
        """The dropout and the down-projection plain: nothing on them is skipped by reading their weights."""
        return plain(self.dropout, nn.Dropout) and plain(self.lora_down, nn.Linear)

    def seeds_dropout_on(self, x: torch.Tensor) -> bool:
        """Whether this update's active dropout on x can draw its mask from a seed (Triton, on a contiguous
        CUDA x), with the dropout and the down-projection plain."""
        return (_dropout_linear is not None and x.is_cuda and self.dropout_p > 0 and x.is_contiguous()
                and x.numel() < _DROPOUT_MAX_ELEMENTS and self._down_plain())

    def reads_as_weights(self, x: torch.Tensor) -> bool:
        """Whether s up(down(dropout(x))) may be computed from the two weights (a fused node): activation
        style, both Linears and the dropout plain, the dropout inactive or drawn from a seed."""
        return (not self.acts_on_weight and self._down_plain() and plain(self.lora_up, nn.Linear)
                and (self.dropout_p == 0 or self.seeds_dropout_on(x)))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``lora_down(dropout(x))``: (..., in) -> (..., r). With the dropout active on a contiguous CUDA
        x, and both modules plain (nothing on them skipped), one node that keeps x and its mask's seed,
        not the dropped x and the mask (``models/dropout_triton.py``; its own draws, same distribution)."""
        if self.seeds_dropout_on(x):
            return _dropout_linear(x, self.lora_down.weight, self.dropout.p)
        return self.lora_down(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation style: x (..., in) -> (..., stop - start)."""
        return self.scale * self.lora_up(self.down(x))


def updated_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    updates: list[LowRankUpdate]) -> torch.Tensor:
    """A Linear of ``weight`` (out, in) and ``bias`` on x (..., in) plus the activation-style ``updates`` of
    its rows (their dropout drawn as their forward draws it), as (out, N), N = x.numel() // in: the
    output :meth:`LoraLinear.channel_major` (and ProDiaL's) hands models/mamba.py's ``linear_channel_major``."""
    rows = x.reshape(-1, x.shape[-1]).t()  # (in, N)

    def down(u):  # (r, N)
        return u.down(x).reshape(-1, u.lora_down.out_features).t()

    def padding(u):  # zero rows above and below the update's block
        return u.rows[0], weight.shape[0] - u.rows[1]

    # an update of all rows first, else one of a block: padded to all rows, since an in-place update
    # of a block makes autograd copy the whole output's gradient (a clone and a copy of Vim-S's xz
    # gradient per layer for LoRAp(X)) where the padding costs a GEMM of twice the rows at rank r
    first = next((u for u in updates if u.rows == (0, weight.shape[0])), updates[0] if updates else None)
    if first is None:
        out = linear_on_columns(weight, bias, rows)
    else:  # scale folded into up, so the gradient reaching the update is the output's, uncopied; in
        # place (addmm_, which autocast leaves alone: the operands cast here as it casts them), as
        # torch.addmm copied the update into a new output first (65 us a layer at mamba-1.4b's in_proj)
        up = F.pad(first.scale * first.lora_up.weight, (0, 0, *padding(first)))
        out = linear_on_columns(up, bias, down(first))
        out = out.addmm_(weight.to(out.dtype), rows.to(out.dtype))
    for u in updates:
        if u is first:
            continue
        up, low = u.lora_up.weight.to(out.dtype), down(u).to(out.dtype)
        if u.rows == (0, out.shape[0]):
            out = torch.addmm(out, up, low, alpha=u.scale)
        else:  # in place on its block (the frozen GEMM's output is not saved for its backward)
            out[u.rows[0]:u.rows[1]].addmm_(up, low, alpha=u.scale)
    return out


class LoraLinear(nn.Module):
    """Wraps ``base`` (kept as ``self.base``) with one or more low-rank updates, keyed by the output
    part they adapt (``full``, ``x``, ``z``, ``dt``, ``B``, ``C``), so LoRA(in_proj) and LoRA_p(X)
    can adapt the same projection in one hybrid method."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.updates = nn.ModuleDict()

    def add(self, key: str, update: LowRankUpdate, path: str) -> None:
        if key in self.updates:
            raise PeftConfigError(f"{path} already has a LoRA update on part {key!r}; "
                                  "two members of one method adapt the same rows")
        self.updates[key] = update

    def _padding(self, update: LowRankUpdate) -> tuple[int, int]:
        return update.rows[0], self.base.out_features - update.rows[1]

    def _weight(self, updates) -> torch.Tensor:
        weight = self.base.weight
        for u in updates:
            weight = weight + F.pad(u.block_delta(self.base.weight), (0, 0, *self._padding(u)))
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + all updates (what a fused kernel must be given; equals the
        activation-style output exactly when dropout is inactive)."""
        return self._weight(self.updates.values())

    @property
    def bias(self):
        return self.base.bias

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """A plain Linear with every update folded into its weight (equal outputs in eval mode)."""
        return plain_linear(self.base, self.weight, self.base.bias)

    def folds_weight_of(self) -> list[nn.Linear]:
        """The base Linear when an update is folded into its weight (read directly, not called):
        its frozen weight must then stay fp32 (models/precision.py), so ``W + delta`` rounds once."""
        return [self.base] if any(u.acts_on_weight for u in self.updates.values()) else []

    def _called_as_written(self) -> bool:
        """Nothing hooked on this module, its base or its updates, and the base a plain Linear: a call
        computes what :meth:`forward` says."""
        update_parts = [m for u in self.updates.values() for m in (u, *u.children())]
        return plain(self, LoraLinear) and plain(self.base, nn.Linear) and all(map(unhooked, update_parts))

    def reads_as_linear(self) -> bool:
        """Whether :attr:`weight` and :attr:`bias` stand for this module's call, so that a fused kernel
        may read them instead of calling it (models/mamba.py ``read_as_linear``): every update folded
        into the weight (merged style or DoRA: no dropout, no activation-style term) and nothing hooked."""
        return self._called_as_written() and all(u.acts_on_weight for u in self.updates.values())

    def _sole_update_on_frozen_base(self, x: torch.Tensor) -> LowRankUpdate | None:
        """The update where this module's call (:meth:`_called_as_written`, which the callers check first) is
        what :class:`_FrozenPlusLowRank` computes on x: one activation-style update (its dropout inactive
        or drawn from a seed on x) on a frozen Linear; else None."""
        updates, base = list(self.updates.values()), self.base
        if (len(updates) == 1 and updates[0].reads_as_weights(x)
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)):
            return updates[0]
        return None

    def channel_major(self, x: torch.Tensor) -> torch.Tensor | None:
        """This module on x (..., in) as (out, N), N = x.numel() // in: the transposed output, for
        models/mamba.py's ``linear_channel_major``, in place of the (N, out) output, the scaled and
        padded update, their sum and a transposed copy (at mamba-1.4b's in_proj, five passes over a
        32 x 256 x 8192 tensor). One update is computed first, of all rows (a block update's
        up-projection padded with zero rows), and the frozen GEMM accumulates onto it in place (its
        epilogue reads it: no pass of its own); any other update is added to its rows by one more GEMM.
        Dropout draws its mask on x as :meth:`forward` does (:meth:`LowRankUpdate.down`). None where it
        would not equal :meth:`forward` call for call: a hook on any part, or a wrapped base."""
        if not self._called_as_written():
            return None
        base = self.base
        sole = self._sole_update_on_frozen_base(x)
        if sole is not None:
            return _FrozenPlusLowRank.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, sole.lora_down.weight,
                                            sole.lora_up.weight, sole.scale, sole.dropout_p, sole.rows[0])
        updates = list(self.updates.values())
        return updated_columns(x, self._weight([u for u in updates if u.acts_on_weight]), base.bias,
                               [u for u in updates if not u.acts_on_weight])

    def from_channel_major(self, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
        """This module on y's transpose times ``scale``, y (B, in, L) stored channel-major ((in, B, L), as the
        fused mixer function writes its output): (B, L, out), as ``self((y * scale).transpose(1, 2))``, for
        out_proj (models/mamba.py ``call_channel_major``; Vim: ``scale`` 1/2, its directions averaged). One
        node where one activation-style update sits on a frozen Linear (:class:`_FrozenPlusLowRank` on y's
        columns), in place of the scaled copy of y, PyTorch's dropout on its transposed view (a mask kept,
        ~60 us a layer's backward at Vim-S) and the update's add; else None (the module is called)."""
        if not self._called_as_written():
            return None
        columns = columns_of(y)
        sole = self._sole_update_on_frozen_base(columns)
        return None if sole is None else update_on_columns(y, columns, self.base.weight, self.base.bias, sole, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        folded = [u for u in self.updates.values() if u.acts_on_weight]
        out = F.linear(x, self._weight(folded), self.base.bias) if folded else self.base(x)
        for u in self.updates.values():
            if not u.acts_on_weight:
                out = out + F.pad(u(x), self._padding(u))
        return out


class _FrozenPlusLowRank(torch.autograd.Function):
    """:meth:`LoraLinear.channel_major` of one activation-style update on a frozen Linear, as one node:
    the frozen GEMM writes the output (out, N), and the update's GEMM adds s up low^T to its rows in
    place, low = down(dropout(x)) (N, r); the backward runs only the GEMMs the gradients need (the
    update's rows of the output's gradient; x's (N, in) written contiguous, not transposed and copied),
    the dropout's mask drawn again from its seed with x's gradient added in the same pass. (Autograd's
    graph of the same padded the update to all rows, had the frozen GEMM read that back, and copied
    x's gradient twice: six kernels a layer more at Vim-S LoRAp(X); results/benchmarks/HISTORY.md has the step times.)
    With ``columns`` (:meth:`LoraLinear.from_channel_major`) the same transposed: x given as (in, N)
    columns, the output (N, out) token-major, x's gradient (in, N); the module called on x times
    ``input_scale``, which is folded into the frozen GEMM's operand and up's scale (Vim's 1/2: exact).

    Shapes: x (N, in) (autograd keeps it, rebuilt from a norm's saves where models/rebuild.py applies),
    weight (out, in): frozen, or a function of trained tensors whose gradient is then returned (ProDiaL's
    s W D_b: one GEMM more in the backward), bias (out,) or None, frozen; down (r, in), up (rows, r), rows
    [start, start + rows) of the output; p: the dropout rate (0: none; else drawn from a seed: CUDA,
    Triton), its mask drawn over x as stored."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, down, up, scale, p, start, columns=False, input_scale=1.0):
        dtype, down_dtype = gemm_dtype(x), down.dtype
        seed = torch.randint(2**31 - 1, (1,), device=x.device) if p else None
        dropped = seeded_dropout(x, seed, p, dtype) if p else x.to(dtype)
        down = down.to(dtype)  # kept so: the backward's GEMMs read it again
        low = _as_rows(dropped, columns) @ down.t()  # (N, r)
        # the scale rounded into up once, as autocast casts s up
        up_scaled = scaled_operand(up, scale * input_scale, dtype)
        operand, bias = scaled_operand(weight, input_scale, dtype), None if bias is None else bias.to(dtype)
        stop = start + up.shape[0]
        if columns:
            out = F.linear(x.to(dtype).t(), operand, bias)  # (N, out)
            out[:, start:stop].addmm_(low, up_scaled.t())
        else:
            out = linear_on_columns(operand, bias, x.to(dtype).t())  # (out, N)
            out[start:stop].addmm_(up_scaled, low.t())
        ctx.save_for_backward(x, weight, down, up_scaled, low, seed)
        ctx.p, ctx.start, ctx.scale, ctx.down_dtype, ctx.up_dtype = p, start, scale * input_scale, down_dtype, up.dtype
        ctx.weight_dtype = weight.dtype
        ctx.columns, ctx.input_scale = columns, input_scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, weight, down, up_scaled, low, seed = ctx.saved_tensors
        want_x, want_weight, _, want_down, want_up = ctx.needs_input_grad[:5]
        columns, stop = ctx.columns, ctx.start + up_scaled.shape[0]
        block = grad[:, ctx.start:stop].t() if columns else grad[ctx.start:stop]  # (rows, N)
        dx = dweight = ddown = dup = None
        if want_weight:  # (out, N) @ (N, in), times the input's scale the operand took
            dweight = weight_gradient(grad.t() if columns else grad, _as_rows(x, columns).to(grad.dtype),
                                      ctx.weight_dtype, ctx.input_scale)
        if want_up:  # through the scale in up's dtype, as autograd takes it back through s up
            dup = weight_gradient(block, low, ctx.up_dtype, ctx.scale)
        dlow = block.t() @ up_scaled if want_x or want_down else None  # (N, r)
        dropped = None
        if want_x:  # in x's layout: (in, N) columns, else (N, in)
            operand = scaled_operand(weight, ctx.input_scale, grad.dtype)
            dx = (operand.t() @ grad.t() if columns else grad.t() @ operand).to(x.dtype)
            spread = down.t() @ dlow.t() if columns else dlow @ down
            if ctx.p:  # the dropped x and x's gradient, the mask drawn once for both
                dropped, dx = seeded_dropout_pair(x, spread, seed, ctx.p, grad.dtype, x.dtype, added_to=dx)
            else:
                dx += spread
        if want_down:
            if dropped is None:
                dropped = seeded_dropout(x, seed, ctx.p, grad.dtype) if ctx.p else x.to(grad.dtype)
            ddown = weight_gradient(dlow.t(), _as_rows(dropped, columns), ctx.down_dtype)
        return dx, dweight, None, ddown, dup, None, None, None, None, None


def columns_of(y: torch.Tensor) -> torch.Tensor:
    """y (B, in, L) stored channel-major ((in, B, L), as the fused mixer function writes it) as (in, B*L)
    columns: a view."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def update_on_columns(y: torch.Tensor, columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      update: LowRankUpdate, scale: float) -> torch.Tensor:
    """A Linear of ``weight`` and ``bias`` plus ``update`` (activation style, read as its weights: the
    caller checks :meth:`LowRankUpdate.reads_as_weights` on ``columns``) on (y * scale)'s transpose, y (B,
    in, L) channel-major and ``columns`` its :func:`columns_of`: (B, L, out), one :class:`_FrozenPlusLowRank`
    node on the columns (``from_channel_major``: LoRA's on a frozen Linear, ProDiaL's on s W D_b)."""
    out = _FrozenPlusLowRank.apply(columns, weight, bias, update.lora_down.weight, update.lora_up.weight,
                                   update.scale, update.dropout_p, update.rows[0], True, scale)
    return out.unflatten(0, (y.shape[0], y.shape[2]))


def _as_rows(t: torch.Tensor, columns: bool) -> torch.Tensor:
    """t as (N, in): itself, or the transposed view of (in, N) columns."""
    return t.t() if columns else t


class LoraConv2d(nn.Module):
    """Patch-embedding adapter: Conv2d(in, r, k, stride, no bias) -> dropout -> Conv2d(r, out, 1) (zeros);
    with DoRA, one convolution with the re-normalised weight (W + s * up @ down) (no dropout, as Linear DoRA)."""

    def __init__(self, base: nn.Conv2d, spec: LoraSpec):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_down = nn.Conv2d(base.in_channels, spec.rank, base.kernel_size, base.stride,
                                   base.padding, bias=False, device=device)
        self.lora_up = nn.Conv2d(spec.rank, base.out_channels, 1, bias=False, device=device)
        nn.init.zeros_(self.lora_up.weight)
        self.dropout, self.scale = nn.Dropout(spec.dropout), spec.scale
        # DoRA: magnitude of each (in, kh, kw) column of the pretrained kernel seen as (out, in*k*k)
        self.magnitude = dora_magnitude(base.weight.flatten(1), dim=0) if spec.dora else None

    def _dora_weight(self) -> torch.Tensor:
        weight = self.base.weight.flatten(1)  # (out, in*k*k)
        delta = self.scale * self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)
        return dora_rescaled(self.magnitude, weight + delta, dim=0).view_as(self.base.weight)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """One Conv2d: the 1x1 up-projection composed with the down-projection is a kernel of the base's shape."""
        merged = nn.Conv2d(self.base.in_channels, self.base.out_channels, self.base.kernel_size, self.base.stride,
                           self.base.padding, bias=self.base.bias is not None, device=self.base.weight.device,
                           dtype=self.base.weight.dtype)
        if self.magnitude is not None:
            merged.weight.copy_(self._dora_weight())
        else:
            delta = self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)  # (out, in*kh*kw)
            merged.weight.copy_(self.base.weight + self.scale * delta.view_as(self.base.weight))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, D, H/p, W/p)."""
        if self.magnitude is not None:
            return F.conv2d(x, self._dora_weight(), self.base.bias, self.base.stride, self.base.padding)
        return self.base(x) + self.scale * self.lora_up(self.dropout(self.lora_down(x)))


class LoraEmbedding(nn.Module):
    """``base(ids) + s * embedding(ids, A) @ B`` with A ~ N(0, std), B = 0 (SLL LoRA's EmbedAdapter);
    with DoRA each looked-up row is re-normalised to its token's trainable magnitude."""

    def __init__(self, base: nn.Embedding, spec: LoraSpec):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_down = nn.Parameter(torch.randn(base.num_embeddings, spec.rank, device=device) * spec.embedding_init_std)
        self.lora_up = nn.Parameter(torch.zeros(spec.rank, base.embedding_dim, device=device))
        self.scale = spec.scale
        self.magnitude = dora_magnitude(base.weight, dim=1) if spec.dora else None  # (num_embeddings,)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @torch.no_grad()
    def folded(self) -> nn.Embedding:
        """A plain Embedding whose rows include the update. A head tied to the base weight keeps the
        pretrained rows (``peft/merge.py`` unties it first), as the adapter model's head does."""
        merged = nn.Embedding(self.base.num_embeddings, self.base.embedding_dim, device=self.base.weight.device,
                              dtype=self.base.weight.dtype)
        rows = self.base.weight + self.scale * self.lora_down @ self.lora_up
        merged.weight.copy_(rows if self.magnitude is None else dora_rescaled(self.magnitude[:, None], rows, dim=-1))
        return merged

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) -> (B, L, D)."""
        rows = self.base(ids) + self.scale * F.embedding(ids, self.lora_down) @ self.lora_up
        if self.magnitude is None:
            return rows
        return dora_rescaled(F.embedding(ids, self.magnitude[:, None]), rows, dim=-1)  # row norms: (B, L, 1)


def _mamba1_x_proj(m: Mamba) -> dict[str, int]:
    return {"dt": m.dt_rank, "B": m.d_state, "C": m.d_state}


# The named row blocks of a mixer projection's output, in order, with their sizes:
# {mixer type: {projection: sizes(mixer)}}. The single place that knows the layouts LoRA_p adapts.
ROW_BLOCKS: dict[type[Mixer], dict[str, Callable[[Mixer], dict[str, int]]]] = {
    Mamba: {"in_proj": lambda m: {"x": m.d_inner, "z": m.d_inner},
            FORWARD.x_proj: _mamba1_x_proj, BACKWARD.x_proj: _mamba1_x_proj},
    Mamba2: {"in_proj": lambda m: {"z": m.d_inner, "x": m.d_inner, "B": m.ngroups * m.d_state,
                                   "C": m.ngroups * m.d_state, "dt": m.nheads}},
}


def row_blocks(mixer: Mixer, projection: str) -> dict[str, tuple[int, int]]:
    """Named row blocks [start, stop) of ``mixer``'s ``projection`` output; {} where it has none."""
    # by class hierarchy: a parametrised mixer (partial tuning) is a subclass torch creates
    layouts = next((ROW_BLOCKS[kind] for kind in type(mixer).__mro__ if kind in ROW_BLOCKS), {})
    sizes = layouts.get(projection)
    if sizes is None:
        return {}
    named = sizes(mixer)
    bounds = list(accumulate(named.values(), initial=0))
    return {name: (start, stop) for name, start, stop in zip(named, bounds, bounds[1:])}


def _rows_for(model: nn.Module, path: str, base: nn.Linear, part: str | None) -> tuple[int, int]:
    if part is None:
        return 0, base.out_features
    parts = row_blocks(owning_mixer(model, path), path.rpartition(".")[2])
    if part not in parts:
        raise PeftConfigError(f"lora part {part!r} is not defined for {path}; valid parts: {sorted(parts)}")
    return parts[part]


def _adapt_linear(model: nn.Module, path: str, target: nn.Module, spec: LoraSpec) -> list[nn.Parameter]:
    wrapper = target if isinstance(target, LoraLinear) else LoraLinear(target)
    rows = _rows_for(model, path, wrapper.base, spec.part)
    update = LowRankUpdate(wrapper.base.in_features, rows, spec, wrapper.base.weight)
    wrapper.add(spec.part or "full", update, path)
    if wrapper is not target:
        replace_module(model, path, wrapper)
    return list(update.parameters())


def _adapt_other(model: nn.Module, path: str, target: nn.Module, spec: LoraSpec) -> list[nn.Parameter]:
    if spec.part is not None or spec.style != "activation":
        raise PeftConfigError(f"lora on {type(target).__name__} ({path}) supports only style "
                              "`activation` without `part`")
    wrapper = LoraConv2d(target, spec) if isinstance(target, nn.Conv2d) else LoraEmbedding(target, spec)
    replace_module(model, path, wrapper)
    return [p for n, p in wrapper.named_parameters() if not n.startswith("base.")]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA wrapper (Linear, Conv2d, Embedding) into a plain module (equal outputs in eval mode)."""
    fold_wrappers(model, (LoraLinear, LoraConv2d, LoraEmbedding))


@register("lora", spec=LoraSpec, order=ORDER_WRAPPERS, merge=merge_lora)
def apply(model: nn.Module, spec: LoraSpec) -> list[ParamGroup]:
    kinds = (nn.Linear, LoraLinear, nn.Conv2d, nn.Embedding)
    params = []
    for path, target in find_modules(model, list(spec.targets), spec.layers, kinds=kinds).items():
        adapt = _adapt_linear if isinstance(target, (nn.Linear, LoraLinear)) else _adapt_other
        params += adapt(model, path, target, spec)
    return [spec.group("lora", params)]

