"""Peak live bytes of one whole training step, optimizer included, from torch.profiler's
allocation events (exact byte counts, not RSS): does DP-SGD hold extra gradient-sized buffers?

    python -m bench.step_memory            # writes results/step_memory.json

The seed MLP (Linear 5120->2560, ReLU, Linear 2560->1280), B=16, compiled: plain SGD, and
fxclip with DPOptimizer(SGD) (noise and the clipped sum of loss_reduction="mean") and with
make_private's defaults. The step is forward, loss, backward, optimizer step, zero_grad.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType

MB = 2 ** 20


def peak_allocations(fn) -> tuple[int, list[int]]:
    """(peak bytes live while fn() runs, sizes of all its allocations), by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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


def _steps(base, x, y):
    import fxclip

    plain = torch.compile(copy.deepcopy(base), dynamic=False)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    model = copy.deepcopy(base)
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="mean")
    private = torch.compile(pm, dynamic=False)
    dp_opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=1.0,
                                expected_batch_size=x.shape[0], loss_reduction="mean")
    return {"plain SGD": (plain, plain_opt), "fxclip DPOptimizer(SGD)": (private, dp_opt)}


def measure(batch_size: int = 16) -> dict:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5120, 2560), nn.ReLU(), nn.Linear(2560, 1280))
    x, y = torch.randn(batch_size, 5120), torch.randint(0, 1280, (batch_size,))
    out = {"model": "mlp 5120-2560-1280", "batch_size": batch_size,
           "gradient_mb": sum(p.numel() for p in base.parameters()) * 4 / MB, "configs": {}}
    for name, (model, opt) in _steps(base, x, y).items():
        def step(model=model, opt=opt):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        for _ in range(2):  # compile, then one steady step
            step()
        peak, sizes = peak_allocations(step)
        out["configs"][name] = {"peak_live_mb": peak / MB, "largest_allocations_mb": [s / MB for s in sizes[:6]]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_memory.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = measure(a.batch_size)
    Path(a.out).write_text(json.dumps(res, indent=1))
    for name, r in res["configs"].items():
        print(f"{name}: peak live {r['peak_live_mb']:.1f} MiB; largest allocations (MiB) "
              f"{[round(s, 1) for s in r['largest_allocations_mb']]}")


if __name__ == "__main__":
    main()
