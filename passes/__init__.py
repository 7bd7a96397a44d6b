"""Graph passes over torch.fx joint graphs (installed as fxclip.passes).

Knows aten ops and fx graphs only; it never imports the rest of fxclip.
"""
from .errors import PrivacyError
from .layout import register_per_sample, registered_layout_rules
from .report import ParamRoute, RewriteReport, rule_counters
from .rewrite import rewrite_joint_graph
from .rules import registered_rules

__all__ = ["PrivacyError", "ParamRoute", "RewriteReport", "rewrite_joint_graph", "registered_rules",
           "registered_layout_rules", "register_per_sample", "rule_counters"]
