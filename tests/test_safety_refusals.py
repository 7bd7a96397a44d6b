"""Every refusal of issue 4, eager and compiled: sample mixing, bad inputs and outputs, double
backward, parameters modified in forward, non-finite gradients; and what must still work."""
import copy

import pytest
import torch
from helpers import Wrap, sq_loss
from reference import per_sample_reference
from torch import nn

import fxclip

MIXERS = {
    "mean0": (lambda h: h - h.mean(0, keepdim=True), "aten::mean"),
    "cumsum0": (lambda h: h.cumsum(0), "aten::cumsum"),
    "sort0": (lambda h: h.sort(0).values, "aten::sort"),
    "topk0": (lambda h: h.topk(2, 0).values.sum(0) + h, "aten::topk"),
    "flip0": (lambda h: h.flip(0), "rev|flip"),  # flip decomposes to prims.rev
    "roll0": (lambda h: h.roll(1, 0), "aten::index|roll"),  # roll: an index over dim 0
    "gram": (lambda h: h @ (h.t() @ h), "aten::mm"),
    "first": (lambda h: h + h[0], "aten::select"),
    "shift": (lambda h: torch.cat([h[1:], h[:1]]), "aten::slice"),
    "max0": (lambda h: h - h.max(0).values, "aten::max"),
    "softmax0": (lambda h: h.softmax(0), "aten::amax|softmax"),  # decomposed: amax over dim 0
    # indexing the batch dim with anything but arange(B) itself reads other samples' rows
    "arange_shifted": (lambda h: h[(torch.arange(h.shape[0]) + 1) % h.shape[0]], "aten::index"),
    "arange_halved": (lambda h: h[torch.arange(h.shape[0]) // 2], "aten::index"),
    "arange_reversed": (lambda h: h[torch.arange(h.shape[0]).flip(0)], "aten::index"),
}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixing_ops_are_refused_eagerly(name):
    fn, op = MIXERS[name]
    pm = fxclip.privatize(Wrap(fn), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match=op) as info:  # the (decomposed) aten op
        pm(torch.randn(5, 3)).sum().backward()
    assert "module 'inner'" in str(info.value) and "mixes samples" in str(info.value)


def test_batchnorm_in_training_is_refused_with_a_hint():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match=r"aten::var_mean.*module '1' \(BatchNorm1d\).*GroupNorm"):
        pm(torch.randn(5, 3)).sum().backward()
    assert model[0].weight.grad is None


def test_batchnorm2d_in_training_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(fxclip.PrivacyError, match="BatchNorm2d"):
        fxclip.privatize(model, max_grad_norm=1.0)(torch.randn(4, 2, 4, 4)).sum().backward()


def test_batchnorm_in_eval_mode_is_exact():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[1].running_mean.normal_()
    model.eval()
    pm = fxclip.privatize(model, max_grad_norm=0.3)
    x, y = torch.randn(6, 3, dtype=torch.float64) * 3, torch.randn(6, 2, dtype=torch.float64)
    (pm(x) - y).square().sum(1).mean().backward()
    expected, _ = per_sample_reference(model, (x,), y, sq_loss, 0.3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-10, rtol=1e-7)


class FreqEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(10, 4, scale_grad_by_freq=True)
        self.h = nn.Linear(4, 2)

    def forward(self, ids):
        return self.h(self.e(ids))


def test_scale_grad_by_freq_embedding_is_refused():
    pm = fxclip.privatize(FreqEmb(), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match=r"aten::embedding.*module 'e'"):
        pm(torch.randint(0, 10, (4, 3))).sum().backward()


def test_unknown_op_in_forward_is_refused_with_registration_hint():
    pm = fxclip.privatize(Wrap(lambda h: torch.linalg.qr(h.unsqueeze(-1)).Q.squeeze(-1)), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="cannot prove.*register_per_sample"):
        pm(torch.randn(5, 3)).sum().backward()


def test_per_sample_ops_over_other_dims_pass():
    fns = [lambda h: h.cumsum(-1), lambda h: h.sort(-1).values, lambda h: h.softmax(-1),
           lambda h: h.flip(1), lambda h: torch.cat([h, h], 1)[:, :4], lambda h: h.topk(4, 1).values,
           lambda h: torch.stack([h, -h], 1).sum(1)]
    for fn in fns:
        model = Wrap(fn).double()
        pm = fxclip.privatize(model, max_grad_norm=0.2)
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        (pm(x) - y).square().sum(1).mean().backward()
        expected, _ = per_sample_reference(model, (x,), y, sq_loss, 0.2)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-10, rtol=1e-7)


# ---------------------------------------------------------------- bad input, eager


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 1)

    def forward(self, x):
        return self.l(x).mean()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x, extra):
        return self.l(x) + extra["shift"][0] * extra["scale"]


def test_scalar_model_output_is_refused():
    with pytest.raises(fxclip.PrivacyError, match="model output has no batch dimension.*mean loss"):
        fxclip.privatize(Scalar(), max_grad_norm=1.0)(torch.randn(4, 3))


def test_disagreeing_batch_sizes_are_refused():
    pm = fxclip.privatize(TwoInputs(), max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="batch sizes disagree: input 0: 4, input 1: 3"):
        pm(torch.randn(4, 3), {"shift": [torch.randn(3, 2)], "scale": torch.randn(4, 1)})


def test_pytree_inputs_work_and_odd_inputs_are_refused():
    model = TwoInputs().double()
    pm = fxclip.privatize(model, max_grad_norm=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    extra = {"shift": [torch.randn(4, 2, dtype=torch.float64)], "scale": torch.randn(4, 1, dtype=torch.float64)}
    pm(x, extra).square().sum(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(fxclip.PrivacyError, match="0-d tensor"):
        pm(x, {"shift": [torch.randn(4, 2)], "scale": torch.tensor(2.0)})
    import numpy as np
    with pytest.raises(fxclip.PrivacyError, match="ndarray.*torch.from_numpy"):
        pm(x, {"shift": [np.zeros((4, 2))], "scale": torch.randn(4, 1)})
    with pytest.raises(fxclip.PrivacyError, match="no tensor input"):
        fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0)(None)


def test_double_backward_is_refused_eagerly():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    with pytest.raises(fxclip.PrivacyError, match="create_graph=True"):
        pm(torch.randn(4, 3)).sum().backward(create_graph=True)
    assert model[0].weight.grad is None


class MutatesParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        with torch.no_grad():
            self.l.weight.mul_(0.5)
        return self.l(x)


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x):
        self.seen.copy_(x.detach()[0])
        return self.l(x)


def test_parameter_modified_in_forward_is_refused():
    model = MutatesParam()
    before = model.l.weight.detach().clone()
    with pytest.raises(fxclip.PrivacyError, match="parameter 'l.weight' is modified in place"):
        fxclip.privatize(model, max_grad_norm=1.0)(torch.randn(4, 3)).sum().backward()
    assert model.l.weight.grad is None
    del before


def test_buffer_written_from_the_batch_is_refused():
    with pytest.raises(fxclip.PrivacyError, match="buffer.*written inside the forward"):
        fxclip.privatize(WritesBuffer(), max_grad_norm=1.0)(torch.randn(4, 3)).sum().backward()


def test_empty_batch_gives_zero_gradients():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_reduction="sum")
    pm(torch.randn(0, 3)).sum().backward()
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert pm.per_sample_norms.numel() == 0


def _nan_step(pm, model, bad):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    y[1] = bad  # sample 1's loss, and so its gradient, is inf/NaN
    (pm(x) - y).square().sum(1).mean().backward()
    return x, y


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_sample_refuses_the_step_and_no_parameter_changes(bad):
    """The backward never syncs: it gives the sample weight 0 and flags it on the device; the
    optimizer step raises and changes nothing. No inf/NaN ever reaches .grad."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = copy.deepcopy(model.state_dict())
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    opt = fxclip.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), pm, noise_multiplier=0.0,
                             expected_batch_size=4)
    _nan_step(pm, model, bad)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(fxclip.PrivacyError, match=r"1 sample\(s\).*non-finite.*rows \[1\].*"
                                                  r"no parameter changed.*nonfinite=\"drop\""):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # without DPOptimizer, pm.check_step() is the same check
    _nan_step(pm, model, bad)
    with pytest.raises(fxclip.PrivacyError, match="non-finite"):
        pm.check_step()
    pm.check_step()  # the flag was reset: the next check passes


class _Seq(nn.Module):
    """Embedding, a sequence Linear (T > 1: Gram or instantiation), a conv over the sequence and
    a mean-pooled head: every reweighting path a dropped sample's inf/NaN could leak through."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h).mean(1))


_DROP_MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
            lambda: torch.randn(5, 3, dtype=torch.float64)),
    "sequence": (_Seq, lambda: torch.randint(0, 11, (5, 7))),
}


@pytest.mark.parametrize("kind,bad,compiled", [
    ("mlp", float("nan"), False), ("mlp", float("inf"), False), ("sequence", float("nan"), False),
    ("sequence", float("inf"), False), ("sequence", float("nan"), True)])
def test_nonfinite_drop_gives_the_clipped_sum_of_the_other_samples(kind, bad, compiled):
    build, make_x = _DROP_MODELS[kind]
    model = build().double()
    x, y = make_x(), torch.randn(5, 2, dtype=torch.float64)
    y[1] = bad  # sample 1's loss, and so its gradient, is inf/NaN

    pm = fxclip.privatize(model, max_grad_norm=0.5, loss_reduction="sum", nonfinite="drop")
    sq_loss((torch.compile(pm) if compiled else pm)(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not torch.isfinite(pm.per_sample_norms[1])
    assert torch.isfinite(pm.per_sample_norms[[0, 2, 3, 4]]).all()

    keep = [0, 2, 3, 4]
    ref, _ = per_sample_reference(model, (x[keep],), y[keep], sq_loss, 0.5, "sum")
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_nothing_lost_same_objects_state_dict_and_unprivatize():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    pm = fxclip.privatize(model, max_grad_norm=1.0)
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(pm.state_dict()) == list(model.state_dict())
    plain = copy.deepcopy(model)
    for p in plain.parameters():
        p.data.zero_()
    plain.load_state_dict(pm.state_dict())
    pm.load_state_dict({"module." + k: v for k, v in plain.state_dict().items()})
    x = torch.randn(5, 3)
    torch.testing.assert_close(plain(x), model(x))
    assert fxclip.unprivatize(pm) is model
    assert fxclip.unprivatize(torch.compile(pm)) is model
    with pytest.raises(TypeError):
        fxclip.unprivatize(model)
