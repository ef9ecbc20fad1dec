"""PEFT methods for Mamba: one module per family, composed by :func:`apply_peft`."""
from .core import PeftResult, apply_peft, check_gradients, zero_initialised
from .registry import FAMILIES, ParamGroup, PeftConfigError, get_family, register

__all__ = ["apply_peft", "PeftResult", "ParamGroup", "PeftConfigError", "check_gradients",
           "zero_initialised", "register", "get_family", "FAMILIES"]
