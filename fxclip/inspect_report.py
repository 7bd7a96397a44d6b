"""explain(): what the fxclip pass did to a model, per parameter, and the rewritten graph.

    rep = fxclip.explain(model, x, max_grad_norm=1.0)
    print(rep)          # one row per trainable parameter + summary
    rep.to_json()       # dict, validates against JSON_SCHEMA (docs/inspect.md)
    rep.to_dot()        # graphviz text of the rewritten joint graph
    rep.to_html()       # one self-contained HTML page: table + SVG graph

Everything here is read off `RewriteReport` (passes/report.py), the record the pass itself wrote
while rewriting: explain never re-derives which rule a parameter got. Only shapes, dtypes and
cost estimates are shown, never tensor values.
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter, defaultdict

import networkx as nx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._formatting import fmt_bytes, fmt_count
from .passes import RewriteReport
from .passes._torch import input_index, output_descriptors
from .passes.module_path import module_of

SCHEMA_VERSION = 1

__all__ = ["explain", "Explanation", "JSON_SCHEMA", "SCHEMA_VERSION"]

_STR_OR_NULL = {"type": ["string", "null"]}
_INT = {"type": "integer", "minimum": 0}

# The JSON document Explanation.to_json() returns (documented in docs/inspect.md).
JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fxclip explain report",
    "type": "object",
    "required": ["schema_version", "model", "parameters", "frozen", "unused", "graph", "summary"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "model": {
            "type": "object",
            "required": ["class", "batch_size", "max_grad_norm", "loss_reduction", "inputs"],
            "additionalProperties": False,
            "properties": {
                "class": {"type": "string"},
                "batch_size": {"type": "string", "description": "as the pass saw it (symbolic or concrete)"},
                "max_grad_norm": {"type": "number", "exclusiveMinimum": 0},
                "loss_reduction": {"enum": ["mean", "sum"]},
                "inputs": {"type": "array", "items": {"type": "string"},
                           "description": "shape and dtype of each example input"},
                "privacy_unit": {"type": ["string", "null"],
                                 "description": "how rows were grouped into privacy units (privacy_unit ids); "
                                 "null: each row is a unit"},
            },
        },
        "parameters": {
            "type": "array",
            "description": "one entry per trainable parameter that received a gradient, in report order",
            "items": {
                "type": "object",
                "required": ["name", "module", "op", "ops", "rule", "strategy", "fallback", "shapes",
                             "extra_flops", "extra_bytes", "uses", "shape", "numel", "dtype", "declines"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "description": "as in model.named_parameters()"},
                    "module": {"type": "string", "description": "module path ('' = root)"},
                    "op": {"type": "string", "description": "the aten ops it feeds, comma-separated"},
                    "ops": {"type": "array", "items": {"type": "string"}},
                    "rule": {"type": "string", "description": "rule(s) that produced its per-sample norm, '+'-joined"},
                    "strategy": {"enum": ["ghost", "instantiate"]},
                    "fallback": {"type": "boolean", "description": "the generic fallback rule was needed"},
                    "shapes": {"type": "object", "additionalProperties": {"type": "string"},
                               "description": "the static shapes that decided the strategy"},
                    "extra_flops": {"type": "integer", "description": "estimated FLOPs added for norm + reweighting"},
                    "extra_bytes": {"type": "integer", "description": "estimated extra memory held for its norm"},
                    "uses": {"type": "integer", "minimum": 1},
                    "declines": {
                        "type": "array", "description": "each rule tried before `rule` that applies to the "
                        "parameter's op, and why it declined (a user-readable reason)",
                        "items": {"type": "object", "required": ["rule", "reason"], "additionalProperties": False,
                                  "properties": {"rule": {"type": "string"}, "reason": {"type": "string"}}}},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "numel": _INT,
                    "dtype": {"type": "string"},
                },
            },
        },
        "frozen": {"type": "array", "items": {"type": "string"}, "description": "requires_grad=False"},
        "unused": {"type": "array", "items": {"type": "string"},
                   "description": "trainable, but received no gradient in this forward"},
        "graph": {
            "type": "object",
            "required": ["nodes", "edges"],
            "additionalProperties": False,
            "properties": {
                "nodes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "op", "target", "phase", "module", "shape", "dtype", "bytes",
                                     "added", "param", "role", "order"],
                        "additionalProperties": False,
                        "properties": {
                            "id": {"type": "string"},
                            "op": {"enum": ["placeholder", "call_function", "call_method", "call_module",
                                            "get_attr", "output"]},
                            "target": {"type": "string"},
                            "phase": {"enum": ["input", "forward", "backward", "output"]},
                            "module": {"type": "string"},
                            "shape": _STR_OR_NULL,
                            "dtype": _STR_OR_NULL,
                            "bytes": {"type": ["integer", "null"]},
                            "added": {"type": "boolean", "description": "inserted by the fxclip pass"},
                            "param": _STR_OR_NULL,
                            "role": {"enum": [None, "norm", "clip", "reweight", "param", "input", "tangent"]},
                            "order": _INT,
                        },
                    },
                },
                "edges": {
                    "type": "array",
                    "items": {"type": "object", "required": ["source", "target"], "additionalProperties": False,
                              "properties": {"source": {"type": "string"}, "target": {"type": "string"}}},
                },
            },
        },
        "summary": {
            "type": "object",
            "required": ["trainable", "frozen", "unused", "ghost", "instantiate", "fallback", "rules",
                         "extra_flops", "extra_bytes", "r", "saved_for_backward", "held_until_r",
                         "graph_nodes", "added_nodes"],
            "additionalProperties": False,
            "properties": {
                "trainable": _INT, "frozen": _INT, "unused": _INT,
                "ghost": _INT, "instantiate": _INT, "fallback": _INT,
                "rules": {"type": "object", "additionalProperties": _INT},
                "extra_flops": _INT, "extra_bytes": _INT,
                "r": {
                    "type": ["object", "null"],
                    "required": ["node", "position", "backward_ops", "norm_inputs", "reweight_users"],
                    "properties": {
                        "node": {"type": "string"}, "position": _INT, "backward_ops": _INT,
                        "norm_inputs": _INT, "reweight_users": _INT,
                    },
                },
                "saved_for_backward": {
                    "type": "object",
                    "required": ["count", "bytes", "activation_bytes", "only_for_norms"],
                    "properties": {"count": _INT, "bytes": _INT, "activation_bytes": _INT,
                                   "only_for_norms": {"type": "array", "items": {"type": "string"}}},
                },
                "held_until_r": {
                    "type": "object",
                    "required": ["count", "bytes", "nodes"],
                    "properties": {"count": _INT, "bytes": _INT,
                                   "nodes": {"type": "array", "items": {"type": "string"}}},
                },
                "graph_nodes": _INT, "added_nodes": _INT,
            },
        },
    },
}


# --------------------------------------------------------------------------- running the pass

def explain(model: nn.Module, *example_inputs, max_grad_norm: float | None = None,
            loss_reduction: str | None = None, loss_fn=None, privacy_unit=None,
            unit_reduction: str | None = None) -> "Explanation":
    """Run one privatized forward+backward of `model` on `example_inputs` and explain the rewrite.

    `model` is a plain module, a `PrivatizedModule` (its max_grad_norm / loss_reduction are the
    defaults then) or a torch.compile'd one. The run happens on a deep copy of the model under a
    forked RNG, so the caller's parameters, `.grad`, buffers, RNG state and privatized module are
    left exactly as they were. The loss is the sum of all floating outputs (divided by the batch
    size for loss_reduction="mean"), unless `loss_fn(output) -> scalar` is given; which rule each
    parameter gets depends on shapes only, not on the loss. `privacy_unit` (B,) ids explains the
    rewrite with privacy units (docs/privacy-units.md): each parameter's row then says how its
    unit norm is computed.
    """
    from .privatize import PrivatizedModule, privatize

    inner = getattr(model, "_orig_mod", model)  # unwrap torch.compile(...)
    if isinstance(inner, PrivatizedModule):
        max_grad_norm = inner.max_grad_norm if max_grad_norm is None else max_grad_norm
        loss_reduction = inner.loss_reduction if loss_reduction is None else loss_reduction
        unit_reduction = inner.unit_reduction if unit_reduction is None else unit_reduction
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"explain expects an nn.Module, got {type(model).__name__}")
    max_grad_norm = 1.0 if max_grad_norm is None else max_grad_norm
    loss_reduction = loss_reduction or "mean"
    if not example_inputs:
        raise ValueError("explain needs example inputs (batch dimension first)")

    work = copy.deepcopy(inner)
    pm = privatize(work, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                   unit_reduction=unit_reduction or "sum")
    units = {} if privacy_unit is None else {"privacy_unit": privacy_unit}
    pm._loss_warned = True  # the report below says whether the loss is checked: no warning too
    batch = next((x.shape[0] for x in tree_leaves(example_inputs)
                  if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    with torch.random.fork_rng(), torch.enable_grad():
        out = pm(*example_inputs, **units)
        if loss_fn is not None:
            loss = loss_fn(out)
        else:
            leaves = [y for y in tree_leaves(out)
                      if isinstance(y, torch.Tensor) and y.is_floating_point() and y.requires_grad]
            if not leaves:
                raise ValueError("the model output has no floating tensor that depends on a trainable parameter")
            loss = sum(y.float().sum() for y in leaves)
            if loss_reduction == "mean":
                loss = loss / batch
        loss.backward()
    report = pm.last_report
    if report is None:
        raise RuntimeError("the fxclip pass produced no report: no trainable parameter reached the output")
    param_info = {n: (tuple(p.shape), p.numel(), str(p.dtype).replace("torch.", ""))
                  for n, p in inner.named_parameters()}
    inputs = [_describe_input(x) for x in example_inputs]
    return Explanation(report, model_class=type(inner).__name__, max_grad_norm=float(max_grad_norm),
                       loss_reduction=loss_reduction, inputs=inputs, param_info=param_info)


def _describe_input(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


# --------------------------------------------------------------------------- graph model

def _hint(x) -> int | None:
    if isinstance(x, int):
        return x
    try:
        h = x.node.hint
        return int(h) if h is not None else None
    except AttributeError:
        try:
            return int(x)
        except Exception:
            return None


def _val_info(val):
    """(shape string, dtype string, bytes) of a node's meta['val'], never its values."""
    if isinstance(val, (list, tuple)):
        parts = [_val_info(v) for v in val]
        shapes = [p[0] for p in parts if p[0] is not None]
        nbytes = [p[2] for p in parts]
        return ("[" + ", ".join(shapes) + "]" if shapes else None, None,
                sum(nbytes) if nbytes and all(b is not None for b in nbytes) else None)
    if isinstance(val, torch.Tensor):
        dims = [str(d) for d in val.shape]
        shape = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
        hints = [_hint(d) for d in val.shape]
        nbytes = (math.prod(hints) * val.element_size()) if all(h is not None for h in hints) else None
        return shape, str(val.dtype).replace("torch.", ""), nbytes
    if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat)):
        return "scalar", type(val).__name__, None
    return None, None, None


def _node_module(node) -> str:
    return module_of(node)[0]


def _target_name(node) -> str:
    if node.op in ("placeholder", "output"):
        return node.op
    t = node.target
    s = getattr(t, "__name__", None) if not isinstance(t, str) else t
    if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
        s = str(t)
    elif s is None:
        s = str(t)
    return s.replace("aten.", "").replace("<built-in function ", "").rstrip(">")


def build_graph(report: RewriteReport) -> nx.DiGraph:
    """The rewritten joint graph as a networkx DiGraph (node id = fx node name)."""
    g = nx.DiGraph()
    graph = report.graph
    nodes = list(graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    modules = {r.name: r.module for r in report.params}

    # Which placeholder is which parameter: the output slot holding a parameter's reweighted
    # gradient (tagged by the pass) names the input index it is the gradient of.
    placeholder_param: dict[str, str] = {}
    by_index = {input_index(n): n for n in nodes if n.op == "placeholder"}
    forward_outputs = []
    outs = output.args[0] if output.args and isinstance(output.args[0], (list, tuple)) else []
    descriptors = output_descriptors(output)
    if not descriptors:
        # The report's graph copy may lack AOTAutograd's output descriptors. A joint graph returns
        # (forward outputs..., one gradient slot per primal input in placeholder order).
        primals = [n for n in nodes if n.op == "placeholder" and input_index(n) is not None]
        n_fwd = len(outs) - len(primals)
        descriptors = [("out", i) for i in range(max(n_fwd, 0))]
        descriptors += [("grad", input_index(p)) for p in primals]
    for pos, (kind, idx) in enumerate(descriptors):
        val = outs[pos] if pos < len(outs) else None
        if kind == "grad" and isinstance(val, torch.fx.Node) and idx in by_index:
            tag = report.added.get(val.name)
            if tag and tag.get("param"):
                placeholder_param[by_index[idx].name] = tag["param"]
        elif kind == "out" and isinstance(val, torch.fx.Node):
            forward_outputs.append(val)

    for order, n in enumerate(nodes):
        shape, dtype, nbytes = _val_info(n.meta.get("val"))
        tag = report.added.get(n.name)
        param = role = None
        module = _node_module(n)
        if tag is not None:
            param, role = tag.get("param"), tag.get("role")
            module = modules.get(param, "") if param else ""
        elif n.op == "placeholder":
            if n.name in placeholder_param:
                param, role = placeholder_param[n.name], "param"
                module = modules.get(param, "")
            else:
                role = "tangent" if n.name.startswith("tangents") else "input"
        g.add_node(n.name, op=n.op, target=_target_name(n), shape=shape, dtype=dtype, bytes=nbytes,
                   module=module, added=tag is not None, param=param, role=role, order=order,
                   phase="")
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)

    fwd = set()
    for o in forward_outputs:
        fwd.add(o.name)
        fwd |= nx.ancestors(g, o.name)
    for name, data in g.nodes(data=True):
        if data["op"] == "placeholder":
            data["phase"] = "input"
        elif data["op"] == "output":
            data["phase"] = "output"
        elif name in fwd and not data["added"]:
            data["phase"] = "forward"
        else:
            data["phase"] = "backward"
    return g


# --------------------------------------------------------------------------- formatting

def _shapes_text(shapes: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shapes.items())


def _is_fallback(rule: str) -> bool:
    return "fallback" in rule.split("+")


# --------------------------------------------------------------------------- the explanation

class Explanation:
    """What the fxclip pass did to one model. Built by explain(); wraps a RewriteReport."""

    def __init__(self, report: RewriteReport, *, model_class: str = "model", max_grad_norm: float = 1.0,
                 loss_reduction: str = "mean", inputs=(), param_info=None):
        self.report = report
        self.model_class = model_class
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self.inputs = list(inputs)
        self.param_info = dict(param_info or {})
        self.graph = build_graph(report)
        self.summary = self._summarize()

    # ---------------------------------------------------------------- analysis
    @property
    def parameters(self):
        return self.report.params

    @property
    def fallback_params(self) -> list[str]:
        return [r.name for r in self.report.params if _is_fallback(r.rule)]

    def _summarize(self) -> dict:
        rep, g = self.report, self.graph
        data = g.nodes
        rules = Counter()
        for r in rep.params:
            for part in r.rule.split("+"):
                rules[part] += 1
        order = sorted(g.nodes, key=lambda n: data[n]["order"])
        backward = [n for n in order if data[n]["phase"] == "backward"]

        # R: the last clip-role node that reweighting nodes read.
        clip = [n for n in order if data[n]["role"] == "clip"]
        r_node = None
        for n in reversed(clip):
            if any(data[u]["role"] == "reweight" for u in g.successors(n)):
                r_node = n
                break
        if r_node is None and clip:
            r_node = clip[-1]
        r_info = None
        held_nodes, held_bytes = [], 0
        if r_node is not None:
            pos = data[r_node]["order"]
            norm_inputs = {a for n in clip for a in g.predecessors(n) if data[a]["role"] == "norm"}
            reweight_users = [u for u in g.successors(r_node) if data[u]["role"] == "reweight"]
            r_info = {"node": r_node, "position": backward.index(r_node) + 1 if r_node in backward else 0,
                      "backward_ops": len(backward), "norm_inputs": len(norm_inputs),
                      "reweight_users": len(reweight_users)}
            # Backward tensors produced before R and read after it: alive while R is computed.
            for n in backward:
                if data[n]["order"] >= pos or data[n]["role"] == "clip":
                    continue
                if any(data[u]["order"] > pos for u in g.successors(n)):
                    held_nodes.append(n)
                    held_bytes += data[n]["bytes"] or 0

        saved, saved_bytes, act_bytes, only_norms = [], 0, 0, []
        for n in order:
            d = data[n]
            if d["phase"] not in ("forward", "input") or d["role"] == "tangent":
                continue
            users = [u for u in g.successors(n) if data[u]["phase"] == "backward"]
            if not users:
                continue
            saved.append(n)
            saved_bytes += d["bytes"] or 0
            if d["phase"] == "forward":
                act_bytes += d["bytes"] or 0
                if all(data[u]["added"] for u in users):
                    only_norms.append(n)
        return {
            "trainable": len(rep.params) + len(rep.unused),
            "frozen": len(rep.frozen),
            "unused": len(rep.unused),
            "ghost": sum(r.strategy == "ghost" for r in rep.params),
            "instantiate": sum(r.strategy == "instantiate" for r in rep.params),
            "fallback": sum(_is_fallback(r.rule) for r in rep.params),
            "rules": dict(sorted(rules.items())),
            "extra_flops": int(sum(r.extra_flops for r in rep.params)),
            "extra_bytes": int(sum(r.extra_bytes for r in rep.params)),
            "r": r_info,
            "saved_for_backward": {"count": len(saved), "bytes": int(saved_bytes),
                                   "activation_bytes": int(act_bytes), "only_for_norms": only_norms},
            "held_until_r": {"count": len(held_nodes), "bytes": int(held_bytes), "nodes": held_nodes},
            "graph_nodes": g.number_of_nodes(),
            "added_nodes": sum(1 for _, d in g.nodes(data=True) if d["added"]),
        }

    def summary_lines(self) -> list[str]:
        s = self.summary
        lines = [
            f"trainable parameters: {s['trainable']} ({s['ghost']} ghost, {s['instantiate']} instantiate; "
            f"{s['fallback']} by the fallback rule)" + (f", {s['unused']} unused" if s["unused"] else ""),
            "rules: " + (", ".join(f"{k} x{v}" for k, v in s["rules"].items()) or "none"),
            f"extra compute for norms + reweighting: {fmt_count(s['extra_flops'])} FLOP".replace(" K FLOP", " KFLOP")
            .replace(" M FLOP", " MFLOP").replace(" G FLOP", " GFLOP"),
            f"extra memory held for norms: {fmt_bytes(s['extra_bytes'])}",
        ]
        r = s["r"]
        if r:
            lines.append(
                f"R = min(1, C/(n+1e-6)) computed once in the backward at node {r['node']} "
                f"(backward op {r['position']} of {r['backward_ops']}), from {r['norm_inputs']} per-parameter "
                f"squared norms; {r['reweight_users']} reweighting ops read it")
        sv, h = s["saved_for_backward"], s["held_until_r"]
        lines.append(
            f"backward keeps alive: {sv['count']} forward tensors ({fmt_bytes(sv['activation_bytes'])} of "
            f"activations, {fmt_bytes(sv['bytes'] - sv['activation_bytes'])} of inputs/parameters)"
            + (f", {len(sv['only_for_norms'])} of them only for the norms" if sv["only_for_norms"] else "")
            + f"; {h['count']} backward tensors ({fmt_bytes(h['bytes'])}) are held until R exists")
        lines.append(f"rewritten joint graph: {s['graph_nodes']} nodes, {s['added_nodes']} added by fxclip")
        timed = [r for r in self.report.params if r.shapes.get("chosen by") == "measured"]
        if timed:
            lines.append("ghost or instantiate, timed at compile time on the real shapes: " + "; ".join(
                f"{r.name} {r.strategy} (ghost {r.shapes.get('ghost time')}, instantiate "
                f"{r.shapes.get('instantiate time')})" for r in timed))
        return lines

    # ---------------------------------------------------------------- text
    def rows(self) -> list[dict]:
        out = []
        rank = {name: i for i, name in enumerate(self.param_info)}  # model.named_parameters() order
        for r in sorted(self.report.params, key=lambda r: rank.get(r.name, len(rank))):
            shape, numel, dtype = self.param_info.get(r.name, ((), 0, ""))
            out.append({
                "name": r.name, "module": r.module, "op": ", ".join(r.ops), "ops": list(r.ops),
                "rule": r.rule, "strategy": r.strategy, "fallback": _is_fallback(r.rule),
                "shapes": {str(k): str(v) for k, v in r.shapes.items()},
                "extra_flops": int(r.extra_flops), "extra_bytes": int(r.extra_bytes), "uses": int(r.uses),
                "shape": [int(d) for d in shape], "numel": int(numel), "dtype": dtype,
                "declines": [{"rule": rule, "reason": why} for rule, why in r.declines],
            })
        return out

    def __str__(self) -> str:
        head = (f"fxclip explain: {self.model_class}, batch size {self.report.batch_size}, "
                f"max_grad_norm={self.max_grad_norm}, loss_reduction={self.loss_reduction}\n"
                + ("loss: checked (loss_fn traced with the model; only a sum/mean may follow)"
                   if self.report.loss_checked else
                   "loss: unchecked (computed outside the privatized model: pass loss_fn= to "
                   "fxclip.privatize to prove it keeps samples apart)")
                + (f"\nprivacy unit: {self.report.privacy_unit}" if self.report.privacy_unit else ""))
        cols = ["parameter", "module", "op", "rule", "strategy", "decided by", "+FLOPs", "+memory", "uses"]
        table = []
        for row in self.rows():
            table.append([row["name"], row["module"] or "(root)", _clip_text(row["op"], 28), row["rule"],
                          row["strategy"], _clip_text(_shapes_text(row["shapes"]), 40),
                          fmt_count(row["extra_flops"]), fmt_bytes(row["extra_bytes"]), str(row["uses"])])
        for name in self.report.frozen:
            table.append([name, "", "", "-", "frozen", "", "", "", ""])
        for name in self.report.unused:
            table.append([name, "", "", "-", "unused", "(no gradient)", "", "", ""])
        widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(cols)]
        right = {6, 7, 8}

        def line(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = [head, "", line(cols), line(["-" * w for w in widths])]
        out += [line(r) for r in table]
        out += self.unit_lines()
        out += self.decline_lines()
        out += ["", "summary:"] + ["  " + s for s in self.summary_lines()]
        return "\n".join(out)

    def unit_lines(self) -> list[str]:
        """With privacy units: how each parameter's per-unit squared norm is computed."""
        lines = [f"  {row['name']}: {row['shapes']['unit norm']}" for row in self.rows()
                 if "unit norm" in row["shapes"]]
        return ["", "unit norms (privacy units):"] + lines if lines else []

    def decline_lines(self) -> list[str]:
        """Why each parameter off its best rule is there: every rule that applied and declined."""
        lines = [f"  {row['name']} ({row['rule']}): " + "; ".join(f"{d['rule']}: {d['reason']}"
                                                                for d in row["declines"])
                 for row in self.rows() if row["declines"] and row["fallback"]]
        return ["", "why not a cheaper rule:"] + lines if lines else []

    def __repr__(self) -> str:
        s = self.summary
        return (f"<Explanation {self.model_class}: {len(self.report.params)} params, {s['ghost']} ghost, "
                f"{s['instantiate']} instantiate, {s['fallback']} fallback>")

    # ---------------------------------------------------------------- json
    def to_json(self) -> dict:
        nodes = []
        for name, d in sorted(self.graph.nodes(data=True), key=lambda kv: kv[1]["order"]):
            nodes.append({"id": name, "op": d["op"], "target": d["target"], "phase": d["phase"],
                          "module": d["module"], "shape": d["shape"], "dtype": d["dtype"],
                          "bytes": d["bytes"], "added": d["added"], "param": d["param"], "role": d["role"],
                          "order": d["order"]})
        edges = [{"source": u, "target": v} for u, v in self.graph.edges]
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {"class": self.model_class, "batch_size": str(self.report.batch_size),
                      "max_grad_norm": self.max_grad_norm, "loss_reduction": self.loss_reduction,
                      "inputs": list(self.inputs), "privacy_unit": self.report.privacy_unit or None},
            "parameters": self.rows(),
            "frozen": list(self.report.frozen),
            "unused": list(self.report.unused),
            "graph": {"nodes": nodes, "edges": edges},
            "summary": json.loads(json.dumps(self.summary)),
        }

    # ---------------------------------------------------------------- dot
    def to_dot(self) -> str:
        g = self.graph
        lines = ["digraph fxclip {", "  rankdir=TB;",
                 '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=10];',
                 '  edge [color="#888888", arrowsize=0.6];']
        clusters = defaultdict(list)
        for n, d in g.nodes(data=True):
            if d["added"]:
                clusters[d["param"]].append(n)
        routes = {r.name: r for r in self.report.params}
        for i, (param, members) in enumerate(sorted(clusters.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))):
            if param is None:
                label = "clip factor R = min(1, C / (n + 1e-6))"
            else:
                r = routes.get(param)
                label = f"{param}: {r.rule}, {r.strategy}" if r else param
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f'    label={_dot_str(label)}; style="rounded,filled"; color="#e6a23c"; fillcolor="#fff6e5";')
            for n in members:
                lines.append(f"    {_dot_str(n)};")
            lines.append("  }")
        fills = {"forward": "#e8f1fb", "backward": "#eef7ee", "input": "#f3f3f3", "output": "#f3f3f3"}
        for n, d in sorted(g.nodes(data=True), key=lambda kv: kv[1]["order"]):
            label = f"{n}\n{d['target']}" + (f"\n{d['shape']}" if d["shape"] else "")
            if d["role"] == "param":
                label += f"\nparam {d['param']}"
            attrs = [f"label={_dot_str(label)}"]
            if d["added"]:
                attrs += ['fillcolor="#ffd591"', 'color="#d46b08"', "penwidth=2"]
            else:
                attrs.append(f'fillcolor="{fills.get(d["phase"], "#ffffff")}"')
            attrs.append(f"tooltip={_dot_str(d['module'] or '(root)')}")
            lines.append(f"  {_dot_str(n)} [{', '.join(attrs)}];")
        for u, v in g.edges:
            extra = ' [color="#d46b08"]' if g.nodes[v]["added"] else ""
            lines.append(f"  {_dot_str(u)} -> {_dot_str(v)}{extra};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- html
    def to_html(self, *, flat_view_limit: int = 1500) -> str:
        from ._explain_html import render_html

        return render_html(self, flat_view_limit=flat_view_limit)


def _clip_text(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


explain.JSON_SCHEMA = JSON_SCHEMA  # fxclip.explain.JSON_SCHEMA, once fxclip exports explain()
