"""The catalogue of refusals (passes/refusals.py): every PrivacyError carries a stable id."""
import pickle
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxclip
from fxclip.passes import _torch
from fxclip.passes.refusals import REFUSALS, refusal


def test_every_message_formats_with_its_own_fields():
    for rid, template in REFUSALS.items():
        fields = {name: "x" for _, name, _, _ in string.Formatter().parse(template) if name}
        err = refusal(rid, **fields)
        assert isinstance(err, fxclip.PrivacyError) and err.id == rid and str(err)


def test_the_id_survives_dynamo_and_pickling():
    err = _torch.passthrough(refusal("graph-break"))
    assert err.id == "graph-break" and isinstance(err, torch._dynamo.exc.ShortenTraceback)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is fxclip.PrivacyError and back.id == "graph-break" and str(back) == str(err)


def _refused(fn) -> str:
    with pytest.raises(fxclip.PrivacyError) as info:
        fn()
    return info.value.id


def test_refusals_of_inputs_losses_and_steps_carry_their_ids():
    pm = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0)
    assert _refused(lambda: pm(torch.randn(4, 3), torch.randn(5, 3))) == "inputs-batch-sizes-disagree"
    assert _refused(lambda: pm(torch.tensor(1.0))) == "zero-dim-input"
    assert _refused(lambda: pm(object())) == "unsplittable-input"
    assert _refused(lambda: fxclip.privatize(pm, max_grad_norm=1.0)) == "already-privatized"

    lossy = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0,
                             loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none").mean())
    assert _refused(lambda: lossy(torch.randn(4, 3), target=torch.tensor([0, 1, 0, 1]))) == "loss-shape"

    checked = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0, loss_reduction="sum",
                               loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    (checked(torch.randn(4, 3), target=torch.tensor([0, 1, 0, 1])) * torch.arange(4.0)).sum().backward()
    assert _refused(checked.check_step) == "bad-reduction"


def test_a_mixing_model_and_a_double_backward_are_refused_by_id():
    class BatchCentered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0)

    pm = fxclip.privatize(BatchCentered(), max_grad_norm=1.0)
    assert _refused(lambda: pm(torch.randn(4, 3)).sum().backward()) == "mixes-samples"

    plain = fxclip.privatize(nn.Linear(3, 2), max_grad_norm=1.0)
    out = plain(torch.randn(4, 3)).square().sum()
    assert _refused(lambda: out.backward(create_graph=True)) == "double-backward"
