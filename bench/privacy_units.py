"""The cost of clipping privacy units (groups of rows) against clipping rows, in one process.

    python -m bench.privacy_units                      # mlp B=32, gpt B=16 -> results/privacy_units.json
    python -m bench.privacy_units --models mlp --rounds 3 --no-save

Per model, four configurations of the same compiled fxclip forward+backward (torch.compile,
dynamic=False; loss: sum of per-sample cross entropies):

- rows:          pm(x), no ids: every row is its own unit (today's row clipping)
- units of 1:    pm(x, privacy_unit=ids) with distinct ids: the unit machinery on row units
- units of 4:    ids = a user per 4 rows, the rows of a user spread through the batch
- one unit:      every row has the same id

The unit norms need the Grams of ALL B*T rows (units can be any rows, docs/privacy-units.md) or
per-row gradients summed by unit; the cost model picks per parameter, and the route counts are
recorded. Timing: after the compile and 2 warm-up steps, interleaved rounds (the order rotates
each round), each configuration's step repeated up to ~0.25 s per round; median and min over the
rounds, and their ratios to `rows`.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

import fxclip

from .models import MODELS, PerSampleCE

RESULTS = Path(__file__).parent / "results" / "privacy_units.json"
BATCH = {"mlp": 32, "gpt": 16}
CONFIGS = ("rows", "units of 1", "units of 4", "one unit")


def unit_ids(config: str, b: int, g: torch.Generator) -> torch.Tensor | None:
    if config == "rows":
        return None
    if config == "units of 1":
        return torch.randperm(b, generator=g)
    if config == "units of 4":
        return (torch.arange(b) // 4)[torch.randperm(b, generator=g)]
    return torch.zeros(b, dtype=torch.long)


def build(name: str, config: str, b: int):
    """(step function, unit-norm route counts) of one configuration, on its own copy of the model."""
    torch.manual_seed(0)
    model = MODELS[name].build()
    g = torch.Generator().manual_seed(1)
    x, y = MODELS[name].make_batch(b, g)
    ids = unit_ids(config, b, g)
    kwargs = {} if ids is None else {"privacy_unit": ids}
    routes = route_counts(model, x, ids)
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="sum")
    fwd = torch.compile(pm, dynamic=False)
    crit = PerSampleCE("sum")

    def step():
        for p in model.parameters():
            p.grad = None
        crit(fwd(x, **kwargs), y).backward()

    return step, routes


def route_counts(model, x, ids) -> dict:
    """How many parameters get each unit-norm route (each row route without ids), from
    fxclip.explain (a compiled graph served from Inductor's cache has no report of its own)."""
    report = fxclip.explain(model, x, privacy_unit=ids).report
    return dict(Counter(r.shapes.get("unit norm", f"row: {r.strategy}") for r in report.params))


def measure(name: str, rounds: int) -> dict:
    b = BATCH[name]
    steps, routes = {}, {}
    for config in CONFIGS:
        steps[config], routes[config] = build(name, config, b)
        for _ in range(3):  # compile + warm-up
            steps[config]()
    times = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for config in order:
            n, start = 0, time.perf_counter()
            while n == 0 or (time.perf_counter() - start < 0.25 and n < 20):
                steps[config]()
                n += 1
            times[config].append((time.perf_counter() - start) / n)
    out = {"model": name, "batch": b, "configs": {}}
    base = times["rows"]
    for config in CONFIGS:
        t = times[config]
        out["configs"][config] = {
            "ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t),
            "ratio_median": statistics.median(t) / statistics.median(base), "ratio_min": min(t) / min(base),
            "routes": routes[config]}
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | B | configuration | ms/step median (min) | / rows: median (min) | unit-norm routes |",
             "|---|---:|---|---:|---:|---|"]
    for r in results:
        for config, c in r["configs"].items():
            lines.append(f"| {r['model']} | {r['batch']} | {config} | {c['ms_median']:.1f} ({c['ms_min']:.1f}) | "
                         f"{c['ratio_median']:.2f}x ({c['ratio_min']:.2f}x) | "
                         + ", ".join(f"{k}: {v}" for k, v in sorted(c["routes"].items())) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for name in args.models:
        results.append(measure(name, args.rounds))
        print(table(results[-1:]), flush=True)
    print(table(results))
    if not args.no_save:
        import os

        doc = {"what": __doc__.split("\n")[0], "torch": torch.__version__, "platform": platform.platform(),
               "load_average_at_end": os.getloadavg(), "results": results}
        RESULTS.write_text(json.dumps(doc, indent=1))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
