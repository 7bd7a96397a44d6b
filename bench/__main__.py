"""fxclip benchmark runner.

    python -m bench                          # full sweep: all models, configs, batch sizes
    python -m bench --quick                  # one small batch size per model, fewer rounds
    python -m bench --models mlp gpt --batch-sizes 16 32 --configs plain_compiled fxclip_compiled
    python -m bench --check                  # gradients of every config vs float64 torch.func
    python -m bench --report-only            # regenerate RESULTS.md and plots from results/*.json
    python -m bench --device cuda --configs plain_compiled fxclip_compiled plain_compiled_bf16 \
        fxclip_compiled_bf16                 # on a GPU -> results/cuda/ (and results/cuda/RESULTS.md)

Per model it runs (each in a fresh subprocess, 2 torch threads):
  1. step time + compile time: one subprocess per model holding ALL configurations; per batch
     size: first step timed (cold compile: the sweep starts with an empty Inductor cache, and
     Inductor's process start-up is paid beforehand by a trivial compile), warm-up, then
     interleaved rounds; medians and ratios to the plain compiled step.
  2. memory: one subprocess per (batch size, configuration): RSS before the first step, peak RSS
     over the whole process and over steady-state steps (the Inductor cache is warm from 1.).
  3. with --check: gradients of every configuration vs a float64 torch.func reference.
Raw results: bench/results/<model>.json; tables: bench/RESULTS.md; plots: bench/results/<model>.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from . import report
from .configs import ALL_CONFIGS, CONFIGS
from .models import MODELS

HERE = Path(__file__).resolve().parent
WORKDIR = [str(HERE.parent)]  # where workers run (a source snapshot, see _snapshot)
RESULTS = HERE / "results"


def _env(cache_dir: str, threads: int, device: str = "cpu") -> dict:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    if device == "cpu":  # on a GPU machine Triton kernels compile in Inductor's worker pool
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # compile in-process: no worker pool on 2 cores
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _worker(args: list[str], env: dict, log, timeout: float, on_line=None) -> dict:
    """Run ``python -m bench.worker ARGS --json-out F``; return the JSON, or an error dict."""
    fd, out = tempfile.mkstemp(suffix=".json", prefix="bench-")
    os.close(fd)
    cmd = [sys.executable, "-m", "bench.worker", *args, "--json-out", out]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    try:
        p = subprocess.Popen(cmd, env=env, cwd=WORKDIR[0], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail = []
        for line in p.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if on_line and line.startswith("PROGRESS"):
                on_line(line)
            if time.time() - t0 > timeout:
                p.kill()
                break
        rc = p.wait()
        if os.path.getsize(out) > 0:
            with open(out) as f:
                return json.load(f)
        why = "killed (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
        if time.time() - t0 > timeout:
            why = f"timeout after {timeout:.0f} s"
        res = {"error": f"worker died: {why}; last output: {' | '.join(tail[-3:])[-300:]}"}
        if os.path.exists(out + ".partial"):
            with open(out + ".partial") as f:
                res["partial"] = json.load(f)
        return res
    finally:
        for f in (out, out + ".partial"):
            if os.path.exists(f):
                os.unlink(f)


def _git_state() -> dict:
    """Commit of the measured fxclip, and whether fxclip/ or passes/ had uncommitted changes."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=str(HERE.parent), capture_output=True, text=True,
                                  timeout=30).stdout.rstrip()
        except Exception:
            return ""
    dirty = git("status", "--porcelain", "--", "fxclip", "passes")
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_fxclip_changes": [line[3:] for line in dirty.splitlines() if not line.startswith("??")]}


def _snapshot(rev: str) -> tuple[str, dict]:
    """Export fxclip/ and passes/ at git revision ``rev`` into a temporary folder laid out as the
    installed package (fxclip/passes/...), so the sweep measures one fixed version of fxclip even
    while the working tree changes. Returns (folder for PYTHONPATH, code state)."""
    d = tempfile.mkdtemp(prefix="fxclip-bench-src-")
    arch = subprocess.run(["git", "archive", rev, "fxclip", "passes"], cwd=str(HERE.parent),
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    shutil.move(os.path.join(d, "passes"), os.path.join(d, "fxclip", "passes"))
    # the workers run from this folder (python -m puts the cwd first on sys.path), with a copy of
    # bench/ so that `import fxclip` finds the snapshot, not the working tree
    shutil.copytree(HERE, os.path.join(d, "bench"), ignore=shutil.ignore_patterns("results", "__pycache__", "*.md"))
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=str(HERE.parent),
                            capture_output=True, text=True).stdout.strip()
    return d, {"commit": commit, "source": f"git archive {rev} (committed code only)"}


def _device_name(device: str) -> str:
    """'cpu', or the GPU's name (e.g. 'cuda: NVIDIA H100 80GB HBM3')."""
    if device == "cpu":
        return "cpu"
    import torch
    return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="override every model's batch sizes")
    ap.add_argument("--configs", nargs="+", default=ALL_CONFIGS, choices=list(CONFIGS),
                    help="default: all but the bf16 autocast rows (*_bf16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7, quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps after the first step")
    ap.add_argument("--mem-steps", type=int, default=2, help="steady-state steps in the memory run")
    ap.add_argument("--target-s", type=float, default=None,
                    help="time per configuration per round (steps repeated up to it; default 0.25, quick 0.1)")
    ap.add_argument("--quick", action="store_true", help="one small batch size per model, 3 rounds")
    ap.add_argument("--check", action="store_true", help="also check gradients vs float64 torch.func")
    ap.add_argument("--check-only", action="store_true", help="only the gradient check")
    ap.add_argument("--check-batch-size", type=int, default=None, help="default: smallest batch size of the sweep")
    ap.add_argument("--no-mem", action="store_true", help="skip the memory/compile subprocesses")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time runs")
    ap.add_argument("--max-inst-gb", type=float, default=10.0,
                    help="skip per-sample-instantiating configs needing more than this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None,
                    help="Inductor cache dir (default: a fresh temporary one, so first steps are cold compiles)")
    ap.add_argument("--timeout", type=float, default=1200, help="per worker process, seconds")
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:1, ...: models, data and steps on it; the device is synchronized "
                         "around timed steps; memory on cuda is torch.cuda.max_memory_allocated")
    ap.add_argument("--out", default=None, help="results folder (default results/, results/<device>/ "
                                                "when the device is not the CPU)")
    ap.add_argument("--tag", default="", help="suffix for result files (e.g. 'quick')")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--fxclip-rev", default="HEAD",
                    help="measure fxclip as committed at this git revision (default HEAD); "
                         "'worktree' measures the working tree as it is (may change during the sweep)")
    a = ap.parse_args(argv)

    on_cpu = a.device == "cpu"
    out_dir = Path(a.out or (RESULTS if on_cpu else RESULTS / a.device.split(":")[0]))
    out_dir.mkdir(parents=True, exist_ok=True)
    # a device's tables next to its results; the CPU's stay in bench/RESULTS.md
    results_md = HERE / "RESULTS.md" if on_cpu and not a.out else out_dir / "RESULTS.md"
    if a.report_only:
        report.write_all(out_dir, results_md)
        return 0
    rounds = a.rounds or (3 if a.quick else 7)
    target_s = a.target_s or (0.1 if a.quick else 0.25)
    tag = a.tag or ("quick" if a.quick else "")

    def sizes(m):
        if a.batch_sizes:
            return a.batch_sizes
        return MODELS[m].quick_batch_sizes if a.quick else MODELS[m].batch_sizes

    cache = a.cache_dir or tempfile.mkdtemp(prefix="fxclip-bench-inductor-")
    env = _env(cache, a.threads, a.device)
    src = None
    if a.fxclip_rev == "worktree":
        code = _git_state()
    else:
        src, code = _snapshot(a.fxclip_rev)
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"]
        WORKDIR[0] = src
    log_path = out_dir / f"run{('-' + tag) if tag else ''}.log"
    do_mem = not (a.no_mem or a.check_only)
    do_time = not (a.no_time or a.check_only)
    do_check = a.check or a.check_only
    total = sum(len(sizes(m)) * (len(a.configs) * do_mem + do_time) + do_check for m in a.models)
    t_start = time.time()
    with open(log_path, "w") as log, tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True) as bar:
        for m in a.models:
            bss = sizes(m)
            path = out_dir / f"{m}{('-' + tag) if tag else ''}.json"
            res = json.loads(path.read_text()) if path.exists() else {}
            res.update({
                "model": m, "description": MODELS[m].description,
                "machine": {"cpu_count": os.cpu_count(), "threads": a.threads,
                            "platform": platform.platform(), "python": platform.python_version()},
                "device": _device_name(a.device),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
            })
            try:
                from importlib.metadata import version

                import opacus
                import torch  # noqa: F401  (versions only)
                res["versions"] = {"torch": torch.__version__, "opacus": opacus.__version__,
                                   "opake": version("opake")}
            except Exception:
                pass
            import torch

            from .models import n_params
            torch.manual_seed(0)
            res["n_params"] = n_params(MODELS[m].build())
            res["code"] = code
            res.setdefault("mem", {})
            res.setdefault("time", {})
            if do_time:
                bar.set_postfix_str(f"{m} time")

                ticks = []

                def tick(line, m=m, ticks=ticks):
                    ticks.append(line)
                    bar.update(1)
                    bar.set_postfix_str(f"{m} time B={line.split()[-1]} done")

                r = _worker(["time", "--model", m, "--device", a.device, "--batch-sizes", *map(str, bss),
                             "--configs", *a.configs, "--rounds", str(rounds),
                             "--warmup", str(a.warmup), "--target-s", str(target_s),
                             "--threads", str(a.threads), "--max-inst-gb", str(a.max_inst_gb)],
                            env, log, a.timeout, on_line=tick)
                partial = r.pop("partial", None) or {}
                if "error" in r:  # the worker died: keep what it finished, the error for the rest
                    res["time"].update(partial)
                    for bs in bss:
                        if str(bs) not in partial:
                            res["time"][str(bs)] = {c: {"error": r["error"]} for c in a.configs}
                else:
                    res["time"].update(r)
                res["inductor_init_s"] = res["time"].pop("_inductor_init_s", None)
                bar.update(max(0, len(bss) - len(ticks)))
            if do_mem:
                for bs in bss:
                    for c in a.configs:
                        bar.set_postfix_str(f"{m} B={bs} {c} mem")
                        r = _worker(["mem", "--model", m, "--device", a.device, "--batch-sizes", str(bs),
                                     "--configs", c, "--steps", str(a.mem_steps), "--threads", str(a.threads),
                                     "--max-inst-gb", str(a.max_inst_gb)], env, log, a.timeout)
                        res["mem"].setdefault(str(bs), {})[c] = r
                        bar.update(1)
                        path.write_text(json.dumps(res, indent=1))
            if do_check:
                bar.set_postfix_str(f"{m} check")
                res["check"] = _worker(
                    ["check", "--model", m, "--device", a.device, "--batch-sizes", str(a.check_batch_size or min(bss)),
                     "--configs", *a.configs, "--threads", str(a.threads),
                     "--max-inst-gb", str(a.max_inst_gb)], env, log, a.timeout)
                bar.update(1)
            res["settings"] = {"rounds": rounds, "warmup": a.warmup, "target_s": target_s,
                               "mem_steps": a.mem_steps, "clip": 1.0, "loss_reduction": "sum",
                               "max_inst_gb": a.max_inst_gb}
            path.write_text(json.dumps(res, indent=1))
    if not a.cache_dir:
        shutil.rmtree(cache, ignore_errors=True)
    if src:
        shutil.rmtree(src, ignore_errors=True)
    print(f"sweep took {time.time() - t_start:.0f} s; log: {log_path}")
    if not tag:
        report.write_all(out_dir, results_md)
        print(f"wrote {results_md} and plots in {out_dir}")
    else:
        report.write_all(out_dir, out_dir / f"RESULTS-{tag}.md", tag=tag)
        print(f"wrote {out_dir / f'RESULTS-{tag}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
