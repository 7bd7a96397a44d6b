"""Measurement workers; each runs in its own process, started by ``python -m bench``.

* ``time``:  all configurations of ONE model in one process; per batch size: build, first step
             (compile, or a warm-cache compile here), warm-up, then interleaved rounds; medians.
* ``mem``:   ONE configuration in its own process: RSS before the first step, first-step time
             (cold compile when the sweep's Inductor cache is fresh), peak RSS over the whole run
             (ru_maxrss, includes compilation) and peak RSS over steady-state steps (peak counter
             reset through /proc/self/clear_refs after warm-up).
* ``check``: every configuration's ``.grad`` on one batch vs a float64 torch.func reference.

``--device cuda``: models and batches on the GPU (built on the CPU with the same seeds, then
moved), the device synchronized around every timed region, memory from
``torch.cuda.max_memory_allocated`` instead of RSS; the reference stays float64 on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback

import torch
import torch._dynamo

from . import configs as cfgs
from .models import MODELS, n_params

MB = 1024 * 1024
SLOW_S = 2.0  # a step slower than this is "slow": one warm-up step, fewer rounds
BUDGET_S = 20.0  # timed seconds per slow configuration and batch size
BF16_TOL = 5e-2  # bf16-autocast gradients vs float64: plain bf16 itself is 3e-2 off on the MLP (CPU)


def _setup_torch(threads: int):
    torch.set_num_threads(threads)

    # one model instance per (config, batch size) in a process: never fall back to eager silently
    for k in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, k):
            setattr(torch._dynamo.config, k, 64)


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    msg = " ".join(msg.split())
    return msg[:400] + (" ..." if len(msg) > 400 else "")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _free_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _mem_available()


def guard(config: str, model, bs: int, max_inst_gb: float, device="cpu"):
    """Return a skip reason when a per-sample-instantiating config would not fit."""
    if not cfgs.CONFIGS[config].instantiates:
        return None
    est = bs * n_params(model) * 4
    limit = min(max_inst_gb * 1024**3, 0.6 * _free_bytes(device))
    if est > limit:
        return (f"skipped: per-sample gradients need ~{est / 1024**3:.1f} GB "
                f"> limit {limit / 1024**3:.1f} GB (--max-inst-gb / free memory)")
    return None


def _make(model_name: str, bs: int, seed: int = 0, device="cpu"):
    """Model and batch built on the CPU (same numbers on every device), then moved to ``device``."""
    spec = MODELS[model_name]
    torch.manual_seed(seed)
    model = spec.build().train()
    gen = torch.Generator().manual_seed(seed + bs)
    x, y = spec.make_batch(bs, gen)
    return spec, model.to(device), x.to(device), y.to(device)


def _sync(device="cpu"):
    """Wait for the device's queued work, so a timer read after it covers the step."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
def _init_inductor(device="cpu"):
    """Compile a trivial forward+backward once, so the one-time Dynamo/Inductor start-up cost of
    the process is not charged to whichever configuration compiles first."""
    lin = torch.nn.Linear(4, 4).to(device)
    f = torch.compile(lambda z: lin(z).relu().sum(), dynamic=False)
    f(torch.randn(3, 4, device=device)).backward()
    _sync(device)
    torch._dynamo.reset()


def run_time(model_name, batch_sizes, config_names, rounds, warmup, C, max_inst_gb, target_s, progress,
             partial_path=None, device="cpu"):
    out = {}
    if any(cfgs.CONFIGS[c].compiled for c in config_names):
        t0 = time.perf_counter()
        _init_inductor(device)
        out["_inductor_init_s"] = time.perf_counter() - t0
    for bs in batch_sizes:
        torch._dynamo.reset()
        spec, base, x, y = _make(model_name, bs, device=device)
        res = {}
        runners = {}
        for name in config_names:
            reason = guard(name, base, bs, max_inst_gb, device)
            if reason:
                res[name] = {"error": reason, "skipped": True}
                continue
            try:
                r = cfgs.build(name, copy.deepcopy(base), C)
                _sync(device)
                t0 = time.perf_counter()
                r.step(x, y)
                _sync(device)
                first = time.perf_counter() - t0
                est = None
                for _i in range(max(1, warmup)):  # the last warm-up step estimates the step time
                    if est is not None and est > SLOW_S:
                        break  # slow configurations (seconds per step) need no long warm-up
                    t0 = time.perf_counter()
                    r.step(x, y)
                    _sync(device)
                    est = time.perf_counter() - t0
                inner = max(1, min(20, int(round(target_s / max(est, 1e-4)))))
                # slow configurations: fewer rounds (at least 3), about BUDGET_S of timed steps
                n_rounds = rounds if est < SLOW_S else max(3, min(rounds, int(BUDGET_S / est)))
                runners[name] = r
                res[name] = {"first_step_s_in_process": first, "inner": inner, "rounds": n_rounds,
                             "times_s": []}
            except Exception as e:  # a peer that cannot run the model: that is a result
                res[name] = {"error": _err(e), "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
        order = list(runners)
        for rd in range(rounds):
            # interleaved rounds; rotate the order so no configuration always follows another
            k = rd % max(1, len(order))
            for name in order[k:] + order[:k]:
                if rd >= res[name]["rounds"]:
                    continue
                r = runners[name]
                try:
                    _sync(device)
                    for _ in range(res[name]["inner"]):
                        t0 = time.perf_counter()
                        r.step(x, y)
                        _sync(device)
                        res[name]["times_s"].append(time.perf_counter() - t0)
                except Exception as e:
                    res[name] = {"error": _err(e)}
                    runners.pop(name)
            order = [n for n in order if n in runners]
        for _name, d in res.items():
            if "times_s" in d and d["times_s"]:
                ts = d["times_s"]
                d["median_ms"] = 1e3 * statistics.median(ts)
                d["min_ms"] = 1e3 * min(ts)
                q = sorted(ts)
                d["iqr_ms"] = 1e3 * (q[(3 * len(q)) // 4] - q[len(q) // 4])
        base_ms = res.get(cfgs.BASELINE, {}).get("median_ms")
        for _name, d in res.items():
            if base_ms and "median_ms" in d:
                d["ratio"] = d["median_ms"] / base_ms
        out[str(bs)] = res
        if partial_path:  # survive a later batch size killing the process
            with open(partial_path, "w") as f:
                json.dump(out, f)
        del runners
        gc.collect()
        if progress:
            print(f"PROGRESS time {model_name} {bs}", flush=True)
    return out


# ------------------------------------------------------------------------------------------
def run_mem(model_name, bs, config, C, steps, max_inst_gb, device="cpu"):
    spec, base, x, y = _make(model_name, bs, device=device)
    reason = guard(config, base, bs, max_inst_gb, device)
    if reason:
        return {"error": reason, "skipped": True}
    if cfgs.CONFIGS[config].compiled:
        _init_inductor(device)  # process start-up cost of Inductor is not the configuration's
    if torch.device(device).type == "cuda":
        return _run_mem_cuda(cfgs.build(config, base, C), x, y, steps, device)
    gc.collect()
    r = cfgs.build(config, base, C)
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    r.step(x, y)
    first = time.perf_counter() - t0
    r.step(x, y)  # second step: anything lazily built on step 2 (e.g. grad buffers reuse)
    peak_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.collect()
    rss_warm = _rss_bytes()
    ok = _reset_peak()
    for _ in range(steps):
        r.step(x, y)
    peak_steady = _hwm_bytes() if ok else None
    peak_total = max(peak_total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "rss_before_mb": rss0 / MB,
        "first_step_s": first,  # first step (fwd + bwd) in a fresh process, sweep's Inductor cache
        "peak_rss_mb": peak_total / MB,
        "peak_growth_mb": (peak_total - rss0) / MB,
        "rss_after_warmup_mb": rss_warm / MB,
        "steady_peak_rss_mb": None if peak_steady is None else peak_steady / MB,
        "steady_peak_growth_mb": None if peak_steady is None else (peak_steady - rss0) / MB,
    }


def _run_mem_cuda(r, x, y, steps, device):
    """Peak of torch.cuda.max_memory_allocated over the first two steps (with compilation) and over
    steady-state steps, minus the memory allocated before the first step (model, batch).
    Stored under the RSS keys so that report.py reads both devices alike."""
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    r.step(x, y)
    _sync(device)
    first = time.perf_counter() - t0
    r.step(x, y)
    _sync(device)
    peak_total = torch.cuda.max_memory_allocated(device)
    warm = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        r.step(x, y)
    _sync(device)
    peak_steady = torch.cuda.max_memory_allocated(device)
    return {
        "memory": "torch.cuda.max_memory_allocated",
        "rss_before_mb": before / MB,
        "first_step_s": first,
        "peak_rss_mb": max(peak_total, peak_steady) / MB,
        "peak_growth_mb": (max(peak_total, peak_steady) - before) / MB,
        "rss_after_warmup_mb": warm / MB,
        "steady_peak_rss_mb": peak_steady / MB,
        "steady_peak_growth_mb": (peak_steady - before) / MB,
    }


# ------------------------------------------------------------------------------------------
def _rel(a, b):
    num = sum(float((u.double().cpu() - v.double().cpu()).pow(2).sum()) for u, v in zip(a, b)) ** 0.5
    den = sum(float(v.double().cpu().pow(2).sum()) for v in b) ** 0.5
    return num / max(den, 1e-30)


def run_check(model_name, bs, config_names, C, tol, max_inst_gb, device="cpu"):
    spec, base, x, y = _make(model_name, bs)  # on the CPU: the float64 reference runs there
    clipped, unclipped, ref_norms = cfgs.reference_grads(base, x, y, C)
    x, y = x.to(device), y.to(device)
    if torch.device(device).type == "cuda":  # float32 means float32: no TF32 in the checked step
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = {"batch_size": bs, "tol": tol, "bf16_tol": BF16_TOL, "device": str(device),
           "ref_norms": [float(v) for v in ref_norms],
           "fraction_clipped": float((ref_norms > C).double().mean()),
           # how far an unclipped gradient is from the clipped reference: a check whose tolerance
           # is below this fails on a configuration that does not clip
           "unclipped_vs_clipped": _rel(unclipped, clipped), "configs": {}}
    for name in config_names:
        info = cfgs.CONFIGS[name]
        reason = guard(name, base, bs, max_inst_gb, device)
        if reason:
            out["configs"][name] = {"error": reason, "skipped": True}
            continue
        ctol = BF16_TOL if info.autocast is torch.bfloat16 else tol
        try:
            r = cfgs.build(name, copy.deepcopy(base).to(device), C)
            r.step(x, y)
            r.step(x, y)  # twice: the second (steady-state, cached) step is what gets timed
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in r.params]
            missing = sum(p.grad is None for p in r.params)
            off_device = sum(p.grad is not None and p.grad.device != x.device for p in r.params)
            ref = clipped if info.private else unclipped
            err = _rel(grads, ref)
            d = {"rel_err": err, "tol": ctol, "missing_grads": missing, "grads_off_device": off_device,
                 "against": "clipped sum" if info.private else "unclipped sum"}
            if info.private:
                d["rel_err_vs_unclipped"] = _rel(grads, unclipped)
            else:  # what the private check would say of this unclipped gradient: it must fail
                d["rel_err_vs_clipped"] = _rel(grads, clipped)
                d["would_fail_private_check"] = bool(d["rel_err_vs_clipped"] >= ctol)
            n = r.norms()
            if n is not None:
                n = torch.as_tensor(n).detach().reshape(-1).double().cpu()
                d["norms_rel_err"] = float((n - ref_norms).abs().max() / ref_norms.abs().max())
            d["ok"] = bool(err < ctol and missing == 0 and off_device == 0
                           and d.get("norms_rel_err", 0) < ctol)
            out["configs"][name] = d
        except Exception as e:
            out["configs"][name] = {"error": _err(e), "ok": False,
                                    "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["time", "mem", "check"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-sizes", type=int, nargs="+", required=True)
    ap.add_argument("--configs", nargs="+", default=cfgs.ALL_CONFIGS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--target-s", type=float, default=0.25)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-inst-gb", type=float, default=10.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", required=True)
    a = ap.parse_args(argv)
    _setup_torch(a.threads)
    if a.mode == "time":
        res = run_time(a.model, a.batch_sizes, a.configs, a.rounds, a.warmup, a.clip,
                       a.max_inst_gb, a.target_s, progress=True, partial_path=a.json_out + ".partial",
                       device=a.device)
        if os.path.exists(a.json_out + ".partial"):
            os.unlink(a.json_out + ".partial")
    elif a.mode == "mem":
        try:
            res = run_mem(a.model, a.batch_sizes[0], a.configs[0], a.clip, a.steps, a.max_inst_gb, a.device)
        except Exception as e:
            res = {"error": _err(e), "traceback": traceback.format_exc()[-3000:]}
    else:
        res = run_check(a.model, a.batch_sizes[0], a.configs, a.clip, a.tol, a.max_inst_gb, a.device)
    with open(a.json_out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
