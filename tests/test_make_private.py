"""make_private end to end: learns, spends the epsilon it promised, refuses ambiguous input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxclip
from fxclip.accounting import epsilon_for
from fxclip.make_private import make_private
from fxclip.optim import DPOptimizer
from fxclip.sampling import PoissonDataLoader

DELTA = 1e-5


def _blobs(n=400):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.5 + (y[:, None] * 2 - 1) * 1.5  # centres at -1.5 and +1.5
    return TensorDataset(x, y)


def _train(pm, opt, loader, epochs):
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            if len(y):  # an empty Poisson batch has no loss; step() still adds noise
                F.cross_entropy(pm(x), y).backward()
            opt.step()


def test_make_private_learns_separable_data():
    ds = _blobs()
    model = nn.Linear(2, 2)
    pm, opt, loader = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                   DataLoader(ds, batch_size=40), noise_multiplier=1.0,
                                   max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    assert isinstance(pm, fxclip.PrivatizedModule) and pm.module is model
    assert isinstance(opt, DPOptimizer) and isinstance(loader, PoissonDataLoader)
    assert opt.expected_batch_size == 40 and opt.sample_rate == pytest.approx(0.1)
    assert loader.dataset is ds and len(loader) == 10
    _train(pm, opt, loader, epochs=5)
    with torch.no_grad():
        acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean().item()
    assert acc > 0.95
    assert opt.steps == 50
    eps = opt.epsilon(DELTA)
    assert 0 < eps < 10
    assert eps == pytest.approx(epsilon_for([(1.0, 0.1, 50)], DELTA))


def test_target_epsilon_is_spent_exactly_after_the_given_epochs():
    ds = _blobs(200)
    model = nn.Linear(2, 2)
    pm, opt, loader = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                   DataLoader(ds, batch_size=20), target_epsilon=2.0,
                                   target_delta=DELTA, epochs=3, max_grad_norm=1.0,
                                   generator=torch.Generator().manual_seed(0))
    assert opt.noise_multiplier > 0.5
    _train(pm, opt, loader, epochs=3)
    assert opt.steps == 30
    eps = opt.epsilon(DELTA)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=1e-2)


def test_without_poisson_sampling_the_loader_is_kept():
    loader = DataLoader(_blobs(50), batch_size=10)
    model = nn.Linear(2, 2)
    _, opt, out = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                               noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    assert out is loader and opt.expected_batch_size == 10


@pytest.mark.parametrize("kw,match", [
    (dict(noise_multiplier=1.0, target_epsilon=1.0, target_delta=DELTA, epochs=1), "exactly one"),
    (dict(), "exactly one"),
    (dict(target_epsilon=1.0), "target_delta"),
    (dict(noise_multiplier=1.0, epochs=2), "epochs"),
])
def test_ambiguous_noise_settings_are_refused(kw, match):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     DataLoader(_blobs(20), batch_size=5), max_grad_norm=1.0, **kw)
