"""Graph passes over torch.fx joint graphs (installed as fxclip.passes).

Knows aten ops and fx graphs only; it never imports the rest of fxclip. passes/README.md
describes the layout: the pipeline of named stages (pipeline.py, stages/), the protocol with
the module and optimizer (protocol.py), the rules and the batch-layout analysis.

Only the errors, the markers (ops) and passes._torch load with the package: the pass itself
(layout analysis, rules, rewrite) loads at first use, under the compile that runs it, so that
`import fxclip` does not load torch._dynamo and torch._inductor.
"""
import importlib
import sys

from . import _torch
from .errors import PrivacyError

# name -> submodule that defines it, imported at first access (module __getattr__, PEP 562)
_LAZY = {"register_per_sample": "layout", "registered_layout_rules": "layout", "ParamRoute": "report",
         "RewriteReport": "report", "rule_counters": "report", "rewrite_joint_graph": "pipeline",
         "registered_rules": "rules"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in ("layout", "rules", "pipeline", "stages", "report", "builder", "canonical", "mixing", "prune",
                "protocol", "context", "module_path"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _InductorPrimsFirst:
    """Loads Inductor's prims before the first import of the layout or rule modules, however
    they are imported (`from fxclip.passes.layout import ...` included): those modules name
    prims.fma and others at import, which exist once torch._inductor is loaded."""

    loaded = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not cls.loaded and name in (f"{__name__}.layout", f"{__name__}.rules"):
            cls.loaded = True
            _torch.load_inductor_prims()
        return None  # finding the module is left to the other finders


sys.meta_path.insert(0, _InductorPrimsFirst)

__all__ = ["PrivacyError", "ParamRoute", "RewriteReport", "rewrite_joint_graph", "registered_rules",
           "registered_layout_rules", "register_per_sample", "rule_counters"]
