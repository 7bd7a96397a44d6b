"""What `import fxclip` costs on top of `import torch`: wall time and resident memory.

    python -m bench.import_cost                      # 7 rounds -> results/import_cost.json ("current")
    python -m bench.import_cost --label before       # store under another key (other keys are kept)

Each round runs two fresh interpreters, one after the other: one plain (time by perf_counter,
resident memory from /proc/self/status VmRSS, both read right after `import torch` and again
after `import fxclip`), one under `python -X importtime` (which modules the fxclip import
loaded, and their cumulative time, by top-level package). Median and min over the rounds.
Goal (issue 23): fxclip adds at most 0.5 s and 30 MB.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

CHILD = r"""
import json, sys, time
def rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); r1 = rss_mb()
before = set(sys.modules)
import fxclip; t2 = time.perf_counter(); r2 = rss_mb()
heavy = ("scipy", "dp_accounting", "transformers", "fxclip.audit", "fxclip.accounting", "torch._dynamo",
         "torch._inductor", "torch._inductor.lowering", "sympy", "networkx", "matplotlib")
print(json.dumps({"torch": torch.__version__, "torch_s": t1 - t0, "torch_rss_mb": r1, "fxclip_s": t2 - t1,
                  "fxclip_rss_mb": r2 - r1, "modules_added": len(set(sys.modules) - before),
                  "heavy_loaded_by_fxclip": [m for m in heavy if m in sys.modules and m not in before]}))
"""

def _run(python: str, importtime: bool):
    cmd = [python] + (["-X", "importtime"] if importtime else []) + ["-c", CHILD]
    # run outside the repository: from its root, `import fxclip` would find the source folder
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def _breakdown(stderr: str) -> dict[str, float]:
    """Self time (ms) of the modules imported after torch (-X importtime), summed by package:
    the first dotted name, or the first two for torch (torch._dynamo, torch._inductor, ...)."""
    by_pkg: dict[str, float] = defaultdict(float)
    seen_torch = False
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        if not self_us.strip().isdigit():
            continue  # the header line
        if seen_torch:
            parts = name.strip().split(".")
            by_pkg[".".join(parts[:2] if parts[0] == "torch" else parts[:1])] += int(self_us) / 1000
        elif name == " torch":  # the outermost `torch` line closes the torch import (lines are post-order)
            seen_torch = True
    return dict(by_pkg)


def measure(python: str, rounds: int) -> dict:
    plain, timed = [], []
    for _ in range(rounds):
        plain.append(_run(python, importtime=False)[0])
        timed.append(_breakdown(_run(python, importtime=True)[1]))

    def stats(key):
        values = [r[key] for r in plain]
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3)}

    breakdown = {}
    for name in sorted({k for t in timed for k in t}):
        values = [t.get(name, 0.0) for t in timed]
        breakdown[name] = round(statistics.median(values), 1)
    return {"torch": plain[0]["torch"], "rounds": rounds,
            "import_torch_s": stats("torch_s"), "import_torch_rss_mb": stats("torch_rss_mb"),
            "import_fxclip_after_torch_s": stats("fxclip_s"),
            "import_fxclip_after_torch_rss_mb": stats("fxclip_rss_mb"),
            "modules_added_by_fxclip": plain[0]["modules_added"],
            "heavy_modules_loaded_by_fxclip": plain[0]["heavy_loaded_by_fxclip"],
            "importtime_self_ms_by_package_median": dict(sorted(breakdown.items(), key=lambda kv: -kv[1])[:12]),
            "goal": "fxclip adds <= 0.5 s and <= 30 MB"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--python", default=sys.executable, help="interpreter to measure (another venv's)")
    ap.add_argument("--label", default="current", help="key in the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_cost.json"))
    args = ap.parse_args(argv)
    result = measure(args.python, args.rounds)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    result["commit"] = commit
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    stored[args.label] = result
    out.write_text(json.dumps(stored, indent=1) + "\n")
    t, m = result["import_fxclip_after_torch_s"], result["import_fxclip_after_torch_rss_mb"]
    print(f"torch {result['torch']}: import fxclip after torch: {t['median']:.3f} s median ({t['min']:.3f} min), "
          f"+{m['median']:.1f} MB RSS median ({m['min']:.1f} min); "
          f"import torch {result['import_torch_s']['median']:.2f} s")
    print(f"loaded by fxclip: {', '.join(result['heavy_modules_loaded_by_fxclip']) or 'none of the heavy ones'}")
    return result


if __name__ == "__main__":
    main()
