"""What rules read while a joint graph is rewritten (passes/rules): the graph, its batch
layouts, the batch size, the output gradients and a cache of shared work."""
from __future__ import annotations

from .layout import size_hint


class Context:
    def __init__(self, graph, builder, layouts, bref, output_grads):
        self.graph, self.builder, self.layouts = graph, builder, layouts
        self.bref = bref  # a (B, ...) tensor node: inside traced fns, B = bref.shape[0]
        self.batch_size = bref.meta["val"].shape[0]
        self.batch_hint = size_hint(self.batch_size)
        self.output_grads = output_grads
        self.after_output_grads = descendants(output_grads)
        self.param_shape: tuple = ()  # of the parameter being routed
        self.param_numel = 0
        self._memo: dict = {}

    def for_param(self, param) -> "Context":
        """Point the context at `param` (rules read its shape and size)."""
        self.param_shape = tuple(param.meta["val"].shape)
        self.param_numel = size_hint(param.meta["val"].numel())
        return self

    def per_sample(self, route):
        return self.once(("per-sample", id(route)), lambda: route.per_sample(self))

    def once(self, key, make):
        """make() the first time `key` is asked for, the same node after: shared work."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def descendants(seeds) -> set:
    """Every node computed from `seeds` (not the seeds themselves)."""
    found = set()
    stack = list(seeds)
    while stack:
        for user in stack.pop().users:
            if user not in found:
                found.add(user)
                stack.append(user)
    return found
