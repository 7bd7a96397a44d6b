"""Data parallelism on torch.distributed (CPU, gloo, 2 ranks on localhost).

Each test group launches ONE 2-rank job (this file run as a script, `python test_distributed.py
<job> <rank> <world> <port> <outdir>`), bounded by a timeout; every scenario in the job writes
its numbers to outdir, and the tests below assert on them. References are computed in float64
with torch.func on the concatenation of the ranks' batches, in the worker.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from reference import per_sample_grads, per_sample_reference  # noqa: E402

import fxclip  # noqa: E402
from fxclip import distributed as fxd  # noqa: E402

C = 0.3
SIZES = (5, 3)  # rank 0 and rank 1 batch sizes: unequal on purpose


def _model(width=8):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 3)).double()


# float64 400x400 weights are 1.28 MB each: DDP's 1 MB buckets then hold them in several buckets,
# where Dynamo's DDP optimizer would split the compiled graph
WIDE = 400


def _data(sizes=SIZES):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(b, 6, generator=g, dtype=torch.float64) for b in sizes]
    ys = [torch.randint(0, 3, (b,), generator=g) for b in sizes]
    return xs, ys


def _sample_loss(out, y):
    return F.cross_entropy(out, y)


def _flat_reference(sizes=SIZES, width=8):
    """The clipped SUM over the concatenated batch, per parameter (in parameter order)."""
    xs, ys = _data(sizes)
    model = _model(width)
    expected, norms = per_sample_reference(model, (torch.cat(xs),), torch.cat(ys), _sample_loss, C,
                                           loss_reduction="sum")
    return [expected[n] for n, _ in model.named_parameters()], norms


def _group_reference(groups_of_index, thresholds, sizes=SIZES):
    """Clipped sum where parameter k (in order) belongs to group groups_of_index[k], clipped to
    thresholds[group] per sample."""
    xs, ys = _data(sizes)
    model = _model()
    grads = per_sample_grads(model, (torch.cat(xs),), torch.cat(ys), _sample_loss)
    names = [n for n, _ in model.named_parameters()]
    sq = {}
    for k, n in enumerate(names):
        g = grads[n]
        sq[groups_of_index[k]] = sq.get(groups_of_index[k], 0) + g.reshape(g.shape[0], -1).square().sum(1)
    factor = {grp: (thresholds[grp] / (s.sqrt() + 1e-6)).clamp(max=1.0) for grp, s in sq.items()}
    return [torch.einsum("b,b...->...", factor[groups_of_index[k]], grads[n]) for k, n in enumerate(names)]


def _max_err(got, want):
    return max((a.detach().to(torch.float64) - b).abs().max().item() for a, b in zip(got, want))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------------------------
# scenarios (run in the 2 worker processes); each returns a dict of numbers
# --------------------------------------------------------------------------------------------

def _train_step(module, opt, x, y, reduction, skip_empty=False):
    opt.zero_grad()
    if not (skip_empty and len(y) == 0):
        out = module(x)
        loss = F.cross_entropy(out, y, reduction=reduction)
        loss.backward()
    opt.step()


def _exactness(rank, world, mode, reduction, compiled=False, sizes=SIZES, skip_empty=False,
               bucket_cap_mb=25, width=8):
    xs, ys = _data(sizes)
    model = _model(width)
    if rank == 1:  # rank 1 starts from different weights: the optimizer/DDP must sync them
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=reduction)
    module = torch.compile(pm) if compiled else pm
    if mode == "ddp":
        module = fxd.DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb)
    total = sum(sizes)
    opt = fxd.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module,
                                     noise_multiplier=0.0, expected_batch_size=total)
    want, norms = _flat_reference(sizes, width)
    _train_step(module, opt, xs[rank], ys[rank], reduction, skip_empty)
    got = [p.grad for p in model.parameters()]
    offset = sum(sizes[:rank])
    local_norms = pm.per_sample_norms
    norm_err = 0.0 if skip_empty and sizes[rank] == 0 else \
        (local_norms - norms[offset:offset + sizes[rank]]).abs().max().item() if sizes[rank] else 0.0
    div = total if reduction == "mean" else 1  # "sum": the optimizer does not divide
    return {"err": _max_err(got, [w / div for w in want]), "norm_err": norm_err,
            "batch": opt.last_batch_size, "local_batch": opt.last_local_batch_size,
            "scale": max(w.abs().max().item() for w in want) / div}


def _torch_ddp_splits_the_graph(rank, world):
    """Control: torch's own DDP around torch.compile(pm), several buckets: Dynamo splits the
    privatized graph at bucket boundaries, which fxclip refuses (each piece would clip with its
    own partial norm). fxclip.distributed.DistributedDataParallel keeps it whole."""
    xs, ys = _data()
    pm = fxclip.privatize(_model(WIDE), max_grad_norm=C, loss_reduction="sum")
    ddp = torch.nn.parallel.DistributedDataParallel(torch.compile(pm), bucket_cap_mb=1)
    try:
        F.cross_entropy(ddp(xs[rank]), ys[rank], reduction="sum").backward()
    except fxclip.PrivacyError as e:
        return {"refused": "graph break" in str(e)}
    return {"refused": False}


def _zero_grad_noise(rank, world, mode):
    """Inputs of zeros into a bias-free linear model: every update coordinate is noise."""
    torch.manual_seed(0)  # the SAME global seed on every rank: must not give the same noise
    lr, sigma, total = 0.5, 1.3, 10
    model = nn.Linear(2000, 10, bias=False)
    reduction = "sum" if mode == "fsdp" else "mean"
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=reduction)
        fully_shard(pm)
        module = pm
    else:
        pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=reduction)
        module = fxd.DistributedDataParallel(pm) if mode == "ddp" else pm
    # FSDP: sum in the module, the optimizer divides by the expected batch size ("mean")
    opt = fxd.DistributedDPOptimizer(torch.optim.SGD(pm.parameters(), lr=lr), module,
                                     noise_multiplier=sigma, expected_batch_size=total,
                                     loss_reduction="mean")
    w = pm.module.weight
    before = _full(w).detach().clone()
    opt.zero_grad()
    y = module(torch.zeros(4 if rank == 0 else 3, 2000))
    (y.sum() if reduction == "sum" else y.mean()).backward()
    opt.step()
    update = (_full(w).detach() - before).flatten()
    other = update.clone()
    torch.distributed.broadcast(other, src=1)  # rank 1's view of the update
    half = update.numel() // 2
    corr = torch.corrcoef(torch.stack([update[:half], update[half:2 * half]]))[0, 1].item()
    return {"std": update.std().item(), "expected": lr * sigma * C / total,
            "replicas_differ": (update - other).abs().max().item(), "halves_corr": corr,
            "n": update.numel()}


def _per_block(rank, world, mode, clipping, reduction="sum", compiled=False):
    xs, ys = _data()
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    blocks = ["0", "2", "4"]
    fxd.privatize_blocks(model, blocks, max_grad_norm=C, loss_reduction=reduction, clipping=clipping)
    if compiled:
        for b in blocks:
            model[int(b)].compile()
    if clipping == "flat":
        group = [int(n.split(".")[0]) // 2 for n in names]  # one group per block
    else:  # per_layer: here too one group per Linear
        group = [int(n.split(".")[0]) // 2 for n in names]
    G = len(set(group))
    thresholds = {g: C / math.sqrt(G) for g in set(group)}
    module = model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for b in blocks:
            fully_shard(model[int(b)])
        fully_shard(model)
    opt = fxd.DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module,
                                     noise_multiplier=0.0, expected_batch_size=sum(SIZES))
    _train_step(module, opt, xs[rank], ys[rank], reduction)
    want = _group_reference(group, thresholds)
    got = [_full(p.grad) for p in model.parameters()]
    bounds = [m.max_grad_norm for m in model.modules() if isinstance(m, fxclip.PrivatizedModule)]
    div = sum(SIZES) if reduction == "mean" else 1
    return {"err": _max_err(got, [w / div for w in want]), "opt_C": opt.max_grad_norm,
            "block_C": bounds, "scale": max(w.abs().max().item() for w in want) / div}


def _fsdp_flat(rank, world):
    from torch.distributed.fsdp import fully_shard
    xs, ys = _data()
    model = _model()
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    fully_shard(pm)
    opt = fxd.DistributedDPOptimizer(torch.optim.SGD(pm.parameters(), lr=0.0), pm,
                                     noise_multiplier=0.0, expected_batch_size=sum(SIZES))
    for _ in range(2):  # a second step: FSDP re-gathers parameters; the graph must still fit
        _train_step(pm, opt, xs[rank], ys[rank], "sum")
    want, _ = _flat_reference()
    got = [_full(p.grad) for p in pm.parameters()]
    return {"err": _max_err(got, want), "scale": max(w.abs().max().item() for w in want)}


def _tensor_parallel_norms(rank, world):
    """Megatron-style 2-layer MLP, W1 split by output rows and W2 by input columns across the 2
    ranks. A sample's norm is split across ranks: each rank computes its parameters' partial
    squared per-sample norms (here the ghost formula ||a_i||^2 ||g_i||^2, what the pass computes
    for a linear layer), ONE all-reduce sums them, every rank gets the same clip factors R_i and
    reweights its own shard's gradient. Checked against the unsplit model."""
    import torch.distributed as dist
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(3)
    d, h, o, B = 5, 6, 4, 7
    full = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, o)).double()
    x = torch.randn(B, d, dtype=torch.float64)
    y = torch.randint(0, o, (B,))
    rows = slice(rank * h // world, (rank + 1) * h // world)
    W1, b1 = full[0].weight[rows].detach(), full[0].bias[rows].detach()
    W2 = full[2].weight[:, rows].detach()
    b2 = full[2].bias.detach()
    # forward: the partial outputs are summed across ranks (the row-parallel all-reduce)
    a1 = x
    z1 = a1 @ W1.T + b1
    a2 = torch.tanh(z1)
    partial = a2 @ W2.T
    out = partial.clone()
    dist.all_reduce(out)
    out = out + b2
    # backward seed g_out (replicated), then local backprop per sample
    out_leaf = out.detach().requires_grad_(True)
    F.cross_entropy(out_leaf, y, reduction="sum").backward()
    g_out = out_leaf.grad                      # (B, o), per-sample rows
    g2 = g_out                                 # grad at the W2 output (partial sum is linear)
    g1 = (g_out @ W2) * (1 - a2.square())      # grad at z1, local rows only
    partial_sq = (a2.square().sum(1) * g2.square().sum(1)      # W2 shard: ghost norm
                  + a1.square().sum(1) * g1.square().sum(1)    # W1 shard: ghost norm
                  + g1.square().sum(1))                        # b1 shard
    if rank == 0:
        partial_sq = partial_sq + g_out.square().sum(1)         # b2 replicated: count it once
    total_sq = partial_sq.clone()
    dist.all_reduce(total_sq)                  # THE all-reduce of partial squared norms
    norms = total_sq.sqrt()
    R = (C / (norms + 1e-6)).clamp(max=1.0)
    local = {"0.weight": (R[:, None] * g1).T @ a1, "0.bias": (R[:, None] * g1).sum(0),
             "2.weight": (R[:, None] * g2).T @ a2, "2.bias": (R[:, None] * g_out).sum(0)}
    # reference on the unsplit model
    params = {n: p.detach() for n, p in full.named_parameters()}

    def loss1(p, xi, yi):
        return F.cross_entropy(functional_call(full, p, (xi[None],)), yi[None])

    per = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    ref_norms = torch.sqrt(sum(g.reshape(B, -1).square().sum(1) for g in per.values()))
    ref_R = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    ref = {n: torch.einsum("b,b...->...", ref_R, g) for n, g in per.items()}
    errs = [(norms - ref_norms).abs().max().item(),
            (local["0.weight"] - ref["0.weight"][rows]).abs().max().item(),
            (local["0.bias"] - ref["0.bias"][rows]).abs().max().item(),
            (local["2.weight"] - ref["2.weight"][:, rows]).abs().max().item(),
            (local["2.bias"] - ref["2.bias"]).abs().max().item()]
    return {"err": max(errs), "clipped": int((ref_R < 1).sum())}


def _make_private(rank, world):
    """Disjoint shards, global q, identical replicas after training, accounting on q."""
    from torch.utils.data import DataLoader, TensorDataset

    from fxclip.accounting import epsilon_for
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    ds = TensorDataset(x, torch.arange(200) % 3)
    torch.manual_seed(rank)  # different init per rank: the optimizer syncs rank 0's
    model = nn.Linear(6, 3)
    pm, opt, loader = fxd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       DataLoader(ds, batch_size=10), noise_multiplier=1.0,
                                       max_grad_norm=1.0, generator=torch.Generator().manual_seed(5))
    seen, sizes = [], []
    for xb, yb in loader:
        _train_step(pm, opt, xb, yb, "mean", skip_empty=True)
        seen.append(yb.tolist())
        sizes.append(opt.last_batch_size)
    w = model.weight.detach().clone()
    w0 = w.clone()
    import torch.distributed as dist
    dist.broadcast(w0, src=0)
    mine = set(loader.batch_sampler.indices.tolist())
    return {"q": opt.sample_rate, "B": opt.expected_batch_size, "steps": opt.steps,
            "batches": len(loader), "replicas_differ": (w - w0).abs().max().item(),
            "shard_ok": all(set(range(200)).issuperset(mine) and all(i % world == rank for i in mine)
                            for _ in [0]),
            "eps": opt.epsilon(1e-5), "eps_ref": epsilon_for([(1.0, 0.1, opt.steps)], 1e-5),
            "mean_batch": sum(sizes) / len(sizes)}


JOBS = {
    "eager": {
        "allreduce_mean": lambda r, w: _exactness(r, w, "allreduce", "mean"),
        "allreduce_sum": lambda r, w: _exactness(r, w, "allreduce", "sum"),
        "ddp_mean": lambda r, w: _exactness(r, w, "ddp", "mean"),
        "noise_allreduce": lambda r, w: _zero_grad_noise(r, w, "allreduce"),
        "noise_ddp": lambda r, w: _zero_grad_noise(r, w, "ddp"),
        "empty_allreduce": lambda r, w: _exactness(r, w, "allreduce", "mean", sizes=(4, 0)),
        "empty_allreduce_skip": lambda r, w: _exactness(r, w, "allreduce", "mean", sizes=(4, 0),
                                                        skip_empty=True),
        "empty_ddp": lambda r, w: _exactness(r, w, "ddp", "mean", sizes=(4, 0)),
        "blocks_flat": lambda r, w: _per_block(r, w, "allreduce", "flat"),
        "blocks_per_layer": lambda r, w: _per_block(r, w, "allreduce", "per_layer", reduction="mean"),
        "tp_norms": _tensor_parallel_norms,
        "make_private": _make_private,
    },
    "fsdp": {
        "fsdp_flat": _fsdp_flat,
        "fsdp_blocks": lambda r, w: _per_block(r, w, "fsdp", "flat"),
        "noise_fsdp": lambda r, w: _zero_grad_noise(r, w, "fsdp"),
    },
    "compiled": {
        "allreduce_compiled": lambda r, w: _exactness(r, w, "allreduce", "mean", compiled=True),
        "ddp_compiled": lambda r, w: _exactness(r, w, "ddp", "mean", compiled=True, bucket_cap_mb=1,
                                                width=WIDE),
        "torch_ddp_split": _torch_ddp_splits_the_graph,
        "blocks_compiled": lambda r, w: _per_block(r, w, "allreduce", "flat", compiled=True),
        # torchtitan's layout: each privatized block compiled, then sharded with FSDP2
        "fsdp_blocks_compiled": lambda r, w: _per_block(r, w, "fsdp", "flat", compiled=True),
    },
}


def _worker(jobs, job, rank, world, port, outdir):
    """Runs every scenario of jobs[job] on this rank, writing the results after each."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective left waiting raises after this timeout instead of hanging the job
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name, fn in jobs[job].items():
        try:
            results[name] = fn(rank, world)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        with open(os.path.join(outdir, f"{job}-{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job, tmp_path_factory, timeout, world=2, script=__file__):
    """Runs `script job rank world port outdir` on `world` processes (killed after `timeout`
    seconds); returns each rank's results and the tails of their logs."""
    outdir = str(tmp_path_factory.mktemp(job))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), job, str(r), str(world),
                               str(port), outdir], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
    results = []
    for r in range(world):
        path = os.path.join(outdir, f"{job}-{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results, "\n".join(f"--- rank {r} ---\n{(log or '')[-3000:]}" for r, log in enumerate(logs))


def get(job, name):
    """Scenario `name`'s results on every rank; fails with the logs if a rank did not finish it."""
    results, log = job
    out = []
    for r in range(len(results)):
        res = results[r].get(name)
        assert res is not None, f"scenario {name} did not finish on rank {r}:\n{log}"
        assert "error" not in res, f"rank {r}: {res['error']}"
        out.append(res)
    return out


@pytest.fixture(scope="module")
def eager_job(tmp_path_factory):
    return launch("eager", tmp_path_factory, timeout=150)


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    return launch("fsdp", tmp_path_factory, timeout=150)


@pytest.fixture(scope="module")
def compiled_job(tmp_path_factory):
    return launch("compiled", tmp_path_factory, timeout=420)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["allreduce_mean", "allreduce_sum", "ddp_mean"])
def test_data_parallel_equals_single_process_on_the_concatenated_batch(eager_job, name):
    for r, res in enumerate(get(eager_job, name)):
        assert res["err"] < 1e-12 * max(1.0, res["scale"]), (name, r, res)
        assert res["norm_err"] < 1e-12, (name, r, res)
        assert res["batch"] == sum(SIZES) and res["local_batch"] == SIZES[r]


@pytest.mark.parametrize("mode", ["allreduce", "ddp"])
def test_noise_is_added_once_globally(eager_job, mode):
    r0, r1 = get(eager_job, f"noise_{mode}")
    for res in (r0, r1):
        # sigma*C/B_total; sqrt(2) times that would mean every rank added its own noise
        assert res["std"] == pytest.approx(res["expected"], rel=0.05), res
        assert abs(res["halves_corr"]) < 5 / math.sqrt(res["n"] / 2)
    assert r0["replicas_differ"] == 0 and r1["replicas_differ"] == 0  # identical replicas


@pytest.mark.parametrize("name", ["empty_allreduce", "empty_allreduce_skip", "empty_ddp"])
def test_a_rank_with_an_empty_poisson_batch_does_not_hang_the_others(eager_job, name):
    for res in get(eager_job, name):  # finished within the timeout, with the exact result
        assert res["err"] < 1e-12 * max(1.0, res["scale"]) and res["batch"] == 4


@pytest.mark.parametrize("name", ["blocks_flat", "blocks_per_layer"])
def test_per_block_group_clipping_is_exact_across_ranks(eager_job, name):
    for res in get(eager_job, name):
        assert res["err"] < 1e-12 * max(1.0, res["scale"]), res
        assert res["opt_C"] == pytest.approx(C)
        assert all(c == pytest.approx(C / math.sqrt(3)) for c in res["block_C"])


def test_tensor_parallel_all_reduce_of_partial_squared_norms(eager_job):
    for res in get(eager_job, "tp_norms"):
        assert res["err"] < 1e-12 and res["clipped"] > 0, res


def test_make_private_distributed(eager_job):
    r0, r1 = get(eager_job, "make_private")
    for res in (r0, r1):
        assert res["q"] == pytest.approx(0.1) and res["B"] == 20 and res["batches"] == 10
        assert res["steps"] == 10 and res["shard_ok"] and res["replicas_differ"] == 0
        assert res["eps"] == pytest.approx(res["eps_ref"])
        assert 8 < res["mean_batch"] < 32  # the GLOBAL batch, about q * N = 20


@pytest.mark.parametrize("name", ["fsdp_flat", "fsdp_blocks"])
def test_fsdp2_gradients_equal_the_reference(fsdp_job, name):
    for res in get(fsdp_job, name):
        assert res["err"] < 1e-12 * max(1.0, res.get("scale", 1.0)), res


def test_fsdp2_noise_is_added_once_per_coordinate(fsdp_job):
    for res in get(fsdp_job, "noise_fsdp"):
        assert res["std"] == pytest.approx(res["expected"], rel=0.05), res
        # the two shards' noise is independent although every rank seeded torch identically
        assert abs(res["halves_corr"]) < 5 / math.sqrt(res["n"] / 2), res
        assert res["replicas_differ"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["allreduce_compiled", "ddp_compiled", "blocks_compiled",
                                  "fsdp_blocks_compiled"])
def test_compiled_data_parallel_equals_the_reference(compiled_job, name):
    for res in get(compiled_job, name):
        assert res["err"] < 1e-12 * max(1.0, res["scale"]), res


@pytest.mark.slow
def test_torch_ddp_compiled_split_is_refused_not_silently_wrong(compiled_job):
    for res in get(compiled_job, "torch_ddp_split"):
        assert res["refused"], res


# single-process checks of the helpers

def test_per_block_exact_against_torch_func_single_process():
    xs, ys = _data()
    x, y = torch.cat(xs), torch.cat(ys)
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    clipping = [["0.weight"], ["0.bias"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]]
    fxd.privatize_blocks(model, ["0", "2", "4"], max_grad_norm=C, loss_reduction="sum", clipping=clipping)
    # 4 groups: 0.weight | 0.bias | 2.* | 4.*; every group gets C / 2
    assert [model[i].max_grad_norm for i in (0, 2, 4)] == pytest.approx([C / 2 * math.sqrt(2), C / 2, C / 2])
    F.cross_entropy(model(x), y, reduction="sum").backward()
    group = {"0.weight": 0, "0.bias": 1, "2.weight": 2, "2.bias": 2, "4.weight": 3, "4.bias": 3}
    want = _group_reference([group[n] for n in names], {g: C / 2 for g in range(4)})
    assert _max_err([p.grad for p in model.parameters()], want) < 1e-12
    # the plain model's state_dict keys load into the block-privatized model
    plain = _model().state_dict()
    model.load_state_dict(plain)
    assert set(model.state_dict()) == set(plain)


def test_privatize_blocks_refuses_uncovered_parameters():
    with pytest.raises(fxclip.PrivacyError, match="outside every block"):
        fxd.privatize_blocks(_model(), ["0", "2"], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="spans several blocks"):
        fxd.privatize_blocks(_model(), ["0", "2", "4"], max_grad_norm=1.0,
                             clipping=[["0.weight", "2.weight"], ["0.bias", "2.bias", "4.weight", "4.bias"]])


def test_distributed_poisson_sampler_shards_are_disjoint_and_rank_distinct():
    g = torch.Generator().manual_seed(0)
    s0 = fxd.DistributedPoissonBatchSampler(1000, 0.2, rank=0, world_size=2, generator=g)
    s1 = fxd.DistributedPoissonBatchSampler(1000, 0.2, rank=1, world_size=2, generator=g)
    b0, b1 = next(iter(s0)), next(iter(s1))
    assert not set(b0) & set(b1)
    assert all(i % 2 == 0 for i in b0) and all(i % 2 == 1 for i in b1)
    # positions within the shards are not the same draws (independent generators)
    assert {i // 2 for i in b0} != {i // 2 for i in b1}
    assert 150 < len(b0) + len(b1) < 250 and len(s0) == len(s1) == 5


if __name__ == "__main__":
    _job, _rank, _world, _port, _outdir = sys.argv[1:6]
    _worker(JOBS, _job, int(_rank), int(_world), int(_port), _outdir)
