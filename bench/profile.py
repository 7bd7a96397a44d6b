"""Profile one configuration on one model: where does a step's time go?

    python -m bench.profile --model cnn --batch-size 16 --config fxclip_compiled [--steps 5]

Prints torch.profiler's table (self CPU time, top ops) for steady-state steps, and the
pass report of fxclip (which rule handled each parameter) when the configuration is fxclip.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from . import configs as cfgs
from .worker import _make, _setup_torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--config", required=True, choices=cfgs.ALL_CONFIGS)
    ap.add_argument("--compare", default="plain_compiled", help="also time this config ('' for none)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace", default=None, help="write a chrome trace here")
    a = ap.parse_args(argv)
    _setup_torch(a.threads)
    spec, base, x, y = _make(a.model, a.batch_size)
    names = [a.config] + ([a.compare] if a.compare and a.compare != a.config else [])
    for name in names:
        r = cfgs.build(name, copy.deepcopy(base))
        t0 = time.perf_counter()
        r.step(x, y)
        print(f"[{name}] first step {time.perf_counter() - t0:.2f} s")
        for _ in range(2):
            r.step(x, y)
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            r.step(x, y)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        print(f"[{name}] median step {1e3 * ts[len(ts) // 2]:.1f} ms")
        if name != a.config:
            continue
        rep = getattr(r._keep[0], "last_report", None) if r._keep else None
        if rep is not None:
            print(f"[{name}] pass report:\n{rep}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            for _ in range(a.steps):
                r.step(x, y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=12))
        if a.trace:
            prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
