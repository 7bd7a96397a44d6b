"""The Gaussian noise of a DP step on the CPU: each way of adding N(0, s^2) to every gradient.

    python -m bench.noise_streams                  # digits and mlp gradients -> results/noise_streams.json
    python -m bench.noise_streams --models digits --rounds 5 --no-save

DP-SGD adds s * z to every gradient coordinate at every step. On the digits MLP that is 9,610
values in 4 tensors (fixed costs dominate), on the 16.4M-parameter MLP 16.4M values in 4 tensors
(the draw dominates). The variants, each over the model's gradient shapes (float32, CPU):

    add_only      the same add with z drawn once beforehand: the add's own cost, no draw
    torch         fxclip.noise.NoiseSource on a torch.Generator (Mersenne Twister, torch.randn),
                  as DPOptimizer's default noise_rng="torch" draws and adds it
    philox        NoiseSource(philox=True): noise_rng="philox", drawn and added in one C pass
    inductor      torch.compile'd `g.add_(torch.randn_like(g), alpha=s)` for every gradient:
                  the noise drawn inside a compiled graph by Inductor's own random lowering
                  (what adding the noise in the compiled backward would cost)

Timing: all variants built and warmed up (the compile included) in one process, then timed in
interleaved rounds (order rotating); per round the mean per call; median and min over rounds,
and ns per value.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fxclip.noise import NoiseSource

from .models import MODELS

RESULTS = Path(__file__).parent / "results" / "noise_streams.json"
VARIANTS = ("add_only", "torch", "philox", "inductor")
STD = 0.01


def gradient_shapes(name: str) -> list[torch.Size]:
    return [p.shape for p in MODELS[name].build().parameters()]


@torch.compile
def _inductor_add(grads: list, std: float) -> None:
    for g in grads:
        g.add_(torch.randn_like(g), alpha=std)


def build(variant: str, grads: list, seed: int = 0):
    """A no-argument callable that adds s * z to every gradient in place."""
    generator = torch.Generator().manual_seed(seed)
    if variant == "add_only":
        z = [torch.randn(g.shape, generator=generator) for g in grads]
        return lambda: torch._foreach_add_(grads, z, alpha=STD)
    if variant in ("torch", "philox"):
        source = NoiseSource(generator, secure=False, prefetch=False, philox=variant == "philox")
        return lambda: source.add_(grads, STD)
    if variant == "inductor":
        torch.manual_seed(seed)
        return lambda: _inductor_add(grads, STD)
    raise ValueError(variant)


def measure(name: str, rounds: int, calls: int, warmup: int) -> dict:
    shapes = gradient_shapes(name)
    values = sum(s.numel() for s in shapes)
    steps = {}
    for v in VARIANTS:
        steps[v] = build(v, [torch.zeros(s) for s in shapes])
        for _ in range(warmup):
            steps[v]()
    times = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            start = time.perf_counter()
            for _ in range(calls):
                steps[v]()
            times[v].append((time.perf_counter() - start) / calls)
    out = {"model": name, "tensors": len(shapes), "values": values, "rounds": rounds, "calls": calls,
           "variants": {}}
    for v, t in times.items():
        median, least = statistics.median(t), min(t)
        out["variants"][v] = {"median_us": 1e6 * median, "min_us": 1e6 * least,
                              "median_ns_per_value": 1e9 * median / values}
    return out


def table(results: list[dict]) -> str:
    lines = ["| gradients | values | variant | us per step (median / min) | ns per value | ratio to torch |",
             "|---|---|---|---|---|---|"]
    for r in results:
        base = r["variants"]["torch"]["median_us"]
        for v, m in r["variants"].items():
            lines.append(f"| {r['model']} ({r['tensors']} tensors) | {r['values']:,} | {v} | "
                         f"{m['median_us']:.1f} / {m['min_us']:.1f} | {m['median_ns_per_value']:.2f} | "
                         f"{m['median_us'] / base:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits", "mlp"], choices=["digits", "mlp"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, args.rounds, {"digits": 2000, "mlp": 3}[name], args.warmup)
               for name in args.models]
    print(table(results))
    if not args.no_save:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "inductor_fallback_random": torch._inductor.config.fallback_random,
                "note": "CPU, shared 2-core machine; mean per call within a round, median/min over rounds"}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
