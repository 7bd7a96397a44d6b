"""Drop outputs of multi-output backward ops that the rewrite left unused.

After the rewrite a parameter's gradient comes from its rule, so the original weight gradient
of e.g. `convolution_backward` is dead; dead code elimination removes its `getitem` but not
the work inside the op. Clearing that slot of the op's `output_mask` stops the computation.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _output_mask_index(node: fx.Node):
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    args = target._schema.arguments
    if args and args[-1].name == "output_mask" and len(node.args) == len(args):
        return len(args) - 1
    return None


def prune_unused_outputs(graph: fx.Graph) -> int:
    """Clear output_mask entries nobody reads; returns how many were cleared."""
    cleared = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        at = _output_mask_index(node)
        if at is None:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        if any(u.target is not operator.getitem for u in node.users):
            continue  # the tuple escapes whole: keep everything
        mask = list(node.args[at])
        new = [bool(m) and i in used for i, m in enumerate(mask)]
        if new == mask or not any(new):
            continue
        node.update_arg(at, new)
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            node.meta["val"] = type(val)(v if keep else None for v, keep in zip(val, new))
        cleared += sum(1 for a, b in zip(mask, new) if a and not b)
    return cleared
