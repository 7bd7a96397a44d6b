"""View-like and layout ops, in one place: the sets every rule and pass reads.

A parameter gradient is a sum over the batch followed by ops that only move its values
(MOVES_VALUES); rules replay those per sample. The named subsets are the pieces other sites
need. A leaf module: it imports torch only.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten

VIEWS = frozenset({aten.view.default, aten._unsafe_view.default})  # need a viewable memory layout
RESHAPES = VIEWS | {aten.reshape.default}
TRANSPOSES = frozenset({aten.permute.default, aten.t.default, aten.transpose.int})
SQUEEZES = frozenset({aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default})
CASTS = frozenset({aten._to_copy.default, torch.ops.prims.convert_element_type.default})
COPIES = frozenset({aten.clone.default, aten.alias.default}) | CASTS  # the same values (maybe another dtype)

# Ops that only move a gradient's values around (no broadcast, no arithmetic).
MOVES_VALUES = RESHAPES | TRANSPOSES | SQUEEZES | COPIES
