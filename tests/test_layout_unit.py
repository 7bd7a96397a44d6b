"""The batch-layout analysis (passes/layout) on graphs of a few nodes: trace a tiny function with
make_fx, seed its first input as batched in dim 0, and read the layout found for the result.
No privatize, no compile: each test shows one layout rule, and fails where that rule changes.

Layout(dim, outer, inner): dim `dim` has size outer * B * inner and sample b owns the index
range (o * B + b) * inner + [0, inner) for each o < outer. MIXED: samples were combined."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxclip
from fxclip.passes.layout import MIXED, Layout, analyze, known_equal
from fxclip.passes.mixing import check_batch_independence

B, T, H = 5, 3, 4  # distinct sizes, so that a layout cannot fit by accident


def trace(f, *args, mode="real"):
    """(graph, {node: layout}, the node f returns), the first argument batched in dim 0."""
    graph = make_fx(f, tracing_mode=mode)(*args).graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    out = graph.output_node().args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    return graph, analyze(graph, {x: Layout(0)}, x.meta["val"].shape[0]), out


def layout_of(f, *args, mode="real"):
    """The layout of what f returns (None: it carries no batch)."""
    _, layouts, out = trace(f, *args, mode=mode)
    return layouts.get(out)


def iota(x):
    """arange(B) as AOTAutograd's decompositions write it (prims.iota), which the index rule
    reads as "each sample's own row"."""
    return torch.ops.prims.iota(x.shape[0], start=0, step=1, dtype=torch.int64, device=x.device,
                                requires_grad=False)


# --- per-sample ops keep the batch where it is ---

def test_a_linear_keeps_the_batch_in_dim_0():
    w, b = torch.randn(2, H), torch.randn(2)
    assert layout_of(F.linear, torch.randn(B, H), w, b) == Layout(0)
    assert layout_of(F.linear, torch.randn(B, T, H), w, b) == Layout(0)  # through a (B*T, H) view


def test_a_reduction_over_another_dim_keeps_dim_0():
    assert layout_of(lambda x: x.sum(1), torch.randn(B, T)) == Layout(0)
    assert layout_of(lambda x: x.softmax(-1), torch.randn(B, T)) == Layout(0)
    assert layout_of(lambda x: x.cumsum(1), torch.randn(B, T)) == Layout(0)


def test_a_per_sample_gram_keeps_dim_0():
    assert layout_of(lambda x: x @ x.transpose(1, 2), torch.randn(B, T, H)) == Layout(0)


def test_weights_alone_carry_no_batch():
    graph, layouts, _ = trace(lambda x, w: x @ w.t(), torch.randn(B, H), torch.randn(2, H))
    (t,) = [n for n in graph.nodes if n.target == torch.ops.aten.t.default]
    assert t not in layouts  # the transposed weight holds no sample's values


# --- views move the batch ---

def test_a_transpose_moves_the_batch_to_dim_1():
    assert layout_of(lambda x: x.transpose(0, 1), torch.randn(B, T, H)) == Layout(1)


def test_flattening_batch_and_time_gives_an_inner_block():
    # (B, T, H) -> (B*T, H): sample b owns rows b*T .. b*T + T - 1
    assert layout_of(lambda x: x.reshape(B * T, H), torch.randn(B, T, H)) == Layout(0, 1, T)


def test_flattening_time_and_batch_gives_an_outer_stride():
    # (T, B, H) -> (T*B, H): sample b owns rows t*B + b for each t
    assert layout_of(lambda x: x.transpose(0, 1).reshape(T * B, H), torch.randn(B, T, H)) == Layout(0, T, 1)


def test_symbolic_sizes_give_a_symbolic_inner_block():
    graph, layouts, out = trace(lambda x: x.reshape(-1, x.shape[-1]), torch.randn(B, T, H), mode="symbolic")
    _, t, h = next(n for n in graph.nodes if n.op == "placeholder").meta["val"].shape  # SymInts
    lay = layouts[out]
    assert lay.dim == 0 and lay.batch_major and known_equal(lay.inner, t) and not known_equal(lay.inner, h)


# --- ops over the batch mix samples ---

@pytest.mark.parametrize("f", [lambda x: x.mean(0), lambda x: x.softmax(0), lambda x: x.cumsum(0),
                               lambda x: x.flip(0), lambda x: x.t() @ x, lambda x: x - x.mean(0)],
                         ids=["mean0", "softmax0", "cumsum0", "flip0", "batch_contraction", "centering"])
def test_an_op_over_the_batch_mixes_samples(f):
    assert layout_of(f, torch.randn(B, T)) is MIXED


def test_concatenating_along_the_batch_mixes_but_along_features_does_not():
    assert layout_of(lambda x: torch.cat([x, x[:1]]), torch.randn(B, T)) is MIXED
    assert layout_of(lambda x: torch.cat([x, x[:, :1]], 1), torch.randn(B, T)) == Layout(0)


# --- indexing ---

def test_index_select_along_the_batch_mixes_even_with_arange():
    # picking rows along the batch is refused as a whole, even the identity arange(B)
    assert layout_of(lambda x: x.index_select(0, torch.arange(x.shape[0])), torch.randn(B, T)) is MIXED
    assert layout_of(lambda x: x.index_select(1, torch.tensor([2, 0])), torch.randn(B, T)) == Layout(0)


def test_each_sample_picking_its_own_row_stays_per_sample():
    labels = torch.randint(0, T, (B,))
    assert layout_of(lambda x, y: x[iota(x), y], torch.randn(B, T), labels) == Layout(0)
    # a permutation of the batch rows (anything but arange(B) in the batch slot) mixes
    assert layout_of(lambda x, y: x[y.flip(0) % B, y], torch.randn(B, T), labels) is MIXED


def test_an_embedding_lookup_follows_its_batched_indices():
    table = torch.randn(11, H)
    assert layout_of(lambda ids, w: F.embedding(ids, w), torch.randint(0, 11, (B, T)), table) == Layout(0)


# --- the mixing check names the op that mixes ---

def test_check_batch_independence_refuses_the_first_mixing_op_by_name():
    graph, layouts, _ = trace(lambda x: torch.tanh(x - x.mean(0)), torch.randn(B, T))
    with pytest.raises(fxclip.PrivacyError, match=r"^aten::mean\.dim .*mixes samples"):
        check_batch_independence(graph, layouts, set(graph.nodes))


def test_check_batch_independence_refuses_an_op_without_a_layout_rule():
    graph, layouts, _ = trace(lambda x: torch.linalg.qr(x.unsqueeze(-1)).Q, torch.randn(B, T))
    with pytest.raises(fxclip.PrivacyError, match=r"^aten::linalg_qr.*cannot prove"):
        check_batch_independence(graph, layouts, set(graph.nodes))


def test_check_batch_independence_passes_per_sample_graphs_and_ignores_nodes_outside_the_model():
    graph, layouts, _ = trace(lambda x: torch.tanh(F.layer_norm(x, (T,))).sum(1), torch.randn(B, T))
    check_batch_independence(graph, layouts, set(graph.nodes))  # no error
    graph, layouts, out = trace(lambda x: x.sum(1).mean(0), torch.randn(B, T))
    assert layouts[out] is MIXED
    check_batch_independence(graph, layouts, set(graph.nodes) - {out})  # the mean is not the model's
