"""The training step on real hardware: no host sync in the graphs, norms and flags written on the
device, a runtime threshold, adaptive clipping, fp16 loss scaling and padded Poisson batches."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads as _assert_grads
from helpers import mlp as _mlp  # test_step_overhead imports these two from here
from helpers import mlp_data as _data
from reference import per_sample_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxclip
from fxclip import accounting
from fxclip.passes import ops, rewrite_joint_graph
from fxclip.passes.report import rule_counters

aten = torch.ops.aten


# --- 1, 2: no host sync, no Python-only effect; norms written in-graph ---------------------------

SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default}


@pytest.mark.parametrize("compiled", [False, True])
def test_rewritten_graph_has_no_host_sync_and_only_device_side_ops(compiled):
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    x, y = _data()
    F.cross_entropy((torch.compile(pm) if compiled else pm)(x), y).backward()
    graph = pm.last_report.graph
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert not SYNC_OPS & set(targets)
    custom = {t for t in targets if str(t).startswith("fxclip.")}
    # the one custom op left writes device tensors only (the state and the norms' store)
    assert custom == {ops.RECORD_STEP}, custom


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_give_exact_gradients_and_current_norms(mode):
    model = _mlp()
    cpm = torch.compile(fxclip.privatize(model, max_grad_norm=0.1), mode=mode)
    for seed in (1, 2):  # the second step must show ITS norms (replayed graphs keep them current)
        x, y = _data(seed=seed)
        model.zero_grad()
        F.cross_entropy(cpm(x), y).backward()
        ref, norms = per_sample_reference(model, (x,), y, F.cross_entropy, 0.1)
        _assert_grads(model, ref)
        torch.testing.assert_close(cpm.per_sample_norms, norms)


# --- 3: runtime threshold ------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
def test_threshold_changes_take_effect_without_recompiling(compiled):
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    run = torch.compile(pm) if compiled else pm
    x, y = _data()
    rewrites = None
    for c in (0.1, 0.03, 5.0):
        pm.max_grad_norm = c
        model.zero_grad()
        F.cross_entropy(run(x), y).backward()
        ref, _ = per_sample_reference(model, (x,), y, F.cross_entropy, c)
        _assert_grads(model, ref)
        if rewrites is None:
            rewrites = sum(rule_counters.values())
        assert sum(rule_counters.values()) == rewrites  # the pass did not run again
    assert pm.max_grad_norm == 5.0


def test_per_group_thresholds_are_runtime_values():
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=1.0, clipping="per_layer")
    assert pm.group_max_grad_norms == {"0": 1 / math.sqrt(2), "2": 1 / math.sqrt(2)}
    x, y = _data()
    for limits in ({"0": 0.05, "2": 0.2}, {"0": 0.3}):
        pm.group_max_grad_norms = limits
        model.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        expected = {}
        for layer, c in pm.group_max_grad_norms.items():
            sub = {n: p for n, p in model.named_parameters() if n.startswith(layer + ".")}
            frozen = [p for n, p in model.named_parameters() if n not in sub]
            for p in frozen:
                p.requires_grad_(False)
            ref, _ = per_sample_reference(model, (x,), y, F.cross_entropy, c)
            for p in frozen:
                p.requires_grad_(True)
            expected.update(ref)
        _assert_grads(model, expected)
    assert pm.max_grad_norm == pytest.approx(math.hypot(0.3, 0.2))
    with pytest.raises(ValueError, match="unknown clipping groups"):
        pm.group_max_grad_norms = {"9": 1.0}


def test_noise_follows_the_runtime_threshold_and_refuses_a_smaller_explicit_one():
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=1.0,
                             expected_batch_size=5)
    pm.max_grad_norm = 0.25
    assert opt.max_grad_norm == 0.25
    fixed = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=1.0,
                               expected_batch_size=5, max_grad_norm=0.5)
    pm.max_grad_norm = 0.75  # now above the noise's C: the step must refuse
    x, y = _data()
    before = copy.deepcopy(model.state_dict())
    F.cross_entropy(pm(x), y).backward()
    with pytest.raises(fxclip.PrivacyError, match="below the module's clipping bound"):
        fixed.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- adaptive clipping -----------------------------------------------------------------------------

def test_adaptive_clipping_moves_c_toward_the_quantile_and_is_accounted():
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=0.5)
    adaptive = fxclip.AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=4.0)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm, noise_multiplier=1.0,
                             expected_batch_size=5, sample_rate=0.1, adaptive_clipping=adaptive,
                             generator=torch.Generator().manual_seed(3))
    # the gradient keeps 1/z^2 - 1/sigma_b^2 of the budget; together they spend what z alone does
    assert opt.noise_multiplier == pytest.approx((1.0 - 4.0 ** -2) ** -0.5)
    x, y = _data()
    _, norms = per_sample_reference(model, (x,), y, F.cross_entropy, 0.5)
    unclipped = int((norms <= 0.5).sum())
    F.cross_entropy(pm(x), y).backward()
    expected_noise = torch.Generator().manual_seed(3)
    # step() draws the gradient noise first, then the count's
    for p in model.parameters():
        torch.randn(p.shape, generator=expected_noise, dtype=p.dtype)
    count_noise = 4.0 * float(torch.randn((), generator=expected_noise))
    opt.step()
    fraction = (unclipped + count_noise) / 5
    assert pm.max_grad_norm == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-6)
    assert opt.epsilon(1e-5) == pytest.approx(accounting.epsilon_for([(1.0, 0.1, 1)], 1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="must exceed the noise multiplier"):
        fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm, noise_multiplier=5.0,
                           expected_batch_size=5, adaptive_clipping=fxclip.AdaptiveClipping(
                               count_noise_multiplier=4.0))


def test_adaptive_clipping_converges_near_the_median_norm():
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=20.0)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), pm, noise_multiplier=0.0,
                             expected_batch_size=64, adaptive_clipping=fxclip.AdaptiveClipping(
                                 learning_rate=0.5, count_noise_multiplier=1e-6))
    x, y = _data(64)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        norms = pm.per_sample_norms
        opt.step()
    assert abs(float((norms <= pm.max_grad_norm).double().mean()) - 0.5) < 0.1


# --- 4: fp16 loss scaling -----------------------------------------------------------------------

def _scaled_step(pm, model, opt, scaler, x, y):
    opt.zero_grad()
    scaler.scale(F.cross_entropy(pm(x), y)).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("compiled", [False, True])
def test_grad_scaler_connected_gives_the_unscaled_clipped_step(compiled):
    model = _mlp()
    start = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pm = fxclip.privatize(model, max_grad_norm=0.1, grad_scaler=scaler)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=0.0,
                             expected_batch_size=5)
    x, y = _data()
    run = torch.compile(pm) if compiled else pm
    opt.zero_grad()
    scaler.scale(F.cross_entropy(run(x), y)).backward()
    scaler.unscale_(opt)  # the usual place to log or clip: gradients are those of the unscaled step
    ref, norms = per_sample_reference(start, (x,), y, F.cross_entropy, 0.1)
    # a DPOptimizer owns the module: the clipped sum over its expected batch size (5, here B)
    _assert_grads(model, ref)
    torch.testing.assert_close(pm.per_sample_norms, norms)
    scaler.step(opt)
    scaler.update()
    for (n, p), p0 in zip(model.named_parameters(), start.parameters()):
        torch.testing.assert_close(p, p0 - ref[n], rtol=1e-9, atol=1e-12, msg=n)
    # a second step without unscale_: DPOptimizer unscales (scale read on the device, no recompile)
    _scaled_step(run, model, opt, scaler, x, y)
    assert opt.steps == 2


def test_scaled_backward_without_a_connected_scaler_is_refused_at_the_step():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=0.0,
                             expected_batch_size=5)
    x, y = _data()
    with pytest.raises(fxclip.PrivacyError, match="GradScaler that fxclip was not told about.*grad_scaler=scaler"):
        _scaled_step(pm, model, opt, scaler, x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # and a connected scaler bypassed by optimizer.step() is refused too
    pm2 = fxclip.privatize(model, max_grad_norm=0.1, grad_scaler=scaler)
    opt2 = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm2, noise_multiplier=0.0,
                              expected_batch_size=5)
    scaler.scale(F.cross_entropy(pm2(x), y)).backward()
    with pytest.raises(fxclip.PrivacyError, match=r"call scaler.step\(optimizer\)"):
        opt2.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overflow_skips_the_step_lowers_the_scale_and_is_still_accounted():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pm = fxclip.privatize(model, max_grad_norm=0.1, grad_scaler=scaler)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=1.0,
                             expected_batch_size=5, sample_rate=0.1)
    x, y = _data()
    x[2] = float("inf")  # one sample overflows
    _scaled_step(pm, model, opt, scaler, x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 512.0
    assert opt.steps == 1 and opt.skipped_steps == 1 and opt.accountant.steps == 1


def test_bf16_autocast_accumulates_norms_in_float32():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(x)
    F.cross_entropy(out.float(), y).backward()
    assert pm.per_sample_norms.dtype == torch.float32
    clip_nodes = [n for n in pm.last_report.graph.nodes if n.meta.get("fxclip", {}).get("role") == "clip"
                  and isinstance(n.meta.get("val"), torch.Tensor)]
    assert clip_nodes and all(n.meta["val"].dtype in (torch.float32, torch.float64, torch.bool, torch.int64)
                              for n in clip_nodes)


# --- 5: device-correct rewrite ------------------------------------------------------------------

class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.pos = nn.Parameter(torch.randn(6, 8) * 0.1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 13)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h)


_ZOO = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), lambda: torch.randn(4, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4, 2)), lambda: torch.randn(4, 3, 8, 8)),
    "tokens": (_Tokens, lambda: torch.randint(0, 13, (4, 6))),
    "bilinear": (lambda: nn.Bilinear(5, 5, 3), lambda: (torch.randn(4, 5), torch.randn(4, 5))),
}


@pytest.mark.parametrize("name", sorted(_ZOO))
def test_rewrite_creates_no_cpu_tensor_in_a_device_graph(name):
    """Trace the joint graph with fake tensors on another device and run the pass: every node the
    pass added lives on the graph's device. (The "meta" device stands in for CUDA: autograd on
    fake CUDA tensors aborts in a CPU build of torch, which has no CUDA device guard.)"""
    from fxclip.passes import _torch

    build, make_x = _ZOO[name]
    torch.manual_seed(0)
    model = build()
    x = make_x()
    graphs = _torch.joint_graphs_on_fake_device(fxclip.privatize(model, max_grad_norm=1.0),
                                                x if isinstance(x, tuple) else (x,), "meta",
                                                rewrite_joint_graph)
    assert graphs, "no joint graph was traced"
    for plain, rewritten in graphs:
        assert not any(_on_cpu(n) for n in plain.nodes)  # the plain graph is all on the device
        added = [n for n in rewritten.nodes if "fxclip" in n.meta]
        assert added, "the pass added nothing"
        on_cpu = [n.format_node() for n in rewritten.nodes if _on_cpu(n)]
        assert not on_cpu, on_cpu


def _on_cpu(node) -> bool:
    vals = node.meta.get("val")
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    return any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in vals)


# --- 6: padded Poisson batches ------------------------------------------------------------------

def test_padding_rows_get_weight_zero_and_the_update_equals_the_unpadded_one():
    model = _mlp()
    x, y = _data(7)
    pm = fxclip.privatize(model, max_grad_norm=0.1, loss_reduction="sum")
    pm.set_valid_rows(7)
    xp = torch.cat([x, torch.zeros(1, 6, dtype=x.dtype)])
    yp = torch.cat([y, torch.zeros(1, dtype=y.dtype)])
    F.cross_entropy(pm(xp), yp, reduction="sum").backward()
    ref, norms = per_sample_reference(model, (x,), y, F.cross_entropy, 0.1, "sum")
    _assert_grads(model, ref)
    torch.testing.assert_close(pm.per_sample_norms, norms)  # padding rows are not in the norms


@pytest.mark.parametrize("compiled", [False, True])
def test_make_private_pad_to_multiple_gives_the_unpadded_training(compiled):
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    runs = {}
    for pad in (None, 8):
        model = _mlp()
        pm, opt, loader = fxclip.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=6),
            noise_multiplier=0.0, max_grad_norm=0.1, pad_to_multiple=pad,
            generator=torch.Generator().manual_seed(7))
        run = torch.compile(pm) if compiled else pm
        sizes = []
        for xb, yb in loader:
            sizes.append(xb.shape[0])
            opt.zero_grad()
            F.cross_entropy(run(xb), yb).backward()
            opt.step()
        runs[pad] = (model, sizes, opt.accountant.steps)
    (plain, plain_sizes, steps), (padded, padded_sizes, padded_steps) = runs[None], runs[8]
    assert all(s % 8 == 0 and s > 0 for s in padded_sizes)
    assert any(s != p for s, p in zip(plain_sizes, padded_sizes))  # padding did happen
    assert steps == padded_steps
    for (n, p), q in zip(plain.named_parameters(), padded.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=n)
    assert math.isinf(pm.read_state()["valid_rows"])  # reset after the loop: later batches are all real


def test_pad_to_multiple_needs_the_privatized_module():
    ds = TensorDataset(torch.randn(10, 6))
    with pytest.raises(ValueError, match="privatized_module=pm"):
        fxclip.PoissonDataLoader(ds, 0.5, pad_to_multiple=4)
