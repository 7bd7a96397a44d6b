"""RESULTS.md tables and PNG plots from bench/results/*.json (written by ``python -m bench``)."""

from __future__ import annotations

import json
from pathlib import Path

from .configs import BASELINE, CONFIGS, OPAKE_MICROBATCH_GB
from .models import MODELS

HERE = Path(__file__).resolve().parent

ORDER = list(CONFIGS)
STYLE = {  # colour, marker, linestyle
    "plain_eager": ("#888888", "o", "--"),
    "plain_compiled": ("#000000", "o", "-"),
    "fxclip_eager": ("#1f77b4", "s", "--"),
    "fxclip_compiled": ("#1f77b4", "s", "-"),
    "opacus_ghost": ("#d62728", "^", "-"),
    "opacus_hooks": ("#ff7f0e", "v", "-"),
    "functorch": ("#2ca02c", "D", "-"),
    "opake": ("#9467bd", "P", "--"),
    "opake_compiled": ("#9467bd", "P", "-"),
}

# This goals, fxclip compiled / plain compiled: step time (median) and steady peak RSS growth
TIME_GOALS = {"mlp": 1.05, "tied_lm": 1.05, "gpt": 1.10, "hf_gpt2": 1.10, "cnn": 1.10, "digits": 1.30}
MEMORY_GOALS = {"mlp": 1.02, "tied_lm": 1.02}


def _load(out_dir: Path, tag: str = ""):
    res = {}
    for m in MODELS:
        p = out_dir / f"{m}{('-' + tag) if tag else ''}.json"
        if p.exists():
            res[m] = json.loads(p.read_text())
    return res


def _bss(r):
    keys = set(r.get("time", {})) | set(r.get("mem", {}))
    return sorted(keys, key=int)


def _cell(d, key, fmt):
    if not d or key not in d or d[key] is None:
        return "—"
    return fmt.format(d[key])


def _short(err: str, n=110):
    err = err.replace("|", "\\|")
    return err if len(err) <= n else err[:n] + "…"


def _errors_for(r, bs, c):
    t = r.get("time", {}).get(bs, {}).get(c, {})
    m = r.get("mem", {}).get(bs, {}).get(c, {})
    return t.get("error") or m.get("error")


def model_table(r) -> list[str]:
    lines = [
        "| B | configuration | step ms (median) | ratio to plain compiled | step ms (min) | ratio (min) "
        "| peak RSS growth MB (steady) | peak RSS growth MB (incl. compile) | peak RSS MB "
        "| compile s (first step, cold) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes: dict = {}  # (config, error) -> [note number, [batch sizes]]

    def note(c, bs, err):
        k = (c, err)
        if k not in notes:
            notes[k] = [len(notes) + 1, []]
        if bs not in notes[k][1]:
            notes[k][1].append(bs)
        tag = "skipped" if err.startswith("skipped") else "error"
        return f"{tag} [{notes[k][0]}]"

    for bs in _bss(r):
        for c in ORDER:
            t = r.get("time", {}).get(bs, {}).get(c)
            m = r.get("mem", {}).get(bs, {}).get(c)
            if t is None and m is None:
                continue
            if t and t.get("error"):
                tcells = [note(c, bs, t["error"]), "", "", "", ""]
            else:
                ratio = _cell(t, "ratio", "{:.2f}x")
                if c == BASELINE and t and "ratio" in t:
                    ratio = "1.00 (baseline)"
                base_min = r.get("time", {}).get(bs, {}).get(BASELINE, {}).get("min_ms")
                rmin = f"{t['min_ms'] / base_min:.2f}x" if t and "min_ms" in t and base_min else "—"
                tcells = [_cell(t, "median_ms", "{:.1f}"), ratio,
                          _cell(t, "first_step_s_in_process", "{:.2f}"), _cell(t, "min_ms", "{:.1f}"), rmin]
            if m and m.get("error"):
                same = t and t.get("error") == m["error"]
                mcells = ["" if same else note(c, bs, m["error"]), "", ""]
            else:
                mcells = [_cell(m, "steady_peak_growth_mb", "{:.0f}"), _cell(m, "peak_growth_mb", "{:.0f}"),
                          _cell(m, "peak_rss_mb", "{:.0f}")]
            lines.append(f"| {bs} | {CONFIGS[c].label} | {tcells[0]} | {tcells[1]} | {tcells[3]} | "
                         f"{tcells[4]} | {mcells[0]} | {mcells[1]} | {mcells[2]} | {tcells[2]} |")
    if notes:
        lines.append("")
        for (c, err), (i, bss) in notes.items():
            lines.append(f"- [{i}] {CONFIGS[c].label}, B={', '.join(bss)}: `{_short(err, 300)}`")
    return lines


def check_table(r) -> list[str]:
    ch = r.get("check")
    if not ch:
        return []
    if "configs" not in ch:
        return [f"Gradient check failed to run: `{_short(ch.get('error', '?'), 300)}`", ""]
    lines = [
        f"Gradient check (B={ch['batch_size']}, one batch, vs float64 torch.func; "
        f"{100 * ch['fraction_clipped']:.0f}% of samples clipped; tolerance {ch['tol']:g}"
        + (f", bf16 rows {ch['bf16_tol']:g}; an unclipped gradient is "
           f"{ch['unclipped_vs_clipped']:.1e} from the clipped sum" if "bf16_tol" in ch else "") + "):",
        "",
        "| configuration | compared with | rel. error of grads | rel. error of norms | ok |",
        "|---|---|---:|---:|---|",
    ]
    for c in ORDER:
        d = ch["configs"].get(c)
        if d is None:
            continue
        if "error" in d:
            lines.append(f"| {CONFIGS[c].label} | | `{_short(d['error'], 90)}` | | "
                         f"{'skipped' if d.get('skipped') else 'ERROR'} |")
            continue
        lines.append(f"| {CONFIGS[c].label} | {d['against']} | {d['rel_err']:.1e} | "
                     f"{_cell(d, 'norms_rel_err', '{:.1e}')} | {'yes' if d['ok'] else '**NO**'} |")
    return lines + [""]


def device_note(r) -> list[str]:
    """How a run on a device other than the CPU was measured."""
    device = r.get("device", "cpu")
    if device == "cpu":
        return []
    return [f"**Device: {device}.** Models and batches on it; the device is synchronized around every "
            "timed step; the memory columns named RSS hold `torch.cuda.max_memory_allocated` (peak over "
            "steps, minus the memory allocated before the first step), not RSS; the gradient check's "
            "reference is float64 on the CPU, the checked float32 steps run without TF32.", ""]


def summary(res) -> list[str]:
    lines = [
        "| model | B | fxclip compiled / plain compiled: time, median (min) "
        "| fxclip compiled / plain compiled: steady peak RSS growth "
        "| Opacus ghost / fxclip compiled: time, median (min) "
        "| Opake compiled / fxclip compiled: time, median (min) | fxclip eager / plain eager: time, median (min) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in res.items():
        for bs in _bss(r):
            t = r.get("time", {}).get(bs, {})
            mm = r.get("mem", {}).get(bs, {})

            def ms(c, t=t):
                return t.get(c, {}).get("median_ms")

            def mn(c, t=t):
                return t.get(c, {}).get("min_ms")

            def mem(c, mm=mm):
                return mm.get(c, {}).get("steady_peak_growth_mb")

            def ratio(a, b, err_of=None, r=r, bs=bs):
                if a is not None and b:
                    return f"{a / b:.2f}x"
                if err_of and _errors_for(r, bs, err_of):
                    return "error"
                return "—"

            def both(a, b, r=r, bs=bs, ms=ms, mn=mn):
                for c in (a, b):
                    if ms(c) is None and _errors_for(r, bs, c):
                        return f"{CONFIGS[c].label}: error"
                if ms(a) is None or not ms(b):
                    return "—"
                x = f"{ms(a) / ms(b):.2f}x ({mn(a) / mn(b):.2f}x)"
                noisy = any(ms(c) > 1.5 * mn(c) for c in (a, b))
                return x + (" †" if noisy else "")

            mem_ratio = ratio(mem("fxclip_compiled"), mem("plain_compiled"), "fxclip_compiled")
            lines.append(
                f"| {m} | {bs} | {both('fxclip_compiled', 'plain_compiled')} | "
                f"{mem_ratio.replace('error', 'fxclip compiled: error')} | "
                f"{both('opacus_ghost', 'fxclip_compiled')} | "
                f"{both('opake_compiled', 'fxclip_compiled')} | "
                f"{both('fxclip_eager', 'plain_eager')} |"
            )
    lines += ["", "Ratios: median (min). † marks a pair where a median is > 1.5x its minimum: that "
              "configuration was disturbed by other processes on the shared 2-core machine during "
              "timing; the min ratio is then the better estimate."]
    return lines


def goals(res) -> list[str]:
    """Each goal of TIME_GOALS / MEMORY_GOALS at every measured batch size: met or missed."""
    lines = ["| model | B | goal (fxclip compiled / plain compiled) | measured: median (min) | met |",
             "|---|---:|---|---:|---|"]
    for m, r in res.items():
        for bs in _bss(r):
            t = r.get("time", {}).get(bs, {})
            mm = r.get("mem", {}).get(bs, {})
            fx, plain = t.get("fxclip_compiled", {}), t.get("plain_compiled", {})
            if m in TIME_GOALS and fx.get("median_ms") and plain.get("median_ms"):
                med, low = fx["median_ms"] / plain["median_ms"], fx["min_ms"] / plain["min_ms"]
                met = "met" if med <= TIME_GOALS[m] else ("missed (met by min)" if low <= TIME_GOALS[m] else "missed")
                lines.append(f"| {m} | {bs} | time <= {TIME_GOALS[m]:.2f}x | {med:.2f}x ({low:.2f}x) | {met} |")
            fxm = mm.get("fxclip_compiled", {}).get("steady_peak_growth_mb")
            plm = mm.get("plain_compiled", {}).get("steady_peak_growth_mb")
            if m in MEMORY_GOALS and fxm and plm:
                ratio = fxm / plm
                lines.append(f"| {m} | {bs} | steady peak RSS growth <= {MEMORY_GOALS[m]:.2f}x | {ratio:.2f}x "
                             f"({fxm:.1f} vs {plm:.1f} MB) | {'met' if ratio <= MEMORY_GOALS[m] else 'missed'} |")
    return lines


def step_memory(path: Path) -> list[str]:
    """The table of `python -m bench.step_memory` (a whole step, optimizer included), if run."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    lines = [f"Peak live bytes of a whole training step (forward, loss, backward, optimizer step, "
             f"zero_grad; torch.profiler allocation events; `python -m bench.step_memory`): "
             f"{r['model']}, B={r['batch_size']}, compiled, gradient {r['gradient_mb']:.1f} MiB.", "",
             "| configuration | peak live MiB | largest allocations (MiB) |", "|---|---:|---|"]
    for name, c in r["configs"].items():
        lines.append(f"| {name} | {c['peak_live_mb']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in c['largest_allocations_mb'])} |")
    return lines + [""]


def plot(r, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bss = _bss(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [
        ("time", "median_ms", "step time (ms, log)", True),
        ("mem", "steady_peak_growth_mb", "peak RSS growth, steady steps (MB, log)", True),
        ("time", "first_step_s_in_process", "first step incl. cold compile (s)", False),
    ]
    failed = set()
    for ax, (section, key, title, logy) in zip(axes, panels):
        for c in ORDER:
            xs, ys = [], []
            for bs in bss:
                d = r.get(section, {}).get(bs, {}).get(c, {})
                if d.get(key) is not None:
                    xs.append(int(bs))
                    ys.append(d[key])
                elif d.get("error"):
                    failed.add(c)
            if xs:
                col, mk, ls = STYLE[c] if c in STYLE else (*STYLE[c.removesuffix("_bf16")][:2], ":")
                face = "none" if ls == "--" else col  # eager variants: hollow markers, dashed
                ax.plot(xs, ys, color=col, marker=mk, linestyle=ls, markerfacecolor=face,
                        label=CONFIGS[c].label)
        ax.set_title(title)
        ax.set_xlabel("batch size")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(b) for b in bss], [str(b) for b in bss])
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    no_result = [CONFIGS[c].label for c in ORDER if c in failed and CONFIGS[c].label not in labels]
    title = f"{r['model']}: {r.get('description', '')}"
    if no_result:
        title += f"\n(no result, see RESULTS.md: {', '.join(no_result)})"
    fig.suptitle(title, fontsize=9)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


HEADER = """# fxclip benchmarks

Generated by `python -m bench` (`bench/__main__.py`); raw numbers in `bench/results/<model>.json`,
plots in `bench/results/<model>.png`. Do not edit by hand: rerun the command.

Reproduce: `pip install -e .[bench]` then `python -m bench --check` (full sweep, ~{minutes} min on the
machine below), or `python -m bench --quick` (one batch size per model).

**What every configuration computes**: for the loss `sum_i L_i` (`L_i` = cross-entropy of sample i;
mean token cross-entropy of sequence i for the language models), the private configurations leave
`sum_i R_i grad L_i` in `.grad`, `R_i = min(1, 1.0 / (||grad L_i|| + 1e-6))` (flat clipping over all
parameters, C = 1.0, no noise, no optimizer step); the plain ones leave the unclipped `sum_i grad L_i`.

| configuration | what runs |
|---|---|
{config_rows}

**How it is measured** ({machine}; torch {torch}, opacus {opacus}, opake {opake}; `torch.set_num_threads({threads})`):
- *step ms*: all configurations of a model in ONE process; after the first step (compilation) and
  {warmup} warm-up steps, {rounds} interleaved rounds (order rotated each round; each round repeats a
  configuration's step up to ~{target_s} s; configurations slower than 2 s per step get one warm-up
  step and at least 3 rounds, ~20 s of timed steps); median over all timed steps. *ratio* = median / median of
  plain compiled at the same batch size.
- *memory*: each configuration in its OWN process. *peak RSS growth (steady)*: highest RSS during
  {mem_steps} steps after the first two steps (peak counter reset through `/proc/self/clear_refs`) minus
  the RSS before the first step — the memory a training step needs (gradients, activations,
  per-sample tensors, compiled code). *incl. compile*: `ru_maxrss` over the whole process minus the RSS
  before the first step (includes Dynamo/Inductor compilation). *peak RSS*: absolute `ru_maxrss`.
- *compile s*: time of the first forward+backward of the configuration in the step-time process,
  with the sweep's initially empty Inductor cache: cold compilation for the compiled configurations
  (`TORCHINDUCTOR_COMPILE_THREADS=1`; Inductor's one-time process start-up is paid beforehand by a
  trivial compile, so it is charged to no configuration). For the eager configurations it is the
  first eager step (fxclip eager traces and rewrites the graph there). The memory processes run
  after it with a warm cache (their first-step time is in the JSON as `first_step_s`).
- Interleaving spreads any disturbance by other processes over all configurations; a median far
  above its minimum is marked † in the summary, and the min column is then the contention-free
  estimate. Where the notes below say the sweep ran alone on the machine, no other benchmark,
  test or compilation ran during it.
- Per-sample-instantiating configurations (Opacus hooks, torch.func) are skipped when B x |params|
  x 4 bytes exceeds {max_inst_gb} GB (`--max-inst-gb`). Opake instantiates them one microbatch at a
  time: the largest microbatch whose per-sample gradients fit in {opake_gb:g} GB.
- Opacus runs with `strict=False` (no buffer validation) and an optimizer stand-in that only
  implements `zero_grad()` for `DPTensorFastGradientClipping.backward` (no noise step is timed for
  anyone). The custom GPT builds position ids with `.repeat(B, 1)` (contiguous): Opacus' ghost
  embedding rule calls `.view(-1, 1)` on ids and fails on an `.expand()`ed tensor.
"""


def write_all(out_dir: Path, md_path: Path, tag: str = ""):
    res = _load(out_dir, tag)
    if not res:
        md_path.write_text("# fxclip benchmarks\n\nNo results yet: run `python -m bench`.\n")
        return
    any_r = next(iter(res.values()))
    s = any_r.get("settings", {})
    ver = any_r.get("versions", {})
    mach = any_r.get("machine", {})
    config_rows = "\n".join(f"| {c.label} | {c.doc} |" for c in CONFIGS.values())
    parts = [HEADER.format(
        minutes=25, config_rows=config_rows,
        machine=f"{mach.get('cpu_count', '?')} CPU cores, {mach.get('platform', '?')}",
        torch=ver.get("torch", "?"), opacus=ver.get("opacus", "?"), opake=ver.get("opake", "?"),
        opake_gb=OPAKE_MICROBATCH_GB, threads=mach.get("threads", 2),
        warmup=s.get("warmup", 2), rounds=s.get("rounds", 7), target_s=s.get("target_s", 0.25),
        mem_steps=s.get("mem_steps", 3), max_inst_gb=s.get("max_inst_gb", 10),
    )]
    code = any_r.get("code")
    if code:
        dirty = code.get("uncommitted_fxclip_changes") or []
        parts += [f"fxclip measured at commit `{code.get('commit')}` (per model below)"
                  + (f" ({code['source']})" if code.get("source") else "")
                  + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "") + ".", ""]
    parts += ["## Goals", "", "fxclip compiled / plain compiled, step time and steady peak RSS growth "
              "(a missed goal's reason is in the notes below the table, where known).", ""]
    parts += goals(res) + [""]
    parts += step_memory(out_dir / "step_memory.json")
    notes = HERE / "GOALS_NOTES.md"
    if notes.exists():
        parts += [notes.read_text().strip(), ""]
    parts += ["## Summary", ""] + summary(res) + [""]
    for m, r in res.items():
        png = out_dir / f"{m}{('-' + tag) if tag else ''}.png"
        try:
            plot(r, png)
        except Exception as e:  # a plot must not lose the tables
            print(f"plot {m} failed: {e}")
        rel = png.relative_to(md_path.parent) if png.is_relative_to(md_path.parent) else png
        code = r.get("code") or {}
        parts += [f"## {m}", "", f"{r.get('description', '')}; {r.get('n_params', 0):,} trainable "
                  f"parameters. Measured {r.get('date', '?')}, fxclip at commit `{code.get('commit', '?')}`.", ""]
        parts += model_table(r) + [""]
        parts += check_table(r)
        parts += [f"![{m}]({rel})", ""]
    parts[1:1] = device_note(any_r)  # after the header
    md_path.write_text("\n".join(parts))
