"""What compiling leaves in a process: RSS and live FX graphs after warm-up, plain against fxclip.

    python -m bench.compile_leftovers            # -> results/compile_leftovers.json

The BERT table's model (bench/bert_table.py: BERT-base, last encoder layer + pooler + classifier
trained; here B = 8, T = 8, one thread), plain compiled and fxclip compiled, each in a fresh
process: once with a cold Inductor cache (the graphs are traced, rewritten and compiled in the
process) and once with the cache the cold run filled (the compiled graphs are loaded; fxclip's pass
does not run). After 3 steps: gc.collect() and malloc_trim(0), then the resident set size and the
FX graphs still alive (their node counts). The difference between the cold and warm fxclip runs is
what tracing and rewriting leave behind, not what a step holds.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compile_leftovers.json"
VARIANTS = ("plain_compiled", "fxclip_compiled")


def child(variant: str) -> dict:
    import torch
    import torch.fx

    from .bert_table import BUILDERS, build_bert, make_batch

    torch.set_num_threads(1)
    model = build_bert(1)
    x, y = make_batch(8, 8)
    step = BUILDERS[variant](model, x, y)
    for _ in range(3):
        step(x, y)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    objects = gc.get_objects()
    graphs = sorted((len(g.nodes) for g in objects if isinstance(g, torch.fx.Graph)), reverse=True)
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    return {"rss_mib": round(rss, 1), "python_objects": len(objects), "fx_graph_nodes": graphs}


def run(variant: str, cache: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-m", "bench.compile_leftovers", "--child", variant], env=env,
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return
    results = {}
    for variant in VARIANTS:
        cache = tempfile.mkdtemp(prefix="fxclip-leftovers-")
        results[variant] = {"cold cache": run(variant, cache), "warm cache": run(variant, cache)}
    for variant, r in results.items():
        for kind, m in r.items():
            print(f"{variant:16s} {kind:10s} RSS {m['rss_mib']:7.1f} MiB, {m['python_objects']} objects, "
                  f"FX graphs alive: {m['fx_graph_nodes']}")
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
