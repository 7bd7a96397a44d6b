"""Memory of the compiled backward: the rewrite holds no extra parameter-sized buffer.

Peak bytes come from torch.profiler's allocation events inside one backward (not timings): the
privatized backward may hold the per-sample buffers that explain reports (row norms, Grams,
R-scaled rows), nothing of a weight gradient's size beyond the gradients themselves.
"""
import copy

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType

import fxclip


def _backward_allocations(model, x):
    """(peak bytes live during loss.backward(), sizes of all allocations in it), by the profiler."""
    loss = model(x).square().sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live, current, peak = {}, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            current += size
        elif ptr in live:
            current -= live.pop(ptr)
        peak = max(peak, current)
    return peak, sorted((s for _, _, s in events if s > 0), reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 256), (8, 4, 256)])  # one row per sample; T=4 rows (Grams)
def test_compiled_backward_holds_no_extra_gradient_sized_buffer(shape):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    x = torch.randn(*shape)
    plain = torch.compile(copy.deepcopy(base), dynamic=False)
    private = torch.compile(fxclip.privatize(copy.deepcopy(base), max_grad_norm=1.0, loss_reduction="sum"),
                            dynamic=False)
    measured = {}
    for name, model in (("plain", plain), ("private", private)):
        for _ in range(2):  # the second backward runs the compiled code without compiling
            for p in model.parameters():
                p.grad = None
            measured[name] = _backward_allocations(model, x)
    report = fxclip.explain(base, x, max_grad_norm=1.0, loss_reduction="sum").report
    assert {r.rule for r in report.params} == {"linear", "unreduce"}
    per_sample = sum(r.extra_bytes for r in report.params)
    (plain_peak, plain_sizes), (private_peak, private_sizes) = measured["plain"], measured["private"]
    smallest_weight = 4 * min(p.numel() for p in base.parameters() if p.dim() == 2)
    # the weight-gradient-sized allocations are the weight gradients, in both
    assert [s for s in private_sizes if s >= smallest_weight] == [s for s in plain_sizes if s >= smallest_weight]
    # R-scaled rows of one operand per layer (at most B*T x 512 and B*T x 128 floats): the only other extra
    scaled_rows = 4 * x[..., 0].numel() * (512 + 128)
    assert private_peak <= plain_peak + per_sample + scaled_rows, (private_peak, plain_peak, per_sample)
