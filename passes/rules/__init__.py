"""Per-parameter rules: how one gradient contribution gets its per-sample norm and reweighting.

A rule is a module with a `match(contribution, ctx) -> Route | Decline` function: a Route when
the rule applies, else a Decline saying why not (shown by explain). A match raises nothing
except a refusal that holds whatever rule would take the contribution. RULES lists the rules in
the order they are tried (most specific first, the generic fallback last). What rules share
lives in rules/base.py (re-exported here).
"""
from __future__ import annotations

from . import batch_of_one, conv, embedding, embedding_bag, fallback, linear, unreduce
from .base import (  # noqa: F401
    Contribution,
    Decline,
    InstantiatedRoute,
    Route,
    cat_slot,
    cat_slots,
    is_zeros,
    norm_sq_of,
    normalized,
    replay,
    scale_by_sample,
    slice_bounds,
    split_batch,
    weighted_sum,
    zero_dropped,
    zero_padding_of,
)

# The order rules are tried in: the first that matches a contribution takes it. Written out, so
# that no import order decides it.
RULES = (
    ("batch_of_one", batch_of_one.match),
    ("linear", linear.match),
    ("conv", conv.match),
    ("embedding", embedding.match),
    ("embedding_bag", embedding_bag.match),
    ("unreduce", unreduce.match),
    ("fallback", fallback.match),  # matches every contribution
)


def registered_rules() -> list[str]:
    return [name for name, _ in RULES]
