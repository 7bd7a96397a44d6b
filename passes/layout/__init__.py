"""Where the batch lives in every tensor of the joint graph.

A Layout says: dimension `dim` of this tensor has size outer * B * inner, and sample b owns the
index range (o * B + b) * inner + [0, inner) for each o < outer. Plain (B, ...) tensors are
Layout(0, 1, 1); a (B*T, d) view of a (B, T, d) tensor is Layout(0, 1, T).

Forward tensors start from the marked model inputs, backward tensors from the tangents (model
outputs carry the batch in dim 0). MIXED marks a tensor in which samples were combined (a
reduction or contraction over the batch); UNKNOWN marks an op this analysis has no rule for.
Rules use layouts to find per-sample structure; an UNKNOWN only makes them decline.

One small file per op family holds its rules, each registered with @layout_rule(op, ...);
`registered_layout_rules()` lists them (op -> family). What the families share lives in
layout/base.py (re-exported here). Every rule is
`rule(node, layouts, B) -> Layout | MIXED | UNKNOWN | NO_BATCH | Outputs | None` (None: the
rule could not place the batch, read as UNKNOWN).
"""
from __future__ import annotations

import importlib
import operator

from .base import (  # noqa: F401
    LAYOUT_RULES,
    MIXED,
    NO_BATCH,
    SHAPE_OPS,
    UNKNOWN,
    Layout,
    Outputs,
    _shape,
    analyze,
    as_int,
    exact_div,
    fits,
    known_equal,
    layout_rule,
    reduced_dims,
    register_per_sample,
    registered_layout_rules,
    rule_for,
    same_shape,
    size_hint,
)


@layout_rule(operator.getitem)
def _getitem(node, layouts, B):
    lays = layouts[node.args[0]]
    if isinstance(lays, Outputs):
        i = node.args[1]
        return lays[i] if i < len(lays) else UNKNOWN
    lay = lays
    return lay if fits(lay, _shape(node), B) else None  # e.g. an op's non-batched extra outputs


# Families, one file each, imported in this order for their registrations: it orders
# registered_layout_rules(), and a later file's rule for an op would replace an earlier one's
# (no op has two today). Written out, so that no import sorter decides it.
FAMILIES = ("pointwise", "views", "reductions", "along", "matmul", "slicing", "indexing", "per_sample", "norms",
            "attention", "embedding_bag")
for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
