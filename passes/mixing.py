"""Batch independence: refuse any forward op that lets one sample's data reach another's output.

Per-sample clipping bounds each sample's influence on the summed gradient only if sample i's
gradient depends on sample i alone. An op that combines samples in the model's forward
(BatchNorm in training, `x.mean(0)`, a cumsum or sort over the batch, a matmul contracting it)
voids that, whatever the rules compute, so the pass refuses such graphs.

Policy, over the model's forward (nodes computed from the marked inputs that feed the marked
outputs; a loss computed after the model may combine samples freely):

- MIXED (a layout rule saw the batch combined): refused, naming the op and the module.
- UNKNOWN (no layout rule for the op, or a rule that could not place the batch): refused too.
  Only ops with a rule in passes/layout/ count as per-sample: pointwise ops, views, and the
  ops registered there (convolution, group/layer norm, attention, pooling, embedding, ...).
  An op that keeps the batch size in dim 0 is NOT assumed to keep samples apart (a cumsum or a
  sort over dim 0 does that too). `fxclip.passes.layout.register_per_sample(op)` declares an
  op that treats dim 0 sample by sample.
- Sizes (sym_size) of batched tensors carry no sample's values and are ignored.

Also refused: a trainable parameter modified in place inside the forward, and a buffer
written from the batch inside the forward (e.g. running statistics): both carry unclipped
sample data out of the step.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .layout import MIXED, UNKNOWN
from .module_path import module_of
from .refusals import refusal

aten = torch.ops.aten

NORM_HINT = (
    "BatchNorm in training mode normalizes each sample with statistics of the whole batch. Use "
    "GroupNorm or LayerNorm instead (opacus.validators.ModuleValidator.fix(model) does the swap), "
    "or keep BatchNorm in eval mode (model.eval() on it: frozen running statistics)."
)
GENERIC_HINT = (
    "Each sample's output (and its loss, with loss_fn) must depend on that sample alone: compute "
    "such terms over a non-batch dimension (a contrastive or batch-centered loss over the batch "
    "has no per-sample sensitivity bound)."
)
UNKNOWN_HINT = (
    "fxclip has no batch-layout rule for this op, so it cannot prove the op keeps samples apart. "
    "Express it with supported ops; if it treats dim 0 of its inputs sample by sample, declare it "
    "with fxclip.passes.layout.register_per_sample(torch.ops.{op})."
)

FUSED_RNN_HINT = (
    "this platform runs the recurrent module (nn.LSTM/GRU/RNN) as one fused op, which fxclip "
    "cannot see into to clip per sample. Where the traced graph holds its cell ops (CPU, or "
    "cuDNN off: torch.backends.cudnn.flags(enabled=False)) it is clipped exactly; otherwise write "
    "the recurrence with nn.Linear cells, or freeze the module (requires_grad_(False))."
)

EMBEDDING_BAG_HINT = (
    "nn.EmbeddingBag with 1-D ids and offsets cuts bags from one flat list, which has no batch "
    "dim to clip per sample. Pass 2-D bags (B, L), one bag per sample (pad shorter bags with "
    "padding_idx), and no offsets."
)


def _is_fused_rnn(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return any(k in name for k in ("rnn", "lstm", "gru"))


def model_region(batch_inputs, model_outputs) -> set:
    """Forward nodes between the marked inputs and the marked outputs (both included)."""
    ahead: set = set()
    stack = list(batch_inputs)
    while stack:
        node = stack.pop()
        if node not in ahead:
            ahead.add(node)
            stack.extend(node.users)
    region: set = set()
    stack = [o for o in model_outputs if o in ahead]
    while stack:
        node = stack.pop()
        if node not in region and node in ahead:
            region.add(node)
            stack.extend(node.all_input_nodes)
    return region


def _op_name(node: fx.Node) -> str:
    return str(node.target).replace("aten.", "aten::", 1) if node.op == "call_function" else node.name


def _where(node: fx.Node) -> str:
    path, cls = module_of(node)
    if path or cls:
        return f" in module '{path or '<root>'}'" + (f" ({cls})" if cls else "")
    return " outside any submodule (the model's own forward or its loss_fn)" + _source_line(node)


def _source_line(node: fx.Node) -> str:
    """', at file:line: `code`' of the user's line that made the node (Dynamo's stack trace)."""
    lines = [s.strip() for s in (node.meta.get("stack_trace") or "").strip().splitlines()]
    files = [i for i, s in enumerate(lines) if s.startswith("File ")]
    if not files:
        return ""
    where = lines[files[-1]].split(", in ")[0].replace("File ", "").replace('"', "")
    code = lines[files[-1] + 1] if files[-1] + 1 < len(lines) else ""
    return f", at {where}" + (f": `{code}`" if code else "")


def check_batch_independence(graph: fx.Graph, layouts: dict, model_nodes: set) -> None:
    """Raise PrivacyError at the first forward op of the model that mixes samples, or whose
    batch handling the layout analysis cannot prove per-sample (see the module docstring)."""
    for node in graph.nodes:
        if node not in model_nodes or node.op != "call_function":
            continue
        lay = layouts.get(node)
        if lay is not MIXED and lay is not UNKNOWN:
            continue
        inputs = [layouts.get(a) for a in node.all_input_nodes]
        if any(i is MIXED or i is UNKNOWN for i in inputs):
            continue  # not the origin; the origin comes first in graph order
        path, cls = module_of(node)
        if lay is MIXED:
            hint = NORM_HINT if "BatchNorm" in cls or "batch_norm" in str(node.target) else GENERIC_HINT
            raise refusal("mixes-samples", op=_op_name(node), where=_where(node), hint=hint)
        if _is_fused_rnn(node):
            raise refusal("fused-rnn", op=_op_name(node), where=_where(node), hint=FUSED_RNN_HINT)
        if node.target == aten._embedding_bag.default:
            raise refusal("embedding-bag-layout", op=_op_name(node), where=_where(node), hint=EMBEDDING_BAG_HINT)
        raise refusal("unknown-batch-layout", op=_op_name(node), where=_where(node),
                      hint=UNKNOWN_HINT.format(op=node.target))


def check_no_batch_state(graph: fx.Graph, layouts: dict, param_nodes: list, names: list) -> None:
    """Refuse parameters modified in place in the forward and buffers written from the batch."""
    for node, name in zip(param_nodes, names):
        if node.op != "placeholder":
            raise refusal("parameter-modified-in-forward", name=name)
    for node in graph.nodes:
        if node.op != "call_function" or node.target != aten.copy_.default:
            continue
        dst, src = node.args[:2]
        if dst.op == "placeholder" and src in layouts:
            path, cls = module_of(src)
            module = f"module {path or '<root>'!r} ({cls})"
            what = (f"{module} updates its running statistics (running_mean, running_var: "
                    "track_running_stats=True) from the batch" if "Norm" in cls else
                    f"{module} writes one of its buffers from the batch" if cls else
                    "a buffer is written from the batch")
            raise refusal("buffer-written-from-batch", what=what)
