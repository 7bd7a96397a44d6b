"""The Opacus ghost-clipping blog post's BERT table, with fxclip in it.

The post ("Enabling Fast Gradient Clipping and Ghost Clipping in Opacus", pytorch.org/blog/
clipping-in-opacus) fine-tunes BERT-base as Opacus' text-classifier tutorial does: the last
encoder layer, the pooler and the classifier trainable (~7.7M of ~110M parameters; the post calls
them "the last three layers"), 3 labels, MAX_SEQ_LENGTH = 128, and reports peak memory and time
per step at B = 32 .. 2048 on a 16 GB P100. Here the same model is built from BertConfig (random
weights) and every variant runs a whole step: forward, loss, backward, optimizer step, zero_grad.

    python -m bench.bert_table                                  # CPU defaults: T=16, B=32 128 512
    python -m bench.bert_table --batch-sizes 32 128 --seq-len 32 --steps 5 --repeats 2
    python -m bench.bert_table --device cuda --batch-sizes 32 128 512 1024 2048 --seq-len 128

Every (variant, batch size) runs in its own fresh process (so memory is not shared between
variants); processes are run round-robin over variants, the order rotated per batch size and
repeat, so a disturbance by other jobs spreads over all variants. Memory:
  CPU:  steady peak RSS growth = peak RSS (VmHWM, reset through /proc/self/clear_refs after the
        warm-up steps) over the timed steps, minus the RSS before the first step (model, batch and
        optimizer already built). It includes what compilation leaves in the process.
  CUDA: torch.cuda.max_memory_allocated over the timed steps (peak reset after warm-up) minus the
        memory allocated before the first step.
Time: median and min over all timed steps of all repeats (compilation is in the warm-up steps).
A variant whose per-sample gradients would not fit (--max-inst-gb) or whose process runs past
--cap-s is recorded with that reason.

Writes bench/results/bert_table.json (bench/results/<device>/ for a non-CPU device) and a plot
next to it, and (--results-md) the "BERT fine-tuning" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
MB = 1024 ** 2
NUM_LABELS = 3  # the tutorial's SNLI classes
LR = 1e-3
NOISE = 1.0  # noise multiplier of every private variant (the noise step is part of the timed step)
C = 1.0  # max grad norm

VARIANTS = {  # name: label (the post's row names in parentheses)
    "plain_eager": "plain SGD eager (PyTorch SGD)",
    "plain_compiled": "plain SGD compiled",
    "fxclip_eager": "fxclip eager",
    "fxclip_compiled": "fxclip compiled",
    "opacus_hooks": "Opacus vanilla DP-SGD, hooks (DP-SGD)",
    "opacus_fgc": "Opacus fast gradient clipping (FGC DP-SGD)",
    "opacus_ghost": "Opacus ghost clipping (GC DP-SGD)",
}
INSTANTIATES = {"opacus_hooks"}  # keeps all B x |params| per-sample gradients at once

# The post's table (P100 16 GB, T=128): (memory MB, seconds per step); None = OOM.
SEED = {
    "PyTorch SGD": {32: (236, 0.15), 128: (1040, 0.55), 512: (5270, 2.1), 1024: (12700, 4.2), 2048: None},
    "DP-SGD": {32: (1142, 0.21), 128: (4550, 0.68), 512: None, 1024: None, 2048: None},
    "FGC DP-SGD": {32: (908, 0.21), 128: (3600, 0.75), 512: None, 1024: None, 2048: None},
    "GC DP-SGD": {32: (362, 0.21), 128: (1320, 0.67), 512: (5270, 2.5), 1024: (12700, 5.0), 2048: None},
}


# ---------------------------------------------------------------------------------- the model
class BertLogits(nn.Module):
    """BertForSequenceClassification's logits from input ids (no attention mask: no padding)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).logits


class WithLoss(nn.Module):
    """model + mean cross-entropy, so plain compiled compiles the loss too (as fxclip's loss_fn)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return F.cross_entropy(self.model(x), y)


def build_bert(trainable_encoder_layers: int, seed: int = 0) -> BertLogits:
    """BERT-base from its default config, frozen except the last encoder layer(s), pooler and
    classifier, in train mode (dropout on), as the tutorial trains it."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    bert = BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS))
    bert.requires_grad_(False)
    trainable = list(bert.bert.encoder.layer[-trainable_encoder_layers:]) + [bert.bert.pooler, bert.classifier]
    for module in trainable:
        module.requires_grad_(True)
    return BertLogits(bert).train()


def make_batch(bs: int, seq_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + bs)
    x = torch.randint(1000, 30000, (bs, seq_len), generator=gen)  # ordinary word-piece ids
    y = torch.randint(0, NUM_LABELS, (bs,), generator=gen)
    return x, y


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def per_sample_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


# ------------------------------------------------------------------------------- the variants
# Each builder returns step(x, y): one whole training step. The private ones add noise
# (noise multiplier NOISE) and clip at C; the data loader only tells the optimizers the
# expected batch size (2B samples, batch size B); the step itself uses the fixed (x, y).
def _loader(x, y):
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.cat([x, x]).cpu(), torch.cat([y, y]).cpu())
    return DataLoader(ds, batch_size=len(x))


def _plain(model, x, y, compiled):
    module = WithLoss(model)
    fwd = torch.compile(module, dynamic=False) if compiled else module
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(x, y):
        fwd(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _fxclip(model, x, y, compiled):
    import fxclip

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    pm, dp_opt, _ = fxclip.make_private(model, opt, _loader(x, y), noise_multiplier=NOISE,
                                        max_grad_norm=C, loss_fn=per_sample_ce, poisson_sampling=False)
    fwd = torch.compile(pm, dynamic=False) if compiled else pm

    def step(x, y):
        fwd(x, target=y).mean().backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return step


def _opacus(model, x, y, mode):
    """mode: "hooks" (vanilla per-sample gradients), "fgc" (fast gradient clipping: per-sample
    gradients of one layer at a time for its norm, then a second backward), "ghost" (ghost
    norms where Opacus has a rule, FGC elsewhere, then a second backward)."""
    from opacus import PrivacyEngine
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    module = model
    if mode == "fgc":  # PrivacyEngine's "ghost" mode takes a pre-wrapped module as it is
        module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                      max_grad_norm=C, use_ghost_clipping=False)
    kwargs = {} if mode == "hooks" else {"criterion": nn.CrossEntropyLoss()}
    out = PrivacyEngine().make_private(
        module=module, optimizer=opt, data_loader=_loader(x, y), noise_multiplier=NOISE,
        max_grad_norm=C, poisson_sampling=False, grad_sample_mode="hooks" if mode == "hooks" else "ghost",
        **kwargs)
    if mode == "hooks":
        gsm, dp_opt, _ = out
        crit = nn.CrossEntropyLoss()
    else:
        gsm, dp_opt, crit, _ = out

    def step(x, y):
        crit(gsm(x), y).backward()  # ghost/FGC: two backward passes inside
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    return step


BUILDERS = {
    "plain_eager": lambda m, x, y: _plain(m, x, y, compiled=False),
    "plain_compiled": lambda m, x, y: _plain(m, x, y, compiled=True),
    "fxclip_eager": lambda m, x, y: _fxclip(m, x, y, compiled=False),
    "fxclip_compiled": lambda m, x, y: _fxclip(m, x, y, compiled=True),
    "opacus_hooks": lambda m, x, y: _opacus(m, x, y, "hooks"),
    "opacus_fgc": lambda m, x, y: _opacus(m, x, y, "fgc"),
    "opacus_ghost": lambda m, x, y: _opacus(m, x, y, "ghost"),
}


# ------------------------------------------------------------------- one measurement (child)
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Memory:
    """Peak memory of the timed steps over the memory in use before the first step."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def _now(self):
        return torch.cuda.memory_allocated() if self.cuda else _rss()

    def start(self):
        gc.collect()
        self.before = self._now()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_hwm()

    def growth_now_mb(self):
        gc.collect()
        return (self._now() - self.before) / MB

    def peak_growth_mb(self):
        peak = torch.cuda.max_memory_allocated() if self.cuda else _hwm()
        return (peak - self.before) / MB


def measure(variant, bs, args) -> dict:
    """Build, warm up (compilation), then time args.steps steps; memory over the timed steps."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_bert(args.trainable_encoder_layers).to(device)
    x, y = (t.to(device) for t in make_batch(bs, args.seq_len))
    need = bs * n_trainable(model) * 4
    if variant in INSTANTIATES and need > args.max_inst_gb * 1024 ** 3:
        return {"skipped": f"OOM guard: per-sample gradients need {need / 1024 ** 3:.1f} GB "
                           f"> --max-inst-gb {args.max_inst_gb:g}"}
    step = BUILDERS[variant](model, x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mem = Memory(device)
    mem.start()
    t0 = time.perf_counter()
    step(x, y)
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step(x, y)
    sync()
    retained_mb = mem.growth_now_mb()  # compiled code, caches, optimizer state, freed-not-returned heap
    mem.reset_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "first_step_s": first_s, "peak_growth_mb": mem.peak_growth_mb(),
            "retained_after_warmup_mb": retained_mb}


# ---------------------------------------------------------------------- the sweep (parent)
def run_child(variant, bs, args) -> dict:
    cmd = [sys.executable, "-W", "ignore", "-m", "bench.bert_table", "--child", variant, str(bs),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device, "--max-inst-gb", str(args.max_inst_gb),
           "--trainable-encoder-layers", str(args.trainable_encoder_layers)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=args.cache_dir)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap_s, env=env,
                           cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"skipped": f"too slow: over the {args.cap_s} s cap per process"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = " ".join((p.stderr or "").strip().splitlines()[-3:])[:400]
        oom = p.returncode in (-9, 137) or "out of memory" in tail.lower()
        return {"skipped": ("OOM (killed)" if oom else f"error rc={p.returncode}") + f": {tail}"}
    return json.loads(lines[-1])


def sweep(args, save) -> dict:
    """save(results) after every process: a sweep cut short keeps what it measured."""
    results = {v: {} for v in args.variants}
    for rep in range(args.repeats):
        for i, bs in enumerate(args.batch_sizes):
            k = (rep + i) % len(args.variants)
            for v in args.variants[k:] + args.variants[:k]:  # rotated round-robin order
                prev = results[v].get(str(bs))
                if prev and "skipped" in prev:
                    continue  # an OOM or a cap is not retried
                t0 = time.time()
                if args.deadline_s and t0 - args.start > args.deadline_s:
                    r = {"skipped": f"not run: the sweep's --deadline-s {args.deadline_s} had passed"}
                else:
                    r = run_child(v, bs, args)
                print(f"[rep {rep}] B={bs} {v}: " + (r.get("skipped") or
                      f"{statistics.median(r['times_s']):.3f} s/step, {r['peak_growth_mb']:.0f} MiB")
                      + f" ({time.time() - t0:.0f} s)", flush=True)
                if prev is None or "skipped" in r:
                    results[v][str(bs)] = r
                else:
                    prev["times_s"] += r["times_s"]
                    prev["peak_growth_mb_all"] = prev.get("peak_growth_mb_all", [prev["peak_growth_mb"]]) \
                        + [r["peak_growth_mb"]]
                    prev["peak_growth_mb"] = statistics.median(prev["peak_growth_mb_all"])
                summarize(results)
                save(results)
    return results


def summarize(results) -> None:
    for per_bs in results.values():
        for r in per_bs.values():
            if "times_s" in r:
                r["median_s"] = statistics.median(r["times_s"])
                r["min_s"] = min(r["times_s"])


# ------------------------------------------------------------------------------ the outputs
def ratio(results, v, bs, key, base="plain_compiled"):
    r, b = results.get(v, {}).get(str(bs), {}), results.get(base, {}).get(str(bs), {})
    return r[key] / b[key] if key in r and key in b and b[key] else None


def cell(results, v, bs):
    r = results[v].get(str(bs), {})
    if "skipped" in r:
        for word in ("OOM", "too slow", "not run"):
            if word in r["skipped"]:
                return word
        return "error"
    if "median_s" not in r:
        return "not run"
    def x(key):
        r_ = ratio(results, v, bs, key)
        return "" if r_ is None else f" ({r_:.2f}x)"
    return (f"{r['peak_growth_mb']:.0f} MiB{x('peak_growth_mb')} / {r['median_s']:.2f} s{x('median_s')}"
            f", min {r['min_s']:.2f} s{x('min_s')}")


def markdown(data) -> str:
    meta, results, bss = data["meta"], data["results"], data["meta"]["batch_sizes"]
    head = "| variant | " + " | ".join(f"B = {b}" for b in bss) + " |\n|---|" + "---:|" * len(bss) + "\n"
    rows = "".join(f"| {VARIANTS[v]} | " + " | ".join(cell(results, v, b) for b in bss) + " |\n"
                   for v in results)
    seed_b = [32, 128, 512, 1024, 2048]
    seed = "| post (P100, T=128) | " + " | ".join(f"B = {b}" for b in seed_b) + " |\n|---|" + "---:|" * 5 + "\n"
    for name, row in SEED.items():
        base = SEED["PyTorch SGD"]
        seed += f"| {name} | " + " | ".join(
            "OOM" if row[b] is None else
            f"{row[b][0]:,} MB ({row[b][0] / base[b][0]:.2f}x) / {row[b][1]} s ({row[b][1] / base[b][1]:.2f}x)"
            for b in seed_b) + " |\n"
    return (f"measured {meta['date']}, {meta['machine']}; T = {meta['seq_len']}, "
            f"{meta['trainable_params']:,} trainable parameters; cell: {meta['memory']} in MiB "
            f"(ratio to plain compiled) / seconds per step, median and min (ratios to plain compiled's)\n\n"
            + head + rows + "\nThe post's table (ratios to its PyTorch SGD row):\n\n" + seed)


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v, per_bs in data["results"].items():
        ok = [(int(b), r) for b, r in per_bs.items() if "median_s" in r]
        if not ok:
            continue
        bs = [b for b, _ in ok]
        ls = "--" if "eager" in v else "-"
        ax_mem.plot(bs, [r["peak_growth_mb"] for _, r in ok], ls, marker="o", label=VARIANTS[v])
        ax_t.plot(bs, [r["median_s"] for _, r in ok], ls, marker="o", label=VARIANTS[v])
    meta = data["meta"]
    ax_mem.set_ylabel(f"{meta['memory']} (MiB)")
    ax_t.set_ylabel("seconds per step (median)")
    for ax in (ax_mem, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3, which="both")
    ax_t.legend(fontsize=7)
    fig.suptitle(f"BERT-base, last encoder layer + pooler + classifier trainable "
                 f"({meta['trainable_params']:,} params), T = {meta['seq_len']}, {meta['device']}; "
                 f"missing point = OOM / too slow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SECTION_START, SECTION_END = "<!-- bert_table: start -->", "<!-- bert_table: end -->"


def write_results_md(data, section_text: str, path=HERE / "RESULTS.md"):
    """Replace (or append) the marked BERT section of RESULTS.md, leaving the rest as it is."""
    text = path.read_text()
    block = f"{SECTION_START}\n{section_text.rstrip()}\n{SECTION_END}\n"
    if SECTION_START in text:
        pre, rest = text.split(SECTION_START, 1)
        text = pre + block + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--seq-len", type=int, default=16,
                   help="tokens per sample (the tutorial: 128; CPU default 16 keeps B=512 within minutes)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--repeats", type=int, default=1, help="passes over all variants and batch sizes")
    p.add_argument("--cap-s", type=int, default=900, help="wall-clock cap of one process (too slow beyond)")
    p.add_argument("--deadline-s", type=int, default=0,
                   help="start no process after this many seconds of the sweep (0: no deadline)")
    p.add_argument("--max-inst-gb", type=float, default=8.0,
                   help="skip vanilla DP-SGD where B x |params| x 4 bytes exceeds this (OOM guard)")
    p.add_argument("--trainable-encoder-layers", type=int, default=1,
                   help="trainable encoder layers from the top (the post and tutorial: 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process; 1 on a shared 2-core machine, where two OpenMP "
                        "threads wait on each other whenever one is descheduled (3-5x slower steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results[/<device>]/bert_table.json")
    p.add_argument("--results-md", action="store_true", help="write the section into bench/RESULTS.md")
    p.add_argument("--cache-dir", default=None, help="Inductor cache shared by the processes")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the plot and the markdown (and --results-md) from the JSON at --out")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "B"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args)))
        return
    import tempfile

    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fxclip-bert-inductor-")
    args.start = time.time()
    device = torch.device(args.device)
    out = args.out or (HERE / "results" / ("" if device.type == "cpu" else device.type) / "bert_table.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_outputs(json.loads(out.read_text()), out, args)
    t0 = time.time()
    data = {"meta": {
        "date": time.strftime("%Y-%m-%d"), "device": args.device, "seq_len": args.seq_len,
        "batch_sizes": args.batch_sizes, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads, "trainable_encoder_layers": args.trainable_encoder_layers,
        "trainable_params": n_trainable(build_bert(args.trainable_encoder_layers)),
        "memory": "steady peak RSS growth" if device.type == "cpu" else "peak CUDA memory allocated growth",
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "noise_multiplier": NOISE, "max_grad_norm": C, "lr": LR,
    }, "results": {}, "seed": {k: {str(b): v for b, v in row.items()} for k, row in SEED.items()}}

    def save(results):
        data["results"], data["meta"]["wall_s"] = results, round(time.time() - t0)
        out.write_text(json.dumps(data, indent=1))

    sweep(args, save)
    write_outputs(data, out, args)
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t0:.0f} s")


def write_outputs(data, out: Path, args) -> None:
    plot(data, out.with_suffix(".png"))
    md = markdown(data)
    print(md)
    if args.results_md:
        write_results_md(data, "## BERT fine-tuning: the ghost-clipping post's table\n\n" + md)


if __name__ == "__main__":
    main()
