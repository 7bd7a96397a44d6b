"""A batch of one sample: the gradient is that sample's gradient.

Graphs compiled for B = 1 are specialized by Dynamo, and Inductor's decompositions then
rewrite mm with one row into pointwise ops, hiding the linear structure. None is needed.
"""
from __future__ import annotations

from ..layout import known_equal
from .base import Decline, InstantiatedRoute, replay


class BatchOfOneRoute(InstantiatedRoute):
    def per_sample(self, ctx):
        c = self.contribution
        return ctx.builder.call(lambda g: replay(c.path, c.root, g).unsqueeze(0), c.root)


def match(contribution, ctx):
    if not (isinstance(ctx.batch_size, int) and known_equal(ctx.batch_size, 1)):
        return Decline("the batch size is not a fixed 1", applies=False)
    return BatchOfOneRoute("batch_of_one", "instantiate", contribution,
                           shapes={"B": "1"}, extra_flops=2 * ctx.param_numel, extra_bytes=4 * ctx.param_numel)
