"""What the pass did to one joint graph: the single source of truth for explain() and tests."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx

from .protocol import ReportKey

# How often each rule fired, process-wide: tests assert a rule fired, not only that numbers match.
rule_counters: Counter = Counter()


@dataclass
class ParamRoute:
    name: str  # as in model.named_parameters()
    module: str  # module path of the first forward op using it ("" = root)
    ops: list[str]  # aten ops that consume the parameter in the forward
    rule: str  # rule that produced its per-sample norm: "linear", "unreduce", "fallback", ...
    strategy: str  # "ghost" (norm from activations and output grads) or "instantiate"
    shapes: dict  # the static shapes that decided the strategy, as strings
    extra_flops: int  # estimated FLOPs added for its norm and reweighting
    extra_bytes: int  # estimated extra memory held for its norm
    uses: int = 1  # number of gradient contributions (tied / shared parameters: > 1)
    # (rule, why it declined) for each rule tried before `rule` that applies to its op, in order
    declines: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RewriteReport:
    params: list[ParamRoute]
    frozen: list[str]  # parameters with requires_grad=False
    batch_size: str  # symbolic or concrete, as a string
    graph: torch.fx.Graph  # the joint graph after the rewrite (a copy)
    # node name -> {"param": name or None, "role": "norm" | "clip" | "reweight"} for added nodes
    added: dict[str, dict] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # trainable but unused in this forward: no grad
    # the per-sample losses were traced with the model (privatize(loss_fn=...)): a mixing loss
    # was refused and the reduction after it is checked; else the loss outside is unchecked
    loss_checked: bool = False
    key: ReportKey | None = None  # which compiled graphs this report describes
    # privacy units (pm(x, privacy_unit=ids)): how rows were grouped; "" = each row is a unit
    privacy_unit: str = ""

    def param_names(self) -> frozenset:
        """The trainable parameters of the rewritten model (used in the forward or not)."""
        return frozenset([r.name for r in self.params] + self.unused)

    def route(self, name: str) -> ParamRoute:
        for r in self.params:
            if r.name == name:
                return r
        raise KeyError(name)
