"""Graph passes over torch.fx joint graphs (installed as fxclip.passes).

Knows aten ops and fx graphs only; it never imports the rest of fxclip.
"""
from .errors import PrivacyError
from .report import ParamRoute, RewriteReport, rule_counters
from .rewrite import rewrite_joint_graph
from .rules import registered_rules

__all__ = ["PrivacyError", "ParamRoute", "RewriteReport", "rewrite_joint_graph", "registered_rules",
           "rule_counters"]
