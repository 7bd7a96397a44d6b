"""fxclip.make_private on several processes: every option of the one-process API, on 2 and 4 gloo
ranks (CPU), each step checked against ONE process training on the union of the ranks' batches
(noise 0, float64), and refusals that make every rank raise at the same step, none hang.

Each job runs this file as a script on `world` processes (tests/test_distributed.py's launcher,
bounded by a timeout; the process group's own timeout turns a stuck collective into an error).
Rank 0 computes the one-process reference; every rank reports its parameters' distance to rank
0's, so "every rank" is checked, not only rank 0.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from test_distributed import _worker, get, launch  # noqa: E402

import fxclip  # noqa: E402
from fxclip import distributed as fxd  # noqa: E402
from fxclip.sampling import micro_batches  # noqa: E402

C = 0.3
LR = 0.5
N = 48            # dataset size
PER_RANK = 3      # the loader's batch_size: expected Poisson batch per rank
SIZES = {2: (5, 3), 4: (5, 3, 0, 4)}  # the fixed batches' sizes per rank: unequal, one empty
USERS = [i % 13 for i in range(N)]  # 13 users, each with rows spread through the dataset
STEPS = 3  # a run, as a training loop: each step's batches (and each rank's size) differ


def _step_sizes(world, step):
    sizes = SIZES[world]
    k = step % len(sizes)
    return sizes[k:] + sizes[:k]


def per_sample_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def contrastive(out, y):  # mixes the samples of the batch: refused at trace time
    return -F.log_softmax(out @ out.T, 1).diagonal()


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).double()


def _dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (N,), generator=g))


def _batches(world, sizes=None, step=0):
    """Fixed batches of each rank (the same on every rank: the union is known everywhere); step k
    gets fresh data and the sizes rotated by k among the ranks."""
    g = torch.Generator().manual_seed(7 + step)
    sizes = sizes or _step_sizes(world, step)
    xs = [torch.randn(b, 6, generator=g, dtype=torch.float64) * 3 for b in sizes]
    return xs, [torch.randint(0, 3, (b,), generator=g) for b in sizes]


def _private(world, distributed=True, noise=0.0, **options):
    """make_private on the test model; one process gets the global expected batch."""
    model = _model()
    per_rank = PER_RANK if distributed else PER_RANK * world
    options.setdefault("loss_fn", per_sample_ce)
    pm, opt, loader = fxclip.make_private(
        model, torch.optim.SGD(model.parameters(), lr=LR), DataLoader(_dataset(), batch_size=per_rank),
        noise_multiplier=noise, max_grad_norm=C, generator=torch.Generator().manual_seed(5),
        distributed=distributed, **options)
    return model, pm, opt, loader


def _step(module, opt, x, y, *, micro=None, scaler=None, reduce=torch.mean):
    """One logical step: backward on each micro-batch (none for an empty batch split into
    micro-batches), then one optimizer step (through the scaler if any)."""
    opt.zero_grad()
    for xb, yb in micro_batches((x, y), micro) if micro else [(x, y)]:
        loss = reduce(module(xb, target=yb))
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _differs_from_rank0(t) -> float:
    t0 = t.clone()
    dist.broadcast(t0, src=0)
    return (t - t0).abs().max().item()


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=1024.0)


# --------------------------------------------------------------------------------------------
# scenarios (run on every rank); each returns a dict of numbers
# --------------------------------------------------------------------------------------------

def _union(rank, world, *, micro=None, scaler=False, compiled=False, **options):
    """STEPS steps on W ranks == the same steps of one process on the union of the ranks'
    batches, compared after every step (batch sizes change from step to step)."""
    sc = _scaler() if scaler else None
    model, module, opt, _ = _private(world, grad_scaler=sc, **options)
    before = _flat(model)
    run = torch.compile(module) if compiled else module
    if rank == 0:
        options.pop("ddp", None)
        ref_sc = _scaler() if scaler else None
        ref, ref_pm, ref_opt, _ = _private(world, distributed=False, grad_scaler=ref_sc, **options)
    out = {"err": 0.0, "clipped": 0, "replicas": 0.0}
    for step in range(STEPS):
        xs, ys = _batches(world, step=step)
        _step(run, opt, xs[rank], ys[rank], micro=micro, scaler=sc)
        out["replicas"] = max(out["replicas"], _differs_from_rank0(_flat(model)))
        if rank == 0:
            _step(ref_pm, ref_opt, torch.cat(xs), torch.cat(ys), micro=micro, scaler=ref_sc)
            out["err"] = max(out["err"], (_flat(model) - _flat(ref)).abs().max().item())
            out["clipped"] += int((ref_pm.per_sample_norms > C).sum())
    out.update({"batch": opt.last_batch_size, "local": opt.last_local_batch_size,
                "sizes": _step_sizes(world, STEPS - 1), "moved": (_flat(model) - before).abs().max().item(),
                "C": module.max_grad_norm if hasattr(module, "max_grad_norm") else None,
                "opt": type(opt).__name__})
    if rank == 0:
        out["C_ref"] = ref_pm.max_grad_norm
    return out


def _union_compiled_ddp(rank, world):
    """fxclip's DDP around torch.compile(pm): built by hand (make_private(ddp=True) wraps the
    eager module), with the same optimizer make_private would build."""
    xs, ys = _batches(world)
    model, pm, opt, _ = _private(world)
    ddp = fxd.DistributedDataParallel(torch.compile(pm))
    opt = fxd.DistributedDPOptimizer(opt.original_optimizer, ddp, noise_multiplier=0.0,
                                     expected_batch_size=PER_RANK * world)
    _step(ddp, opt, xs[rank], ys[rank])
    out = {"replicas": _differs_from_rank0(_flat(model)), "mode": opt.mode}
    if rank == 0:
        ref, ref_pm, ref_opt, _ = _private(world, distributed=False)
        _step(ref_pm, ref_opt, torch.cat(xs), torch.cat(ys))
        out["err"] = (_flat(model) - _flat(ref)).abs().max().item()
    return out


def _padded_loader(rank, world):
    """pad_to_multiple: each rank's first Poisson batch, padded, against one process on the
    union of the ranks' real rows."""
    model, pm, opt, loader = _private(world, pad_to_multiple=4)
    batches = iter(loader)
    x, y = next(batches)
    real = int(pm.read_state()["valid_rows"])
    gathered = [None] * world
    dist.all_gather_object(gathered, (x[:real], y[:real]))
    _step(pm, opt, x, y)
    out = {"rows": x.shape[0], "real": real, "replicas": _differs_from_rank0(_flat(model)),
           "indices": [int(i) for i in loader.batch_sampler.indices[:5]]}
    batches.close()
    if rank == 0:
        ref, ref_pm, ref_opt, _ = _private(world, distributed=False)
        _step(ref_pm, ref_opt, torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))
        out["err"] = (_flat(model) - _flat(ref)).abs().max().item()
        out["union"] = sum(g[0].shape[0] for g in gathered)
    return out


def _adaptive_accounted_once(rank, world):
    """Adaptive clipping with noise: C moves identically on every rank (one count noise, drawn
    by rank 0), and the count is accounted once: epsilon as one process on the global q."""
    from fxclip.accounting import epsilon_for
    xs, ys = _batches(world)
    adaptive = fxclip.AdaptiveClipping(count_noise_multiplier=4.0)
    model, pm, opt, _ = _private(world, noise=1.0, adaptive_clipping=adaptive)
    _step(pm, opt, xs[rank], ys[rank])
    q = PER_RANK * world / N
    return {"C": pm.max_grad_norm, "C_replicas": _differs_from_rank0(torch.tensor([pm.max_grad_norm])),
            "eps": opt.epsilon(1e-5), "eps_ref": epsilon_for([(1.0, q, 1)], 1e-5),
            "replicas": _differs_from_rank0(_flat(model))}


def _fault(rank, world, kind):
    """A refusal on ONE rank (the last) makes every rank raise PrivacyError at the same step,
    no parameter changed; then a good step still runs on all (the collectives stay matched)."""
    sizes = tuple(b or 2 for b in SIZES[world])  # every rank traces a non-empty batch
    xs, ys = _batches(world, sizes)
    bad = rank == world - 1
    sc = _scaler() if kind == "overflow" else None
    model, pm, opt, _ = _private(world, grad_scaler=sc,
                                 loss_fn=contrastive if kind == "mixing" else per_sample_ce)
    before = _flat(model)
    x, y = xs[rank], ys[rank]
    if kind in ("nonfinite", "overflow") and bad:
        x = x.clone()
        x[1] = float("inf")
    reduce = torch.sum if kind == "reduction" and bad else torch.mean  # mean was declared
    out = {"refused": False}
    try:
        _step(pm, opt, x, y, scaler=sc, reduce=reduce)
    except fxclip.PrivacyError as e:
        out.update(refused=True, message=str(e)[:80])
    out["unchanged"] = bool(torch.equal(_flat(model), before))
    out["steps"] = opt.steps
    if sc is not None:
        out["scale"] = sc.get_scale()
        out["skipped"] = opt.skipped_steps
    if kind != "mixing":  # the next step trains, in step on every rank
        _step(pm, opt, xs[rank], ys[rank], scaler=sc)
        out["after"] = _differs_from_rank0(_flat(model))
        out["moved"] = not torch.equal(_flat(model), before)
    return out


def _user_level(rank, world):
    """privacy_unit="user": each rank samples its share of the users (disjoint), STEPS steps
    equal one process on the union of the ranks' batches with their user ids."""
    model, pm, opt, loader = _private(world, privacy_unit="user", user_ids=USERS)
    if rank == 0:
        ref, ref_pm, ref_opt, _ = _private(world, distributed=False, privacy_unit="user", user_ids=USERS)
    out = {"err": 0.0, "replicas": 0.0, "shared_users": 0, "users": 0}
    batches = (batch for _ in range(STEPS) for batch in loader)  # epochs of 2 (4 ranks: 1) steps
    for _ in range(STEPS):
        x, y = next(batches)
        gathered = [None] * world
        dist.all_gather_object(gathered, (x, y, pm._loader_units.clone()))
        ids = [set(g[2].tolist()) for g in gathered]
        out["shared_users"] += sum(len(a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
        out["users"] += len(set().union(*ids))
        _step(pm, opt, x, y)
        out["replicas"] = max(out["replicas"], _differs_from_rank0(_flat(model)))
        if rank == 0:
            ref_opt.zero_grad()
            xs, ys, us = (torch.cat([g[k] for g in gathered]) for k in range(3))
            ref_pm(xs, target=ys, privacy_unit=us).mean().backward()
            ref_opt.step()
            out["err"] = max(out["err"], (_flat(model) - _flat(ref)).abs().max().item())
    batches.close()
    out.update(q=opt.sample_rate, B=opt.expected_batch_size, units=opt.last_units)
    return out


def _detects_the_process_group(rank, world):
    """fxclip.make_private with no distributed= returns the distributed optimizer and a sharded
    loader; fxclip.distributed.make_private is the same function."""
    model = _model()
    pm, opt, loader = fxclip.make_private(model, torch.optim.SGD(model.parameters(), lr=LR),
                                          DataLoader(_dataset(), batch_size=PER_RANK),
                                          noise_multiplier=1.0, max_grad_norm=C, loss_fn=per_sample_ce)
    shard = loader.batch_sampler.indices.tolist()
    shards = [None] * world
    dist.all_gather_object(shards, shard)
    return {"opt": type(opt).__name__, "mode": opt.mode, "q": opt.sample_rate, "B": opt.expected_batch_size,
            "disjoint": sum(map(len, shards)) == N and len(set().union(*map(set, shards))) == N,
            "alias": fxd.make_private.__doc__ is not None and "distributed=True" in fxd.make_private.__doc__}


SCENARIOS = {
    "plain": lambda r, w: _union(r, w),
    "ddp": lambda r, w: _union(r, w, ddp=True),
    "per_layer": lambda r, w: _union(r, w, clipping="per_layer"),
    "accumulation": lambda r, w: _union(r, w, micro=2),
    "grad_scaler": lambda r, w: _union(r, w, scaler=True),
    "adaptive": lambda r, w: _union(r, w, adaptive_clipping=fxclip.AdaptiveClipping(
        learning_rate=0.5, count_noise_multiplier=0.0)),
    "adaptive_accounted": _adaptive_accounted_once,
    "pad": _padded_loader,
    "mixing": lambda r, w: _fault(r, w, "mixing"),
    "reduction": lambda r, w: _fault(r, w, "reduction"),
    "nonfinite": lambda r, w: _fault(r, w, "nonfinite"),
    "overflow": lambda r, w: _fault(r, w, "overflow"),
    "detects": _detects_the_process_group,
    "users": _user_level,
}
FAST4 = ("plain", "ddp", "accumulation", "grad_scaler", "adaptive", "pad", "reduction", "nonfinite")
JOBS = {
    "eager": SCENARIOS,
    "eager4": {k: SCENARIOS[k] for k in FAST4},
    "rest4": {k: v for k, v in SCENARIOS.items() if k not in FAST4},
    "compiled": {"compiled": lambda r, w: _union(r, w, compiled=True),
                 "compiled_ddp": _union_compiled_ddp},
}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch("eager", tmp_path_factory, timeout=300, world=2, script=__file__)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch("eager4", tmp_path_factory, timeout=420, world=4, script=__file__)


@pytest.fixture(scope="module")
def four_rest(tmp_path_factory):
    return launch("rest4", tmp_path_factory, timeout=420, world=4, script=__file__)


@pytest.fixture(scope="module")
def compiled_two(tmp_path_factory):
    return launch("compiled", tmp_path_factory, timeout=600, world=2, script=__file__)


def _job(request, world, name):
    if world == 2:
        return request.getfixturevalue("two")
    return request.getfixturevalue("four" if name in FAST4 else "four_rest")


def _cases(*names):
    """(world, name) for 2 and 4 ranks; 4 ranks is in the default run for FAST4, else slow."""
    return [pytest.param(w, n, id=f"{n}-{w}", marks=() if w == 2 or n in FAST4 else pytest.mark.slow)
            for n in names for w in (2, 4)]


@pytest.mark.parametrize("world,name", _cases("plain", "ddp", "per_layer", "accumulation", "grad_scaler",
                                                 "adaptive"))
def test_steps_equal_one_process_on_the_union(request, world, name):
    results = get(_job(request, world, name), name)
    r0 = results[0]
    assert r0["err"] < 1e-12, r0  # after every step
    assert r0["moved"] > 1e-3 and r0["clipped"] > 0, r0  # real steps that clipped
    for r, res in enumerate(results):
        assert res["replicas"] == 0, (r, res)
        assert res["batch"] == sum(SIZES[world]) and res["local"] == res["sizes"][r], res
        assert res["opt"] == "DistributedDPOptimizer"
    if name == "adaptive":  # the unclipped count summed across ranks moved C as one process's
        assert all(res["C"] == pytest.approx(r0["C_ref"], rel=1e-12) for res in results)
        assert r0["C_ref"] != C


@pytest.mark.parametrize("world,name", _cases("pad"))
def test_padded_batches_equal_one_process_on_the_union_of_real_rows(request, world, name):
    results = get(_job(request, world, name), name)
    assert results[0]["err"] < 1e-12 and results[0]["union"] > 0, results[0]
    for res in results:
        assert res["rows"] % 4 == 0 and res["rows"] >= res["real"] and res["replicas"] == 0, res
    shards = [set(res["indices"]) for res in results]
    assert all(not a & b for i, a in enumerate(shards) for b in shards[i + 1:])


@pytest.mark.parametrize("world,name", _cases("adaptive_accounted"))
def test_adaptive_clipping_count_is_noised_once_and_accounted_once(request, world, name):
    results = get(_job(request, world, name), name)
    for res in results:
        assert res["C_replicas"] == 0 and res["replicas"] == 0, res
        assert res["eps"] == pytest.approx(res["eps_ref"], rel=1e-9), res


@pytest.mark.parametrize("world,name", _cases("mixing"))
def test_a_mixing_loss_is_refused_on_every_rank_and_none_trains(request, world, name):
    for res in get(_job(request, world, name), name):
        assert res["refused"] and res["unchanged"] and res["steps"] == 0, res


@pytest.mark.parametrize("world,name", _cases("reduction", "nonfinite"))
def test_a_refusal_on_one_rank_refuses_the_step_on_every_rank(request, world, name):
    """The last rank's loss reduction is wrong (or one of its samples is inf): the step's
    state read is an all-reduce, so every rank raises, no parameter changes anywhere, and the
    next step runs on all ranks (the job finished within its timeout: no hang)."""
    for r, res in enumerate(get(_job(request, world, name), name)):
        assert res["refused"] and res["unchanged"], (r, res)
        assert res["moved"] and res["after"] == 0, (r, res)


@pytest.mark.parametrize("world,name", _cases("overflow"))
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(request, world, name):
    results = get(_job(request, world, name), name)
    for res in results:
        assert not res["refused"] and res["unchanged"] and res["skipped"] == 1, res
        assert res["steps"] == 1 and res["scale"] == 512.0, res  # accounted; scale lowered everywhere
        assert res["moved"] and res["after"] == 0, res


@pytest.mark.parametrize("world,name", _cases("detects"))
def test_make_private_detects_the_process_group(request, world, name):
    for res in get(_job(request, world, name), name):
        assert res["opt"] == "DistributedDPOptimizer" and res["mode"] == "allreduce", res
        assert res["q"] == pytest.approx(PER_RANK * world / N) and res["B"] == PER_RANK * world
        assert res["disjoint"] and res["alias"], res


@pytest.mark.parametrize("world,name", _cases("users"))
def test_user_level_steps_equal_one_process_on_the_union(request, world, name):
    """Each rank samples its own users (no user on two ranks); the union of the ranks' batches,
    with their user ids, trained in one process gives the same parameters after every step."""
    results = get(_job(request, world, name), name)
    assert results[0]["err"] < 1e-12 and results[0]["users"] > 0, results[0]
    for res in results:
        assert res["replicas"] == 0 and res["shared_users"] == 0, res
        assert res["B"] == PER_RANK * world and res["q"] == pytest.approx(PER_RANK * world / 13), res


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compiled", "compiled_ddp"])
def test_compiled_step_equals_one_process_on_the_union(compiled_two, name):
    results = get(compiled_two, name)
    assert results[0]["err"] < 1e-12, results[0]
    assert all(res["replicas"] == 0 for res in results)


def test_one_process_make_private_is_unchanged_without_a_process_group():
    _, _, opt, loader = _private(1, distributed=None)
    assert type(opt) is fxclip.DPOptimizer and loader.batch_sampler.world_size == 1
    assert opt.expected_batch_size == PER_RANK and opt.sample_rate == pytest.approx(PER_RANK / N)


if __name__ == "__main__":
    _job_name, _rank, _world, _port, _outdir = sys.argv[1:6]
    _worker(JOBS, _job_name, int(_rank), int(_world), int(_port), _outdir)
