"""The whole training step, private vs plain: loader, zero_grad, forward+backward, optimizer step.

    python -m bench.whole_step                          # digits, mlp, gpt -> results/whole_step.json
    python -m bench.whole_step --models digits --rounds 5 --no-save
    python -m bench.whole_step --models digits --profile   # + torch.profiler table of the private step
    python -m bench.whole_step --models digits --fixed-batch --out bench/results/whole_step_fixed.json
                                                        # no loader: the demo's timed line

The other benchmarks time forward+backward only. A user times the loop below, so this one does:

    private: for x, y in poisson_loader:  opt.zero_grad(); pm(x, target=y).mean().backward(); opt.step()
    plain:   for x, y in loader:          opt.zero_grad(); loss(model(x), y).mean().backward(); opt.step()

`private` is fxclip.make_private(model, SGD, loader, noise_multiplier=1.0, max_grad_norm=1.0) with
its Poisson loader (expected batch B) and DPOptimizer (state read, noise, accountant);
`private_prefetch` the same with prefetch_noise=True (the next step's noise drawn on a worker
thread while the loop loads data and runs forward and backward); `philox` and `philox_prefetch`
the same two with noise_rng="philox" (fxclip.philox's counter-based stream); `plain` a shuffled DataLoader of
batch B and plain SGD. The models (with the loss) are torch.compile'd.
`floor` is the private loop with DPOptimizer's step and zero_grad replaced by the least any
DP-SGD step does on the host, inline, with none of DPOptimizer's checks (FloorOptimizer): what the
private step would cost if its own Python cost nothing. `floor_no_draw` the same with the noise
drawn once and reused: the cost if the Gaussian draw were free (drawn elsewhere, in parallel).
Neither is private (no checks; no_draw reuses its noise): they bound what optimizing
DPOptimizer can reach on this machine.
Each phase of each step is timed on its own (perf_counter around it; CPU ops are synchronous), so
the breakdown says where the private step's extra time goes.

Timing: both variants built and warmed up (compilation, the dynamic-shape recompile) in one
process, then timed in interleaved rounds (order alternating); per round the mean per step; the
tables quote the median and the min over rounds, and their ratios private / plain.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxclip

from .models import MODELS, PerSampleCE

PHASES = ("loader", "zero_grad", "fwd_bwd", "opt_step")
VARIANTS = ("private", "private_prefetch", "philox", "philox_prefetch", "floor", "floor_no_draw", "plain")
# model -> (expected batch size, dataset size): digits as in examples/demo.py (1347 training images)
SETUPS = {"digits": (64, 1347), "mlp": (16, 512), "gpt": (16, 256)}
RESULTS = Path(__file__).parent / "results" / "whole_step.json"


class _WithLoss(nn.Module):
    """The model and its per-sample loss, compiled together as make_private's loss_fn is."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.loss = PerSampleCE("none")

    def forward(self, x, target):
        return self.loss(self.model(x), target)


def _forever(loader):
    while True:
        yield from loader


class Stepper:
    """One variant's training loop, a step at a time, each phase timed."""

    def __init__(self, loader, opt, fwd_bwd):
        self.batches = _forever(loader)
        self.opt = opt
        self.fwd_bwd = fwd_bwd

    def step(self) -> list[float]:
        clock = time.perf_counter
        t0 = clock()
        x, y = next(self.batches)
        t1 = clock()
        self.opt.zero_grad()
        t2 = clock()
        if len(y):  # an empty Poisson batch has no loss; step() still adds noise and counts
            self.fwd_bwd(x, y)
        t3 = clock()
        self.opt.step()
        t4 = clock()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def _dataset(name: str, size: int, seed: int) -> TensorDataset:
    return TensorDataset(*MODELS[name].make_batch(size, torch.Generator().manual_seed(seed)))


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # both variants start from the same weights
    return MODELS[name].build()


def build_private(name: str, dataset, batch: int, seed: int, prefetch_noise: bool = False,
                  noise_rng: str = "torch") -> Stepper:
    model = _model(name, seed)
    pm, opt, loader = fxclip.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.05), DataLoader(dataset, batch_size=batch),
        noise_multiplier=1.0, max_grad_norm=1.0, loss_fn=PerSampleCE("none"),
        generator=torch.Generator().manual_seed(seed), prefetch_noise=prefetch_noise, noise_rng=noise_rng)
    run = torch.compile(pm)
    return Stepper(loader, opt, lambda x, y: run(x, target=y).mean().backward())


class FloorOptimizer:
    """The least a DP-SGD step does on the host, inline: read the backward's device state (the
    one sync) and reset it, draw N(0, 1) for every gradient coordinate into one reused buffer,
    add sigma C / B times it to the gradients in one fused op, count the step, run the inner
    optimizer. `draw=False`: the buffer is drawn once and reused (the draw made free)."""

    def __init__(self, opt: fxclip.DPOptimizer, draw: bool):
        self.inner = opt.original_optimizer
        self.state = opt.module.device_state
        self.params = [p for group in self.inner.param_groups for p in group["params"]]
        sizes = [p.numel() for p in self.params]
        self.pieces = torch.empty(sum(sizes)).split(sizes)
        self.noise = [piece.view(p.shape) for piece, p in zip(self.pieces, self.params)]
        self.generator = torch.Generator().manual_seed(0)
        self.std = opt.noise_multiplier * opt.max_grad_norm / opt.expected_batch_size
        self.sigma, self.q, self.accountant = opt.noise_multiplier, opt.sample_rate, opt.accountant
        self.draw = draw
        self._fill()

    def _fill(self):
        for piece in self.pieces:  # one draw per parameter, as DPOptimizer's stream
            piece.normal_(generator=self.generator)

    def zero_grad(self):
        self.inner.zero_grad()
        self.state.reset()

    def step(self):
        self.state.read()
        self.state.reset()
        if self.draw:
            self._fill()
        pairs = [(p.grad, z) for p, z in zip(self.params, self.noise) if p.grad is not None]
        if pairs:
            torch._foreach_add_(*map(list, zip(*pairs)), alpha=self.std)
        self.accountant.step(self.sigma, self.q)
        self.inner.step()


def build_floor(name: str, dataset, batch: int, seed: int, draw: bool) -> Stepper:
    stepper = build_private(name, dataset, batch, seed)
    stepper.opt = FloorOptimizer(stepper.opt, draw)
    return stepper


def build_plain(name: str, dataset, batch: int, seed: int) -> Stepper:
    model = _model(name, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # drop_last: every plain batch has B rows, the Poisson batches B on average
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    run = torch.compile(_WithLoss(model))
    return Stepper(loader, opt, lambda x, y: run(x, y).mean().backward())


def _summary(rounds: list[list[float]]) -> dict:
    """Per phase and in total: median and min over rounds of the mean seconds per step."""
    columns = {ph: [r[i] for r in rounds] for i, ph in enumerate(PHASES)}
    columns["total"] = [sum(r) for r in rounds]
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)}
            for k, v in columns.items()}


def measure(name: str, rounds: int, steps: int, warmup: int, seed: int = 0, fixed: bool = False) -> dict:
    """fixed: every variant steps on the dataset's first B rows, no loader (the demo's timed line)."""
    batch, size = SETUPS[name]
    dataset = _dataset(name, size, seed)
    steppers = {"private": build_private(name, dataset, batch, seed),
                "private_prefetch": build_private(name, dataset, batch, seed, prefetch_noise=True),
                "philox": build_private(name, dataset, batch, seed, noise_rng="philox"),
                "philox_prefetch": build_private(name, dataset, batch, seed, prefetch_noise=True, noise_rng="philox"),
                "floor": build_floor(name, dataset, batch, seed, draw=True),
                "floor_no_draw": build_floor(name, dataset, batch, seed, draw=False),
                "plain": build_plain(name, dataset, batch, seed)}
    for s in steppers.values():
        if fixed:
            s.batches = itertools.repeat(dataset[:batch])
        for _ in range(warmup):
            s.step()
    per_round = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            times = [steppers[v].step() for _ in range(steps)]
            per_round[v].append([sum(col) / steps for col in zip(*times)])
    out = {"model": name, "expected_batch": batch, "dataset": size, "fixed_batch": fixed, "rounds": rounds,
           "steps_per_round": steps, "phases": {v: _summary(per_round[v]) for v in VARIANTS}}
    q = out["phases"]["plain"]["total"]
    for v in VARIANTS[:-1]:
        p = out["phases"][v]["total"]
        out["ratio" if v == "private" else f"ratio_{v}"] = {"median": p["median_ms"] / q["median_ms"],
                                                            "min": p["min_ms"] / q["min_ms"]}
    return out


def profile_private(name: str, steps: int, seed: int = 0, rows: int = 15) -> list[dict]:
    """torch.profiler over `steps` warm private steps: the ops by self CPU time, per step."""
    batch, size = SETUPS[name]
    stepper = build_private(name, _dataset(name, size, seed), batch, seed)
    for _ in range(20):
        stepper.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return [{"op": e.key, "calls_per_step": e.count / steps,
             "self_us_per_step": e.self_cpu_time_total / steps} for e in events]


def table(results: list[dict]) -> str:
    lines = ["| model | B | variant | ms (median / min) | plain ms (median / min) | ratio median | ratio min |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["phases"]["plain"]["total"]
        for v in VARIANTS[:-1]:
            p, ratio = r["phases"][v]["total"], r["ratio" if v == "private" else f"ratio_{v}"]
            lines.append(f"| {r['model']} | {r['expected_batch']} | {v} | {p['median_ms']:.3f} / {p['min_ms']:.3f} "
                         f"| {q['median_ms']:.3f} / {q['min_ms']:.3f} | {ratio['median']:.2f}x | {ratio['min']:.2f}x |")
    lines += ["", "| model | phase | " + " | ".join(f"{v} ms" for v in VARIANTS) + " |",
              "|---|---|" + "---|" * len(VARIANTS)]
    for r in results:
        for ph in PHASES:
            ms = " | ".join(f"{r['phases'][v][ph]['median_ms']:.3f}" for v in VARIANTS)
            lines.append(f"| {r['model']} | {ph} | {ms} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (default: per model)")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="also profile the private step")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="no loader: every step on one batch of B rows, as examples/demo.py times it")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        steps = args.steps or {"digits": 50, "mlp": 5, "gpt": 5}[name]
        r = measure(name, args.rounds, steps, args.warmup, fixed=args.fixed_batch)
        if args.profile:
            r["profile_private"] = profile_private(name, steps=max(steps, 20))
        results.append(r)
        print(table([r]), flush=True)
    print()
    print(table(results))
    if not args.no_save:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "note": "CPU, shared 2-core machine; mean per step within a round, median/min over rounds"}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
