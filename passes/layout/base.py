"""What the layout rules share: Layout and the marks, size arithmetic that installs no guards,
small readers of nodes, the registry (layout_rule, registered_layout_rules) and analyze().
Family files import from here, never from the package, so the package imports them without a
cycle.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

SHAPE_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
             aten.sym_storage_offset.default}


@dataclass(frozen=True)
class Layout:
    dim: int
    outer: object = 1  # int or SymInt
    inner: object = 1

    @property
    def batch_major(self) -> bool:
        return known_equal(self.outer, 1)


class _Mark:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


MIXED = _Mark("MIXED")
UNKNOWN = _Mark("UNKNOWN")
NO_BATCH = _Mark("NO_BATCH")  # an output that carries no sample's values (left out of layouts)


class Outputs(tuple):
    """Per-output layouts of a multi-output op: a Layout, MIXED, UNKNOWN or NO_BATCH each; the
    getitem rule unpacks them element by element."""


# --- size arithmetic that never installs a guard on symbolic sizes ---

def known_equal(a, b) -> bool:
    """a == b for every value of the symbols. A size argument may be a graph node holding a
    SymInt (symbolic shapes): its value is compared."""
    a, b = _val(a), _val(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def size_hint(x) -> int:
    """A concrete value for a (possibly symbolic) size, for cost estimates only: never a guard."""
    if isinstance(x, int):
        return x
    hint = x.node.hint
    return int(hint) if hint is not None else 8


def same_shape(a, b) -> bool:
    """Shape equality that never installs a guard on symbolic sizes."""
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def exact_div(a, b):
    """a / b when b divides a for every value of the symbols, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    q = a // b
    return as_int(q) if statically_known_true(q * b == a) else None


def as_int(x):
    """A symbolic size whose value is the same for every value of the symbols ((5 * s0) // s0)
    as a plain int; anything else as it is."""
    if isinstance(x, torch.SymInt) and x.node.expr.is_number:
        return int(x.node.expr)
    return x


def _prod(xs):
    return math.prod(xs) if all(isinstance(x, int) for x in xs) else _sym_prod(xs)


def _sym_prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def fits(lay, shape, B) -> bool:
    """Whether a tensor of `shape` can carry the batch as `lay` says."""
    return (shape is not None and lay.dim < len(shape)
            and known_equal(shape[lay.dim], lay.outer * B * lay.inner))


# --- small readers the family files share ---

def _shape(node):
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _out_shape(node):
    """Shape of a node's (first) tensor output, also for multi-output ops."""
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = v[0] if v and isinstance(v[0], torch.Tensor) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _val(v):
    """An argument's value: a size or scalar argument is a node holding a SymInt under symbolic
    shapes, a plain number otherwise."""
    return v.meta.get("val") if isinstance(v, fx.Node) else v


def _one(lays):
    """The layout all of `lays` share, else None (lists: symbolic layouts are unhashable)."""
    lays = list(lays)
    return lays[0] if lays and all(lay == lays[0] for lay in lays[1:]) else None


def _dim(d, ndim):
    return d % ndim if ndim else 0


def _arg(node, i, name, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _as_list(d):
    return list(d) if isinstance(d, (list, tuple)) else [d]


def reduced_dims(node, dim_at=1, keepdim_at=2) -> tuple[list, bool]:
    """(dims, keepdim) of a reduction node: the dims its `dim` argument (position `dim_at`, or the
    keyword) names, in [0, ndim); every dim where the argument is absent, None or empty (aten
    reduces them all) or where `dim_at` is None. keepdim from position `keepdim_at` or the keyword."""
    ndim = len(_shape(node.args[0]))
    dims = None if dim_at is None else _arg(node, dim_at, "dim", None)
    keepdim = False if keepdim_at is None else _arg(node, keepdim_at, "keepdim", False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim)), keepdim
    return [_dim(d, ndim) for d in _as_list(dims)], keepdim


def _shared_dim0(nodes, layouts, B):
    """The one batch-major dim-0 layout of the batched `nodes`, else None."""
    lay = _one(layouts[a] for a in nodes if isinstance(a, fx.Node) and a in layouts)
    if not isinstance(lay, Layout) or lay.dim != 0 or not lay.batch_major:
        return None
    return lay


def _op(name: str, overload: str = "default"):
    """aten.<name>.<overload>, or None where this torch build has no such op."""
    packet = getattr(aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def _prims_op(name: str):
    """prims.<name>.default, registered by Inductor (loaded by passes._torch), or None."""
    packet = getattr(torch.ops.prims, name, None)
    return getattr(packet, "default", None) if packet is not None else None


# --- the registry ---

LAYOUT_RULES: dict = {}  # op (or torch.Tag.pointwise, for every pointwise op) -> rule
_FAMILY: dict = {}  # op -> the module that registered its rule (a family file, or the user's)


def layout_rule(*targets):
    """Register the decorated rule for each op in `targets` (None entries: ops this torch build
    lacks, skipped)."""

    def register(fn):
        _register(fn, *targets, _caller=2)
        return fn

    return register


def _register(rule, *ops, _caller=1):
    family = sys._getframe(_caller).f_globals["__name__"].rsplit(".", 1)[-1]
    for op in ops:
        if op is not None:
            LAYOUT_RULES[op] = rule
            _FAMILY[op] = family


def registered_layout_rules() -> dict[str, str]:
    """{op name: family file of its rule}, for a reader looking for the rule of an op."""
    return {str(op): _FAMILY[op] for op in LAYOUT_RULES}


def rule_for(node):
    target = node.target
    rule = LAYOUT_RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        rule = LAYOUT_RULES.get(torch.Tag.pointwise)
    return rule


def analyze(graph: fx.Graph, batched: dict[fx.Node, Layout], batch_size) -> dict:
    """Layouts of every node reachable from the `batched` seeds; others are absent (no batch)."""
    layouts: dict = dict(batched)
    for node in graph.nodes:
        if node in layouts or node.op != "call_function" or node.target in SHAPE_OPS:
            continue  # sizes of a batched tensor carry no sample's values
        inputs = [a for a in node.all_input_nodes if a in layouts]
        if not inputs:
            continue
        if any(layouts[a] is MIXED for a in inputs):
            layouts[node] = MIXED
            continue
        if any(layouts[a] is UNKNOWN for a in inputs):
            layouts[node] = UNKNOWN
            continue
        rule = rule_for(node)
        out = rule(node, layouts, batch_size) if rule else UNKNOWN
        if out is NO_BATCH:
            continue  # e.g. an unused output of a multi-output op
        layouts[node] = UNKNOWN if out is None else out
    return layouts


def _along(mixed_dims_of):
    """Rule for an op that combines values along `mixed_dims_of(node, ndim)` of its first input
    and keeps every other dim in place (all batched inputs share one layout)."""

    def rule(node, layouts, B):
        lay = _one(layouts[a] for a in node.all_input_nodes if a in layouts)
        if lay is None:
            return None
        ndim = len(_shape(node.args[0]) or ())
        if lay.dim in {_dim(d, ndim) for d in mixed_dims_of(node, ndim)}:
            return MIXED
        return lay if fits(lay, _out_shape(node), B) else None

    return rule


_DIM0 = _along(lambda n, nd: range(1, nd))  # dim 0 is treated sample by sample


def register_per_sample(*ops):
    """Declare ops that treat dim 0 of their tensor inputs sample by sample (like a
    convolution): a batch in dim 0 stays in dim 0 of the outputs; a batch elsewhere is refused as
    mixing. In a privatized model's forward, ops without a layout rule are refused."""
    _register(_DIM0, *ops, _caller=2)
