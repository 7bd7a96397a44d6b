"""fxclip: DP-SGD per-sample clipping as a torch.compile graph pass.

`import fxclip` loads what privatize, DPOptimizer and make_private need; the rest (the
accountant and dp_accounting, the audit and scipy, explain and its HTML, the Hugging Face and
distributed parts) loads at first use, through the module __getattr__ below (PEP 562).
"""
import importlib

from .adaptive import AdaptiveClipping
from .make_private import make_private  # eager: a lazy name would be shadowed by its submodule
from .optim import DPOptimizer
from .passes import PrivacyError, _torch
from .privatize import PrivatizedModule, privatize, unprivatize
from .sampling import PoissonDataLoader, micro_batches

_torch.warn_if_untested_torch()

# name -> the submodule that defines it
_LAZY = {"Accountant": "accounting", "noise_multiplier_for": "accounting", "explain": "inspect_report",
         "Explanation": "inspect_report", "UserPoissonDataLoader": "user_sampling"}
_SUBMODULES = ("accounting", "audit", "inspect_report", "distributed", "huggingface", "cli")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["PrivacyError", "PrivatizedModule", "privatize", "unprivatize", "explain", "Explanation", "make_private",
           "DPOptimizer", "Accountant", "noise_multiplier_for", "accounting", "PoissonDataLoader",
           "micro_batches", "AdaptiveClipping", "UserPoissonDataLoader"]
__version__ = "0.1.0"
