"""DPOptimizer: noise scale and freshness, exact accumulation, empty steps, checkpoints, errors,
parameters unfrozen during a run."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import MaskedBag, masked_rows, per_row_loss, sq_loss
from reference import per_sample_reference
from torch import nn

import fxclip
from fxclip.optim import DPOptimizer

LR, SIGMA, C = 0.5, 1.3, 0.7


def _zero_grad_setup(loss_reduction, **kw):
    """A 20000-weight linear model fed zeros: the loss gradient is exactly zero, so every
    change of the weights is noise."""
    model = nn.Linear(2000, 10, bias=False)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=loss_reduction)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), pm, noise_multiplier=SIGMA,
                      expected_batch_size=10, sample_rate=0.01, **kw)
    return model, pm, opt


def _noise_updates(model, pm, opt, steps, batch=7):
    out = []
    for _ in range(steps):
        opt.zero_grad()
        y = pm(torch.zeros(batch, 2000))  # actual batch 7 != expected 10: must divide by 10
        (y.mean() if pm.loss_reduction == "mean" else y.sum()).backward()
        assert pm.per_sample_norms.abs().max() == 0  # the gradient really is zero
        before = model.weight.detach().clone()
        opt.step()
        out.append((model.weight.detach() - before).flatten())
    return out


@pytest.mark.parametrize("loss_reduction,rng", [("mean", "seeded"), ("sum", "seeded"), ("mean", "secure")])
def test_noise_std_is_lr_sigma_C_over_B_and_fresh(loss_reduction, rng):
    kw = {"generator": torch.Generator().manual_seed(3)} if rng == "seeded" else {"secure_rng": True}
    model, pm, opt = _zero_grad_setup(loss_reduction, **kw)
    updates = _noise_updates(model, pm, opt, steps=3)
    expected = LR * SIGMA * C / (10 if loss_reduction == "mean" else 1)
    n = updates[0].numel()
    for u in updates:
        assert u.std().item() == pytest.approx(expected, rel=0.03)
        assert abs(u.mean().item()) < 4 * expected / math.sqrt(n)
    for a, b in zip(updates, updates[1:]):  # fresh noise every step: uncorrelated
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / math.sqrt(n)
    assert opt.steps == 3 and opt.last_batch_size == 7


def test_seeded_noise_is_reproducible():
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)  # same init
        model, pm, opt = _zero_grad_setup("mean", generator=torch.Generator().manual_seed(seed))
        runs.append(_noise_updates(model, pm, opt, steps=1)[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_accumulated_micro_batches_equal_one_big_batch(loss_reduction):
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction=loss_reduction)  # noqa: E731
    results = []
    for chunks in ([12], [3, 5, 4]):  # unequal micro-batches: each backward divides by its own B
        model = _mlp()
        pm = fxclip.privatize(model, max_grad_norm=0.5, loss_reduction=loss_reduction)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), pm, noise_multiplier=0.0,
                          expected_batch_size=10, sample_rate=0.1)
        opt.zero_grad()
        for xb, yb in zip(x.split(chunks), y.split(chunks)):
            loss_fn(pm(xb), yb).backward()
        assert opt.batch_size == 12 and opt.micro_batches == len(chunks)
        opt.step()
        assert opt.steps == 1 and opt.accountant.steps == 1  # one logical step
        results.append(dict(model.named_parameters()))

    # the DP-SGD update: lr * (sum_i R_i grad_i) / expected batch size (10, not 12) for "mean"
    model = _mlp()
    expected, _ = per_sample_reference(model, (x,), y, lambda o, t: F.cross_entropy(o, t), 0.5, "sum")
    scale = 1 / 10 if loss_reduction == "mean" else 1.0
    for name, p in model.named_parameters():
        want = p.detach() - LR * scale * expected[name]
        torch.testing.assert_close(results[0][name].detach(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1][name].detach(), want, rtol=1e-5, atol=1e-6)


def test_step_without_samples_still_adds_noise_and_counts():
    model, pm, opt = _zero_grad_setup("mean", generator=torch.Generator().manual_seed(0))
    opt.zero_grad()  # an empty Poisson batch: no backward at all
    before = model.weight.detach().clone()
    opt.step()
    moved = (model.weight.detach() - before).flatten()
    assert moved.std().item() == pytest.approx(LR * SIGMA * C / 10, rel=0.03)
    assert opt.steps == 1 and opt.last_batch_size == 0 and opt.epsilon(1e-5) > 0


def test_empty_batch_through_privatized_module():
    model, pm, opt = _zero_grad_setup("mean", generator=torch.Generator().manual_seed(0))
    _noise_updates(model, pm, opt, steps=1, batch=4)
    opt.zero_grad()
    pm(torch.zeros(0, 2000)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert opt.last_batch_size == 0 and opt.steps == 2
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)


def _train(model, pm, opt, data, steps):
    for x, y in data[:steps]:
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        opt.step()


def test_checkpoint_resume_continues_training_and_epsilon():
    torch.manual_seed(2)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]

    def fresh(gen):
        model = _mlp()
        pm = fxclip.privatize(model, max_grad_norm=1.0)
        opt = DPOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), pm, noise_multiplier=1.1,
                          expected_batch_size=8, sample_rate=0.05, generator=gen)
        return model, pm, opt

    straight = fresh(torch.Generator().manual_seed(7))
    _train(*straight, data, 5)

    gen = torch.Generator().manual_seed(7)
    first = fresh(gen)
    _train(*first, data, 3)
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = fresh(torch.Generator().manual_seed(123))
    resumed[2].generator.set_state(gen.get_state())  # same noise stream, to compare exactly
    resumed[0].load_state_dict(ckpt["model"])
    resumed[2].load_state_dict(ckpt["opt"])
    assert resumed[2].steps == 3 and len(resumed[2].original_optimizer.state) > 0  # Adam moments back
    _train(*resumed, data[3:], 2)

    assert resumed[2].steps == straight[2].steps == 5
    assert resumed[2].epsilon(1e-5) == straight[2].epsilon(1e-5) > 0
    for a, b in zip(resumed[0].parameters(), straight[0].parameters()):
        torch.testing.assert_close(a, b)

    with pytest.raises(ValueError, match="accountant"):
        resumed[2].load_state_dict(ckpt["opt"]["optimizer"])  # a plain optimizer checkpoint


def test_works_with_lr_scheduler():
    model, pm, opt = _zero_grad_setup("mean")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.1)
    assert opt.original_optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.1)


def test_bad_input_is_refused():
    model = _mlp()
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    ok = dict(noise_multiplier=1.0, expected_batch_size=8)
    with pytest.raises(TypeError, match="fxclip.privatize"):
        DPOptimizer(sgd, model, **ok)
    with pytest.raises(ValueError, match="sensitivity"):
        DPOptimizer(sgd, pm, max_grad_norm=0.5, **ok)
    with pytest.raises(ValueError, match="expected_batch_size"):
        DPOptimizer(sgd, pm, noise_multiplier=1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPOptimizer(sgd, pm, noise_multiplier=-1.0, expected_batch_size=8)
    with pytest.raises(ValueError, match="not both"):
        DPOptimizer(sgd, pm, generator=torch.Generator(), secure_rng=True, **ok)
    stray = torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="unclipped"):
        DPOptimizer(stray, pm, **ok)
    partial = torch.optim.SGD(list(model.parameters())[:1], lr=0.1)  # a trainable one left out
    with pytest.raises(fxclip.PrivacyError, match="not in the optimizer"):
        DPOptimizer(partial, pm, **ok)
    with pytest.raises(ValueError, match="sample_rate"):
        DPOptimizer(sgd, pm, **ok).epsilon(1e-5)


@pytest.mark.slow
def test_compiled_module_gives_the_eager_update():
    # Under torch.compile the clipped gradients come out of Inductor's backward: the per-backward
    # rescale must still see that backward's batch size (micro-batches of 8 and 5, "mean").
    x, y = torch.randn(13, 6), torch.randint(0, 3, (13,))
    results = []
    for compiled in (False, True):
        model = _mlp()
        pm = fxclip.privatize(model, max_grad_norm=0.5)
        run = torch.compile(pm) if compiled else pm
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=LR), run, noise_multiplier=0.0,
                          expected_batch_size=10)
        opt.zero_grad()
        for xb, yb in zip(x.split([8, 5]), y.split([8, 5])):
            F.cross_entropy(run(xb), yb).backward()
        assert opt.batch_size == 13 and opt.micro_batches == 2
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_layer_unfrozen_during_the_run_is_noised_from_then_on(compiled):
    """Gradual unfreezing, as fine-tuning runs do: the embedding is frozen when the optimizer is
    built and unfrozen after two steps. Token ids with an attention mask as keywords, batches of
    changing size (an empty one among them); at every step the float64 update of
    every parameter is the oracle's clipped sum plus sigma C z / B, z the stream's next values
    for the parameters trainable at that step (the unfrozen layer got no noise before)."""
    torch.manual_seed(0)
    model = MaskedBag().double()
    oracle = copy.deepcopy(model)
    model.emb.weight.requires_grad_(False)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="mean", loss_fn=per_row_loss)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), pm, noise_multiplier=SIGMA,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(5))
    stream = torch.Generator().manual_seed(5)
    run = torch.compile(pm) if compiled else pm
    rows, sizes = masked_rows(), (4, 3, 5, 0, 2, 6)
    for step, size in enumerate(sizes):
        if step == 2:
            model.emb.weight.requires_grad_(True)
        start = sum(sizes[:step])
        tokens, mask, y = rows[start:start + size]
        oracle.load_state_dict(model.state_dict())
        for p, q in zip(model.parameters(), oracle.parameters()):
            q.requires_grad_(p.requires_grad)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        if size:
            run(tokens, attention_mask=mask, target=y).mean().backward()
        opt.step()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        z = {n: torch.randn(p.shape, dtype=p.dtype, generator=stream)
             for n, p in model.named_parameters() if n in trainable}
        clipped = (per_sample_reference(oracle, (tokens, mask), y, sq_loss, C, loss_reduction="sum")[0]
                   if size else {n: 0.0 for n in trainable})
        for n, p in model.named_parameters():
            if n not in trainable:
                assert torch.equal(p.detach(), before[n]), n
                continue
            want = (clipped[n] + SIGMA * C * z[n]) / 4
            torch.testing.assert_close(before[n] - p.detach(), want, rtol=1e-9, atol=1e-12, msg=(step, n))
    assert model.emb.weight.requires_grad and opt.steps == len(sizes)


def test_an_optimizer_parameter_outside_the_module_that_becomes_trainable_is_refused():
    model = nn.Linear(3, 2)
    extra = nn.Parameter(torch.zeros(4), requires_grad=False)  # frozen: accepted at construction
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=LR), pm, noise_multiplier=SIGMA,
                      expected_batch_size=4, loss_reduction="sum")
    for _ in range(2):  # steps go on while it stays frozen
        opt.zero_grad()
        pm(torch.randn(4, 3)).sum().backward()
        opt.step()
    extra.requires_grad_(True)
    opt.zero_grad()
    (pm(torch.randn(4, 3)).sum() + extra.sum()).backward()  # an unclipped gradient
    before = [p.detach().clone() for p in (*model.parameters(), extra)]
    with pytest.raises(fxclip.PrivacyError) as info:
        opt.step()
    assert info.value.id == "unprivatized-parameter-released"
    assert all(torch.equal(p.detach(), b) for p, b in zip((*model.parameters(), extra), before))
