"""Rules on few-node graphs: each match returns a Route or a Decline with a reason, and the
rules are tried in the order RULES writes out."""
from types import SimpleNamespace

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxclip.passes.layout import Layout, analyze
from fxclip.passes.rules import (
    RULES,
    Contribution,
    Decline,
    Route,
    batch_of_one,
    conv,
    embedding,
    fallback,
    linear,
    registered_rules,
    unreduce,
)
from fxclip.passes.stages.routing import route_contribution

aten = torch.ops.aten
B = 4


def _contribution(fn, *args, batched):
    """(contribution, ctx) for the gradient fn(*args) returns; `batched` flags the inputs that
    hold the batch in dim 0 (they stand for the output gradients)."""
    gm = make_fx(fn)(*args)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seeds = [n for n, b in zip(inputs, batched) if b]
    root = gm.graph.output_node().args[0]
    root = root[0] if isinstance(root, (list, tuple)) else root
    after = {n for n in gm.graph.nodes if n.op == "call_function"}
    ctx = SimpleNamespace(layouts=analyze(gm.graph, {s: Layout(0) for s in seeds}, B), batch_size=B,
                          batch_hint=B, param_shape=tuple(root.meta["val"].shape),
                          param_numel=root.meta["val"].numel(), output_grads=seeds, after_output_grads=after)
    return Contribution(root, []), ctx


def _route(contribution, ctx):
    """(the first matching route, [(rule, reason)] of the applicable rules tried before it)."""
    for name, match in RULES:  # every rule says why it declines
        found = match(contribution, ctx)
        assert isinstance(found, Route) or (isinstance(found, Decline) and found.reason), name
    declines = []
    return route_contribution(contribution, ctx, declines), declines


def test_rules_are_an_explicit_tuple_in_priority_order():
    assert isinstance(RULES, tuple)
    assert registered_rules() == ["batch_of_one", "linear", "conv", "embedding", "embedding_bag",
                                  "unreduce", "fallback"]


def test_linear_matches_a_weight_gradient_and_says_why_the_others_decline(model_costs):
    x, g = torch.randn(B, 3), torch.randn(B, 2)
    c, ctx = _contribution(lambda x, g: g.t() @ x, x, g, batched=(True, True))
    route, declines = _route(c, ctx)
    assert route.rule == "linear"
    assert declines == []  # batch_of_one does not apply (B is not a fixed 1): no news


def test_linear_declines_when_the_batch_is_not_contracted():
    # x @ y.T: the batch in the rows and the columns, the mm contracts the features
    c, ctx = _contribution(lambda x, y: x @ y.t(), torch.randn(B, 3), torch.randn(B, 3), batched=(True, True))
    assert linear.match(c, ctx) == Decline("the batch is not on the contracted dim of the mm")
    route, declines = _route(c, ctx)
    assert route.rule == "fallback"
    assert ("linear", "the batch is not on the contracted dim of the mm") in declines
    c, ctx = _contribution(lambda x, w: x @ w, torch.randn(B, 3), torch.randn(3, 2), batched=(True, False))
    assert linear.match(c, ctx) == Decline("an operand of the mm has no per-sample batch layout")


def test_unreduce_matches_a_sum_over_the_batch_and_declines_one_that_keeps_it():
    g = torch.randn(B, 5)
    c, ctx = _contribution(lambda g: g.sum([0]), g, batched=(True,))
    route, declines = _route(c, ctx)
    assert route.rule == "unreduce"
    assert declines == []  # linear, conv, embedding: another op family, not shown
    assert linear.match(c, ctx) == Decline("the gradient is not computed by an mm", applies=False)
    c, ctx = _contribution(lambda g: g.sum([1]), g, batched=(True,))
    assert unreduce.match(c, ctx) == Decline("the sum does not reduce the batch dim")


def _embedding_grad(g, ids):
    return aten.embedding_dense_backward(g, ids, 10, -1, False)


def test_embedding_matches_integer_ids_and_declines_float_ones():
    g, ids = torch.randn(B, 6, 3), torch.randint(0, 10, (B, 6))
    c, ctx = _contribution(_embedding_grad, g, ids, batched=(True, True))
    assert _route(c, ctx)[0].rule == "embedding"
    ids_node = c.root.args[1]
    ids_node.meta["val"] = ids_node.meta["val"].float()
    assert embedding.match(c, ctx) == Decline("the ids are not integers")


def test_embedding_declines_ids_and_values_batched_differently():
    # the ids' batch in dim 1 (time-first), the output gradient's in dim 0
    g, ids = torch.randn(B, 6, 3), torch.randint(0, 10, (6, B))
    c, ctx = _contribution(lambda g, i: _embedding_grad(g, i.t()), g, ids, batched=(True, False))
    ctx.layouts[c.root.args[1]] = Layout(1)
    assert embedding.match(c, ctx) == Decline("the ids and the values are batched differently")


def test_batch_of_one_conv_and_fallback():
    g = torch.randn(B, 5)
    c, ctx = _contribution(lambda g: g.sum([0]), g, batched=(True,))
    assert batch_of_one.match(c, ctx) == Decline("the batch size is not a fixed 1", applies=False)
    assert conv.match(c, ctx) == Decline("the gradient is not a convolution's weight or bias gradient", applies=False)
    assert isinstance(fallback.match(c, ctx), Route)  # never declines
    ctx.batch_size = 1
    assert batch_of_one.match(c, ctx).rule == "batch_of_one"


def test_matchers_decline_without_raising_on_any_op():
    g = torch.randn(B, 5)
    c, ctx = _contribution(lambda g: (g * 2).cumsum(1), g, batched=(True,))
    for name, match in RULES[:-1]:
        assert isinstance(match(c, ctx), Decline), name


@pytest.mark.parametrize("dims, expected", [([0], [0]), ([-1], [1]), ([], [0, 1]), (None, [0, 1])])
def test_reduced_dims_reads_aten_dims(dims, expected):
    from fxclip.passes.layout import reduced_dims

    gm = make_fx(lambda g: aten.sum.dim_IntList(g, dims, True))(torch.randn(B, 5))
    node = next(n for n in gm.graph.nodes if n.target == aten.sum.dim_IntList)
    assert reduced_dims(node) == (expected, True)
