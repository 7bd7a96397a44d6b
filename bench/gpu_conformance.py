"""fxclip on a device vs a float64 CPU reference: the GPU subset of the conformance tests.

    python -m bench.gpu_conformance --device cuda        # on a GPU machine (bench/gpu_check.sh)
    python -m bench.gpu_conformance --device cpu         # same checks on the CPU (CUDA-only ones skipped)

For each model (MLP; GroupNorm CNN; token model with embedding, tied LM head, MultiheadAttention and
causal SDPA; Bilinear, which takes the fallback rule; HF GPT-2 from a config with an attention mask,
when transformers imports), in float32 on the device, eager and torch.compile'd
``fxclip.privatize(model, max_grad_norm=C)`` (loss_reduction "mean"), one backward, compared with
per-sample gradients from ``torch.func.vmap(grad(...))`` in float64 on the CPU, clip factors
``min(1, C / (n_i + 1e-6))``, mean over the batch. C is the median reference norm, so about half of
the samples are clipped; every check also verifies that an UNCLIPPED gradient would fail it (the
reference's unclipped mean is further than the tolerance from the clipped one).

Then, on the MLP: the loss_fn path (``pm(x, target=y).mean()``), a GradScaler fp16 step (CUDA),
``torch.compile(pm, mode="reduce-overhead")`` over 3 steps with ``per_sample_norms`` current after
each (CUDA graphs on CUDA), and make_private's ``pad_to_multiple`` (padded compiled training equals
unpadded eager training).

Prints one PASS/FAIL/SKIP line per check; exits 1 on any FAIL; writes
bench/results/<device>/conformance.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import fxclip

EPS = 1e-6
# float32 on the device vs float64: relative error of each parameter's gradient (floored at 1e-3 of
# the whole gradient's norm, for parameters whose gradient is ~0) and of the per-sample norms
TOL_F32 = 1e-4
TOL_FP16 = 1e-2  # fp16 autocast forward (11-bit mantissa)
RESULTS = Path(__file__).resolve().parent / "results"


# --- models: (build, make inputs (tuple), make target, per-sample loss of (out, y) -> (B,)) ----------

def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _token_ce(out, y):
    """Mean token cross-entropy per sequence: (B, T, V), (B, T) -> (B,)."""
    b, t, v = out.shape
    return F.cross_entropy(out.reshape(b * t, v), y.reshape(b * t), reduction="none").view(b, t).mean(1)


class Tokens(nn.Module):
    """Embedding + position, MultiheadAttention, causal SDPA, LayerNorm, LM head tied to the embedding."""

    def __init__(self, vocab=50, d=32, heads=2, t_max=16):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t_max, d) * 0.1)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        b, t = ids.shape
        h = self.emb(ids) + self.pos[:t]
        h = h + self.mha(h, h, h, need_weights=False)[0]
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(h).chunk(3, -1))
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        return self.head(self.norm(h))


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(6, 5, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, a, b):
        return self.out(torch.tanh(self.bil(a, b)))


class HFGPT2(nn.Module):
    """GPT2LMHeadModel from a config (no download); (ids, attention_mask) -> logits."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        self.gpt2 = GPT2LMHeadModel(cfg)

    def forward(self, ids, mask):
        return self.gpt2(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=True).logits


def _padding_mask(b, t, g):
    """1 for real tokens; every other sequence ends with 1-3 padding positions."""
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b, 2):
        mask[i, t - 1 - int(torch.randint(0, 3, (), generator=g)):] = 0
    return mask


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)),
            lambda b, g: (torch.randn(b, 32, generator=g),),
            lambda b, g: torch.randint(0, 10, (b,), generator=g), _ce),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
            lambda b, g: (torch.randn(b, 3, 12, 12, generator=g),),
            lambda b, g: torch.randint(0, 10, (b,), generator=g), _ce),
    "tokens": (Tokens, lambda b, g: (torch.randint(0, 50, (b, 12), generator=g),),
               lambda b, g: torch.randint(0, 50, (b, 12), generator=g), _token_ce),
    "bilinear": (BilinearNet, lambda b, g: (torch.randn(b, 6, generator=g), torch.randn(b, 5, generator=g)),
                 lambda b, g: torch.randint(0, 4, (b,), generator=g), _ce),
    "hf_gpt2": (HFGPT2, lambda b, g: (torch.randint(0, 64, (b, 12), generator=g), _padding_mask(b, 12, g)),
                lambda b, g: torch.randint(0, 64, (b, 12), generator=g), _token_ce),
}


# --- the float64 CPU reference ------------------------------------------------------------------

def reference(model, inputs, y, loss_fn):
    """Per-sample gradients {name: (B, ...)} and norms (B,) in float64 on the CPU: torch.func.vmap
    of grad; a model whose forward has data-dependent Python control flow (HF's attention-mask
    code) that vmap cannot batch gets one backward per sample instead (a batch of one each)."""
    m = copy.deepcopy(model).to("cpu", torch.float64)
    inputs = tuple(x.cpu().double() if x.is_floating_point() else x.cpu() for x in inputs)
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    buffers = dict(m.named_buffers())

    def loss_of_sample(p, xs, y_i):
        out = functional_call(m, (p, buffers), tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out, y_i.unsqueeze(0)).sum()

    try:
        grads = vmap(grad(loss_of_sample), in_dims=(None, 0, 0))(params, inputs, y.cpu())
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        rows = [grad(loss_of_sample)(params, tuple(x[i] for x in inputs), y.cpu()[i]) for i in range(len(y))]
        grads = {n: torch.stack([r[n] for r in rows]) for n in params}
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()))
    return grads, norms


def expected_grads(grads, norms, C, rows=None):
    """mean_i R_i grad_i (rows: the batch size to divide by; default B)."""
    factor = (C / (norms + EPS)).clamp(max=1.0)
    rows = rows or len(norms)
    return {n: torch.einsum("b,b...->...", factor, g) / rows for n, g in grads.items()}


# --- comparisons --------------------------------------------------------------------------------

def grad_errors(model, expected, tol):
    """Problems of model's .grad vs expected (float64, CPU): missing, off-device, too far."""
    dev = next(model.parameters()).device
    total = math.sqrt(sum(float(e.square().sum()) for e in expected.values()))
    bad, worst = [], 0.0
    for n, p in model.named_parameters():
        if n not in expected:
            continue
        if p.grad is None:
            bad.append(f"{n}: no grad")
            continue
        if p.grad.device != dev:
            bad.append(f"{n}: grad on {p.grad.device}, parameter on {dev}")
        err = float((p.grad.detach().cpu().double() - expected[n]).norm())
        rel = err / (float(expected[n].norm()) + 1e-3 * total + 1e-30)
        worst = max(worst, rel)
        if not rel < tol:
            bad.append(f"{n}: rel. error {rel:.1e} > {tol:g}")
    return bad, worst


def norm_error(norms, ref):
    if norms is None:
        return float("inf")
    return float((norms.detach().cpu().double() - ref).abs().max() / ref.abs().max())


def discriminates(grads, norms, C, tol):
    """The unclipped mean gradient is further than tol from the clipped one (relative to it):
    the check would catch a parameter that escaped clipping."""
    clipped = expected_grads(grads, norms, C)
    unclipped = expected_grads(grads, norms, float("inf"))
    num = math.sqrt(sum(float((clipped[n] - unclipped[n]).square().sum()) for n in clipped))
    den = math.sqrt(sum(float(c.square().sum()) for c in clipped.values()))
    return num / den > 10 * tol, num / den


# --- checks: each returns a dict with "ok" and details; raising is a FAIL -----------------------------

def _batch(name, b, device, seed=1):
    build, make_x, make_y, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(seed)
    xs, y = make_x(b, g), make_y(b, g)
    return model, xs, y, loss_fn


def _to(xs, device):
    return tuple(x.to(device) for x in xs)


def check_privatize(name, device, b, compiled):
    model, xs, y, loss_fn = _batch(name, b, device)
    grads, norms = reference(model, xs, y, loss_fn)
    C = float(norms.median())
    ok_disc, gap = discriminates(grads, norms, C, TOL_F32)
    model = model.to(device)
    pm = fxclip.privatize(model, max_grad_norm=C)
    run = torch.compile(pm) if compiled else pm
    loss_fn(run(*_to(xs, device)), y.to(device)).mean().backward()
    bad, worst = grad_errors(model, expected_grads(grads, norms, C), TOL_F32)
    nerr = norm_error(pm.per_sample_norms, norms)
    if not nerr < TOL_F32:
        bad.append(f"per_sample_norms: rel. error {nerr:.1e} > {TOL_F32:g}")
    if not ok_disc:
        bad.append(f"unclipped gradient only {gap:.1e} from the clipped one: the check cannot fail")
    d = {"ok": not bad, "problems": bad, "grad_rel_err": worst, "norms_rel_err": nerr,
         "unclipped_vs_clipped": gap, "C": C, "fraction_clipped": float((norms > C).double().mean())}
    if name == "bilinear" and not compiled:  # the Bilinear weight must go through the fallback rule
        rule = pm.last_report.route("bil.weight").rule
        d["bil.weight rule"] = rule
        if rule != "fallback":
            d["ok"] = False
            bad.append(f"bil.weight took rule {rule!r}, expected 'fallback'")
    return d


def check_loss_fn(device, b):
    model, xs, y, loss_fn = _batch("mlp", b, device)
    grads, norms = reference(model, xs, y, loss_fn)
    C = float(norms.median())
    model = model.to(device)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"))
    run = torch.compile(pm)
    x_dev, y_dev = _to(xs, device), y.to(device)
    run(*x_dev, target=y_dev).mean().backward()
    pm.check_step()  # raises if the reduction after the per-sample losses was not the declared mean
    bad, worst = grad_errors(model, expected_grads(grads, norms, C), TOL_F32)
    nerr = norm_error(pm.per_sample_norms, norms)
    if not nerr < TOL_F32:
        bad.append(f"per_sample_norms: rel. error {nerr:.1e}")
    if pm.last_report is not None and not pm.last_report.loss_checked:  # None: from Inductor's cache
        bad.append("the loss was not traced with the model (report.loss_checked is false)")
    # the loss is checked on the device: a sum where a mean was declared is refused at check_step
    model.zero_grad()
    run(*x_dev, target=y_dev).sum().backward()
    try:
        pm.check_step()
        bad.append("losses.sum() under the declared mean was not refused by check_step()")
    except fxclip.PrivacyError:
        pass
    return {"ok": not bad, "problems": bad, "grad_rel_err": worst, "norms_rel_err": nerr}


def check_grad_scaler(device, b):
    """fp16 autocast + connected GradScaler + DPOptimizer (no noise): the unscaled gradients and
    norms are those of the float64 step; scaler.step applies it."""
    model, xs, y, loss_fn = _batch("mlp", b, device)
    grads, norms = reference(model, xs, y, loss_fn)
    C = float(norms.median())
    model = model.to(device)
    start = copy.deepcopy(model)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)
    pm = fxclip.privatize(model, max_grad_norm=C, grad_scaler=scaler)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=0.0,
                             expected_batch_size=b)
    run = torch.compile(pm)
    opt.zero_grad()
    with torch.autocast(device.type, dtype=torch.float16):
        out = run(*_to(xs, device))
    scaler.scale(loss_fn(out.float(), y.to(device)).mean()).backward()
    scaler.unscale_(opt)
    exp = expected_grads(grads, norms, C)
    # DPOptimizer keeps the clipped SUM in .grad (it divides by expected_batch_size in its step)
    bad, worst = grad_errors(model, {n: g * b for n, g in exp.items()}, TOL_FP16)
    nerr = norm_error(pm.per_sample_norms, norms)
    if not nerr < TOL_FP16:
        bad.append(f"per_sample_norms: rel. error {nerr:.1e} > {TOL_FP16:g}")
    scaler.step(opt)
    scaler.update()
    step = {n: (p0.detach() - p.detach()).cpu().double() for (n, p), p0 in
            zip(model.named_parameters(), start.parameters())}
    for n, e in exp.items():
        rel = float((step[n] - e).norm() / (e.norm() + 1e-30))
        if not rel < TOL_FP16:
            bad.append(f"{n}: applied step rel. error {rel:.1e} > {TOL_FP16:g}")
    if opt.steps != 1 or getattr(opt, "skipped_steps", 0):
        bad.append(f"optimizer steps {opt.steps}, skipped {getattr(opt, 'skipped_steps', '?')}")
    return {"ok": not bad, "problems": bad, "grad_rel_err": worst, "norms_rel_err": nerr,
            "scale": scaler.get_scale()}


def check_reduce_overhead(device, b):
    """3 steps of torch.compile(pm, mode="reduce-overhead") on new data each: gradients and
    per_sample_norms of THAT step (replayed CUDA graphs must not show stale values)."""
    model, _, _, loss_fn = _batch("mlp", b, device)
    model = model.to(device)
    C = None
    pm = None
    errs, bad = [], []
    for step in range(3):
        ref_model, xs, y, _ = _batch("mlp", b, device, seed=10 + step)
        with torch.no_grad():  # the reference at the current (device) parameters
            for p, q in zip(ref_model.parameters(), model.parameters()):
                p.copy_(q.cpu())
        grads, norms = reference(ref_model, xs, y, loss_fn)
        if pm is None:
            C = float(norms.median())
            pm = fxclip.privatize(model, max_grad_norm=C)
            run = torch.compile(pm, mode="reduce-overhead")
        model.zero_grad()
        loss_fn(run(*_to(xs, device)), y.to(device)).mean().backward()
        step_bad, worst = grad_errors(model, expected_grads(grads, norms, C), TOL_F32)
        nerr = norm_error(pm.per_sample_norms, norms)
        if not nerr < TOL_F32:
            step_bad.append(f"per_sample_norms: rel. error {nerr:.1e}")
        bad += [f"step {step}: {p}" for p in step_bad]
        errs.append({"grad_rel_err": worst, "norms_rel_err": nerr})
        with torch.no_grad():  # move the parameters so every step's graph sees new weights too
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    return {"ok": not bad, "problems": bad, "steps": errs}


def check_pad_to_multiple(device, n=40, batch=6, pad=8):
    """make_private(pad_to_multiple=8), compiled, trains exactly like make_private without padding
    (eager): same parameters after an epoch, every padded batch a multiple of 8 rows."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(n, 32), torch.randint(0, 10, (n,)))
    runs = {}
    for p in (None, pad):
        model, _, _, loss_fn = _batch("mlp", 1, device)
        model = model.to(device)
        pm, opt, loader = fxclip.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=batch),
            noise_multiplier=0.0, max_grad_norm=0.5, pad_to_multiple=p,
            generator=torch.Generator().manual_seed(7))
        run = torch.compile(pm) if p else pm
        sizes = []
        for xb, yb in loader:
            sizes.append(xb.shape[0])
            opt.zero_grad()
            loss_fn(run(xb.to(device)), yb.to(device)).mean().backward()
            opt.step()
        runs[p] = (model, sizes, opt.accountant.steps)
    (plain, plain_sizes, steps), (padded, padded_sizes, padded_steps) = runs[None], runs[pad]
    bad = []
    if not all(s % pad == 0 and s > 0 for s in padded_sizes):
        bad.append(f"padded batch sizes {padded_sizes} not multiples of {pad}")
    if plain_sizes == padded_sizes:
        bad.append("no batch was padded: the check did not exercise padding")
    if steps != padded_steps:
        bad.append(f"accounted steps {steps} (unpadded) != {padded_steps} (padded)")
    worst = 0.0
    for (name, p), q in zip(plain.named_parameters(), padded.parameters()):
        rel = float((q - p).detach().norm() / (p.detach().norm() + 1e-30))
        worst = max(worst, rel)
        if not rel < TOL_F32:
            bad.append(f"{name}: padded vs unpadded parameters rel. diff {rel:.1e}")
    return {"ok": not bad, "problems": bad, "param_rel_diff": worst, "padded_sizes": padded_sizes,
            "unpadded_sizes": plain_sizes}


# --- runner ---------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_conformance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="eager checks only (quicker)")
    ap.add_argument("--all-checks", action="store_true",
                    help="on the CPU, also run the fp16 GradScaler check (CPU fp16 autocast) and the "
                         "reduce-overhead check (no CUDA graphs there): exercises their code")
    ap.add_argument("--out", default=None, help="JSON summary (default bench/results/<device>/conformance.json)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    run_cuda_checks = cuda or a.all_checks
    if cuda:  # float32 means float32: no TF32 in the checked steps
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import warnings
    warnings.filterwarnings("ignore", message=".*loss of this privatized model is computed outside it.*")

    checks = []
    for m in a.models:
        for compiled in ([False] if a.no_compile else [False, True]):
            checks.append((f"{m}/{'compiled' if compiled else 'eager'}",
                           lambda m=m, c=compiled: check_privatize(m, device, a.batch_size, c)))
    checks.append(("mlp/loss_fn compiled", lambda: check_loss_fn(device, a.batch_size)))
    checks.append(("mlp/GradScaler fp16 compiled",
                   (lambda: check_grad_scaler(device, a.batch_size)) if run_cuda_checks else
                   "needs CUDA (fp16 autocast + GradScaler is the GPU recipe)"))
    checks.append(("mlp/reduce-overhead 3 steps",
                   (lambda: check_reduce_overhead(device, a.batch_size)) if run_cuda_checks else
                   "needs CUDA (CUDA graphs)"))
    checks.append(("mlp/make_private pad_to_multiple=8 compiled", lambda: check_pad_to_multiple(device)))

    results, failed = {}, 0
    t_all = time.time()
    out = Path(a.out) if a.out else RESULTS / device.type / "conformance.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():  # after every check: a run stopped by a time limit keeps what it finished
        summary = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                   "torch": torch.__version__, "tol_float32": TOL_F32, "tol_fp16": TOL_FP16,
                   "batch_size": a.batch_size, "failed": failed, "seconds": round(time.time() - t_all, 1),
                   "not_run": [n for n, _ in checks if n not in results], "checks": results}
        out.write_text(json.dumps(summary, indent=1))

    print(f"fxclip conformance on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f", torch {torch.__version__}, float32 tolerance {TOL_F32:g}, fp16 {TOL_FP16:g}", flush=True)
    for name, fn in checks:
        t0 = time.time()
        if isinstance(fn, str):
            results[name] = {"status": "SKIP", "why": fn}
            print(f"SKIP {name}: {fn}", flush=True)
            write()
            continue
        if name.startswith("hf_gpt2"):
            try:
                import transformers  # noqa: F401
            except Exception as e:
                results[name] = {"status": "SKIP", "why": f"transformers does not import: {e}"}
                print(f"SKIP {name}: transformers does not import ({e})", flush=True)
                write()
                continue
        try:
            d = fn()
        except Exception as e:
            d = {"ok": False, "problems": [f"{type(e).__name__}: {e}"[:500]],
                 "traceback": traceback.format_exc()[-3000:]}
        torch._dynamo.reset()
        d["seconds"] = round(time.time() - t0, 1)
        d["status"] = "PASS" if d["ok"] else "FAIL"
        failed += not d["ok"]
        results[name] = d
        detail = ", ".join(f"{k} {d[k]:.1e}" for k in ("grad_rel_err", "norms_rel_err", "param_rel_diff")
                           if k in d)
        print(f"{d['status']} {name} ({d['seconds']:.0f} s{', ' + detail if detail else ''})"
              + ("".join(f"\n    {p}" for p in d["problems"]) if d["problems"] else ""), flush=True)
        write()
    n_pass = sum(r["status"] == "PASS" for r in results.values())
    n_skip = sum(r["status"] == "SKIP" for r in results.values())
    print(f"{n_pass} passed, {failed} failed, {n_skip} skipped in {time.time() - t_all:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
