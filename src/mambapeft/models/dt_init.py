"""The initial step size dt of every Mamba-2 head (``ssm_cfg.dt_init``): the strategies compared by
the dt_bias initialisation study, one function each in :data:`DT_INITS`.

A strategy returns dt per head, (H,); every strategy's dt is then floored at ``dt_init_floor``
(mamba_ssm does so for its default) and the mixer stores ``dt_bias = softplus^-1(dt)``, so that
``softplus(dt_bias) == dt`` for a token whose own dt projection is zero.

The study's code is not public. These definitions are ours:

- ``uniform`` (the default; mamba_ssm ``Mamba2``'s): log-uniform in [dt_min, dt_max], drawn
  independently per head and layer from torch's global RNG, as upstream: seed before creating the
  model.
- ``linear_decay``: deterministic, spaced evenly in log space from dt_max at the first head to
  dt_min at the last (one head: dt_max), the same in every layer.
- ``linear_decay_reverse``: the same spacing from dt_min at the first head to dt_max at the last.

A new strategy is one function ``(nheads, dt_min, dt_max, device=None, dtype=None) -> dt (H,)``
decorated with ``@register_dt_init("name")``, and its name in ``runspec.DT_INIT_STRATEGIES`` (what the
config check reads without importing torch).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

DtInit = Callable[..., torch.Tensor]
DT_INITS: dict[str, DtInit] = {}
DEFAULT_DT_INIT = "uniform"


def register_dt_init(name: str) -> Callable[[DtInit], DtInit]:
    def register(strategy: DtInit) -> DtInit:
        if name in DT_INITS:
            raise ValueError(f"dt_init strategy {name!r} is registered twice")
        DT_INITS[name] = strategy
        return strategy

    return register


@register_dt_init("uniform")
def uniform(nheads: int, dt_min: float, dt_max: float, device=None, dtype=None) -> torch.Tensor:
    # the draw of mamba_ssm's Mamba2.__init__, call for call: a seeded model is the upstream one
    return torch.exp(torch.rand(nheads, device=device, dtype=dtype) * (math.log(dt_max) - math.log(dt_min))
                     + math.log(dt_min))


def _log_spaced(first: float, last: float, nheads: int, device, dtype) -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(first), math.log(last), nheads, device=device, dtype=dtype))


@register_dt_init("linear_decay")
def linear_decay(nheads: int, dt_min: float, dt_max: float, device=None, dtype=None) -> torch.Tensor:
    return _log_spaced(dt_max, dt_min, nheads, device, dtype)


@register_dt_init("linear_decay_reverse")
def linear_decay_reverse(nheads: int, dt_min: float, dt_max: float, device=None, dtype=None) -> torch.Tensor:
    return _log_spaced(dt_min, dt_max, nheads, device, dtype)


def check_dt_init(name: str) -> None:
    """A ValueError naming ``name`` and the registered strategies, unless it is one of them."""
    if name not in DT_INITS:
        raise ValueError(f"dt_init {name!r} is not a known dt initialisation; valid: {', '.join(DT_INITS)} "
                         "(models/dt_init.py)")


def initial_dt(name: str, nheads: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None,
               dtype=None) -> torch.Tensor:
    """dt per head, (H,), of strategy ``name``, floored at ``dt_init_floor``."""
    check_dt_init(name)
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min {dt_min} and dt_max {dt_max} must satisfy 0 < dt_min <= dt_max")
    return DT_INITS[name](nheads, dt_min, dt_max, device=device, dtype=dtype).clamp(min=dt_init_floor)


def inverse_softplus(dt: torch.Tensor) -> torch.Tensor:
    """dt_bias with ``softplus(dt_bias) == dt`` (dt > 0), computed stably as mamba_ssm does."""
    return dt + torch.log(-torch.expm1(-dt))
