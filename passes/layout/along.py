"""Ops that combine values along some dims and keep every other dim in place (scans, softmax,
sorts, flips, padding): MIXED when the batch sits in a combined dim, so the mixing check
(passes/mixing.py) can name the op."""
from __future__ import annotations

import torch

from .base import _along, _arg, _as_list, _register, aten

_register(_along(lambda n, nd: [_arg(n, 1, "dim", -1)]),
          aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default,
          aten.cummax.default, aten.cummin.default, aten._softmax.default,
          aten._log_softmax.default, aten.sort.default, aten.argsort.default)
_register(_along(lambda n, nd: [n.kwargs.get("dim", -1)]), aten.sort.stable, aten.argsort.stable)
_register(_along(lambda n, nd: [_arg(n, 1, "dim", -1)]), aten.glu.default)
_register(_along(lambda n, nd: [_arg(n, 2, "dim", -1)]), aten.glu_backward.default)
_register(_along(lambda n, nd: [_arg(n, 2, "dim", -1)]), aten.topk.default, aten.kthvalue.default)
_register(_along(lambda n, nd: _as_list(n.args[1])), aten.flip.default, torch.ops.prims.rev.default)
_register(_along(lambda n, nd: _as_list(_arg(n, 2, "dims", [])) or range(nd)), aten.roll.default)
# padding changes the size of the padded dims: padding the batch adds samples
_register(_along(lambda n, nd: [nd - 1 - i // 2 for i, p in enumerate(n.args[1]) if p != 0]),
          aten.constant_pad_nd.default)
