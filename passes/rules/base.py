"""What every rule shares: the Contribution a rule is offered, the Route it returns or the
Decline that says why not, and the traced helpers that replay a gradient's layout ops per sample.
Rule modules import from here, never from the package, so the package's list of rules (RULES in
__init__.py) imports them without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..builder import run_node
from ..layout import Layout, as_int, known_equal
from ..numerics import upcast

aten = torch.ops.aten


@dataclass(frozen=True)
class Decline:
    """Why a rule does not take a contribution: a short phrase a user can read. `applies` is
    False when the contribution is not of the rule's op family at all (explain leaves those out:
    a convolution rule declining a matmul is no news)."""

    reason: str
    applies: bool = True


@dataclass
class Contribution:
    """One term of a parameter's gradient: `root` is the op that sums over the batch, `path`
    the linear layout ops (and adds) that carry its value to the parameter's gradient output."""

    root: fx.Node
    path: list[fx.Node]


@dataclass
class Route:
    """A matched rule for one contribution. Methods trace into the graph via ctx.builder."""

    rule: str
    strategy: str  # "ghost" | "instantiate"
    contribution: Contribution
    shapes: dict = field(default_factory=dict)
    extra_flops: int = 0
    extra_bytes: int = 0

    def norm_sq(self, ctx):  # -> node (B,) float: per-sample squared norm of this contribution
        raise NotImplementedError

    def per_sample(self, ctx):  # -> node (B, *param.shape)
        raise NotImplementedError

    def reweighted(self, ctx, clip):  # -> node (param.shape): sum_i R_i * contribution_i
        raise NotImplementedError

    def ghost_factors(self, ctx):  # -> rules.shared.Factors | None: for tied-use cross terms
        return None


def replay(path: list[fx.Node], start: fx.Node, value):
    """Apply the linear layout ops of `path` to `value` standing for `start` (inside a traced fn).

    An add on the path whose other operand is another contribution passes the value through:
    the path maps one term of a sum.
    """
    env = {start: value}
    for node in path:
        if node.target == aten.add.Tensor and sum(a in env for a in node.args) == 1:
            env[node] = next(env[a] for a in node.args if a in env)
        elif node.target == aten.slice_scatter.default:  # into zeros: a zero padding (vmappable)
            env[node] = torch.constant_pad_nd(env[node.args[1]], zero_padding_of(node))
        elif node.target == aten.cat.default:  # this term fills its own slice, zeros elsewhere
            part = next(a for a in node.args[0] if a in env)
            env[node] = torch.constant_pad_nd(env[part], cat_slot(node, part))
        else:
            env[node] = run_node(node, env)
    return env[path[-1]] if path else value


def is_zeros(node) -> bool:
    """A zeros / full(..., 0) node: the empty buffer a gradient is scattered into."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and (node.target == aten.zeros.default
                 or (node.target == aten.full.default and node.args[1] == 0)))


def zero_padding_of(node: fx.Node):
    """For slice_scatter(zeros, src, dim, start, end, 1) with static ints (the gradient of a
    sliced parameter, pos[:T]), the constant_pad_nd padding that puts src in place; else None."""
    if node.op != "call_function" or node.target != aten.slice_scatter.default or node.kwargs:
        return None
    defaults = (0, None, None, 1)  # dim, start, end, step
    base, src, dim, start, end, step = (*node.args, *defaults[len(node.args) - 2:])
    if not is_zeros(base) or step != 1:
        return None
    shape = base.meta["val"].shape
    if not all(isinstance(v, int) for v in (*shape, dim)):
        return None
    dim = dim % len(shape)
    bounds = slice_bounds(shape[dim], start, end)
    if bounds is None:
        return None
    start, end = bounds
    if end - start != src.meta["val"].shape[dim]:
        return None
    return [0, 0] * (len(shape) - 1 - dim) + [start, shape[dim] - end]


def slice_bounds(size, start, end):
    """slice's (start, end) over a dim of static `size` as 0 <= start, end <= size (None, negative
    and past-the-end bounds resolved); None when any of them is symbolic."""
    start = 0 if start is None else start
    end = size if end is None else end
    if not all(isinstance(v, int) for v in (size, start, end)):
        return None
    return tuple(v + size if v < 0 else min(v, size) for v in (start, end))


def cat_slot(node: fx.Node, part):
    """For cat(parts, dim) with static sizes along dim: the constant_pad_nd padding that puts
    `part` where cat puts it (zeros elsewhere); else None."""
    if node.op != "call_function" or node.target != aten.cat.default or node.kwargs:
        return None
    parts = node.args[0]
    shape = node.meta["val"].shape
    dim = node.args[1] if len(node.args) > 1 else 0
    sizes = [p.meta["val"].shape[dim % len(shape)] if isinstance(p, fx.Node) else None for p in parts]
    if part not in parts or not all(isinstance(v, int) for v in (*shape, *sizes)):
        return None
    dim, at = dim % len(shape), parts.index(part)
    start = sum(sizes[:at])
    return [0, 0] * (len(shape) - 1 - dim) + [start, shape[dim] - start - sizes[at]]


def cat_slots(contribution) -> dict:
    """{cat node: the part this contribution's value enters it as} along its path."""
    slots, prev = {}, contribution.root
    for node in contribution.path:
        if node.target == aten.cat.default:
            slots[node] = prev
        prev = node
    return slots


def norm_sq_of(per_sample: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample's slice, accumulated in float32 (or wider)."""
    p = upcast(per_sample)
    return p.reshape(p.shape[0], -1).square().sum(1)


def split_batch(x: torch.Tensor, layout, batch: int) -> torch.Tensor:
    """View dim `layout.dim` (size outer * B * inner) as (B, outer * inner), B moved to the front
    (for batch-major layouts, outer = 1, a view)."""
    d = layout.dim
    shape = list(x.shape)
    if isinstance(layout.outer, int) and layout.outer == 1:  # see normalized()
        x = x.reshape(shape[:d] + [batch, shape[d] // batch] + shape[d + 1:])
        return x.movedim(d, 0)
    outer = layout.outer
    x = x.reshape(shape[:d] + [outer, batch, shape[d] // (outer * batch)] + shape[d + 1:])
    x = x.movedim(d + 1, 0)  # (B, ..., outer, inner, ...)
    return x.reshape([batch] + shape[:d] + [shape[d] // batch] + shape[d + 1:])


def normalized(layout):
    """The layout with a plain int `outer` (rules call this OUTSIDE traced fns: a symbolic size
    read inside one is not an input of the trace), or None for a symbolic outer other than 1."""
    if known_equal(layout.outer, 1):
        return Layout(layout.dim, 1, layout.inner)
    outer = as_int(layout.outer)
    return Layout(layout.dim, outer, layout.inner) if isinstance(outer, int) else None


def _sample_factor(x: torch.Tensor, layout, clip: torch.Tensor):
    """(x viewed with its batch split out, clip broadcastable against that view)."""
    d, batch = layout.dim, clip.shape[0]
    shape = list(x.shape)
    split = shape[:d] + [layout.outer, batch, shape[d] // (batch * layout.outer)] + shape[d + 1:]
    factor = clip.to(x.dtype).reshape([1] * d + [1, batch, 1] + [1] * (len(shape) - d - 1))
    return x.reshape(split), factor


def scale_by_sample(x: torch.Tensor, layout, clip: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's part of x by its clip factor (x keeps its shape). A dropped
    sample given factor 0 (inf/NaN gradient, padding) becomes exact zeros even where x holds inf/NaN."""
    split, factor = _sample_factor(x, layout, clip)
    return torch.where(factor > 0, split * factor, 0).reshape(x.shape)


def zero_dropped(x: torch.Tensor, layout, clip: torch.Tensor) -> torch.Tensor:
    """x with the parts of dropped samples (clip factor 0) set to zeros."""
    split, factor = _sample_factor(x, layout, clip)
    return torch.where(factor > 0, split, 0).reshape(x.shape)


def weighted_sum(per_sample: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """sum_i clip_i * per_sample_i, skipping dropped samples (clip_i = 0) whatever they hold."""
    factor = clip.to(per_sample.dtype).reshape([-1] + [1] * (per_sample.dim() - 1))
    return torch.where(factor > 0, per_sample * factor, 0).sum(0)


class InstantiatedRoute(Route):
    """A route whose norm and reweighting come from its per-sample gradients (B, *shape)."""

    def norm_sq(self, ctx):
        return ctx.builder.call(norm_sq_of, ctx.per_sample(self))

    def reweighted(self, ctx, clip):
        return ctx.builder.call(weighted_sum, ctx.per_sample(self), clip)
