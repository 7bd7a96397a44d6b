"""Privacy units (docs/privacy-units.md): pm(x, privacy_unit=ids) clips the gradient of each group
of rows with equal ids. Multi-step runs as a training loop makes them (batch sizes and ids that
change every step, units spread through the batch), eager and compiled, exact in float64 against
per_unit_reference (torch.func per-row gradients summed by unit, clipped, summed)."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import D, sq_loss, unit_clipped_sum
from reference import per_sample_reference, per_unit_reference
from torch import nn

import fxclip

C = 0.5
SIZES = (6, 5, 9, 4, 7)


def row_losses(out, y):
    """Per-sample losses (B,) for privatize(loss_fn=...)."""
    return (out - y).square().flatten(1).sum(1)


# --- models: each with its inputs of b rows ---

class Block(nn.Module):
    """A small transformer block: attention across the tokens of one row, an MLP, a head."""

    def __init__(self, d=8, t=4):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1)
        h = self.norm(x + self.proj(att @ v))
        h = h + self.mlp(h)
        return self.head(h.mean(1))


class Bag(nn.Module):
    """An embedding of token ids, averaged, then a linear head."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Tied(nn.Module):
    """One linear layer applied twice (a shared parameter): its uses are summed before the norm."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))


def _floats(*shape):
    return lambda b, g: (torch.randn(b, *shape, dtype=D, generator=g),)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), _floats(6)),
    "transformer": (Block, _floats(4, 8)),
    "embedding": (Bag, lambda b, g: (torch.randint(0, 20, (b, 5), generator=g),)),
    "conv": (Convs, _floats(2, 6, 6)),
    "tied": (Tied, _floats(6)),
}


def random_ids(b: int, g: torch.Generator) -> torch.Tensor:
    """Ids of a random number of units, spread through the batch: any integers (negative,
    large, unsorted), new every step."""
    pool = torch.randint(-10 ** 12, 10 ** 12, (max(1, int(torch.randint(1, b + 1, (), generator=g))),),
                         generator=g)
    return pool[torch.randint(0, pool.shape[0], (b,), generator=g)]


def run_units(name, loss_reduction="sum", unit_reduction="sum", compiled=False, sizes=SIZES, ids_of=random_ids):
    """A training loop's steps, each checked against per_unit_reference; returns pm."""
    make_model, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = make_model().to(D)
    oracle = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction=loss_reduction, loss_fn=row_losses,
                          unit_reduction=unit_reduction)
    run = torch.compile(pm) if compiled else pm
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for b in sizes:
        inputs, ids = make_inputs(b, g), ids_of(b, g)
        y = torch.randn(b, 3, dtype=D, generator=g)
        model.zero_grad(set_to_none=True)
        losses = run(*inputs, target=y, privacy_unit=ids)
        (losses.sum() if loss_reduction == "sum" else losses.mean()).backward()
        expected, norms = per_unit_reference(oracle, inputs, y, sq_loss, C, ids, loss_reduction, unit_reduction)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=f"{name} B={b} {n}")
        torch.testing.assert_close(pm.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
        clipped += int((norms > C).sum())
        assert pm.read_state()["units"] == ids.unique().numel()
        pm.reset_state()
    assert clipped > 0, "the test should clip some units"
    return pm


def _eager_cases():
    """Every model and reduction; the README's test command runs every reduction on the MLP and
    one per other model (the rest are `slow`, for CI's time)."""
    for name in sorted(MODELS):
        for k, (loss_reduction, unit_reduction) in enumerate(
                [("sum", "sum"), ("sum", "mean"), ("mean", "sum"), ("mean", "mean")]):
            fast = name == "mlp" or k == sorted(MODELS).index(name) % 4
            yield pytest.param(name, loss_reduction, unit_reduction, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("name,loss_reduction,unit_reduction", list(_eager_cases()))
def test_units_exact_eager(name, loss_reduction, unit_reduction, model_costs):
    pm = run_units(name, loss_reduction, unit_reduction)
    assert not pm.last_report.batch_size.isdigit()  # one dynamic graph for the changing sizes
    assert pm.last_report.privacy_unit.endswith(f"unit_reduction={unit_reduction}")


COMPILED = [("mlp", "sum", "mean"), ("transformer", "mean", "sum"), ("embedding", "sum", "sum"),
            ("conv", "mean", "mean"), ("tied", "sum", "sum")]


@pytest.mark.parametrize("name,loss_reduction,unit_reduction",
                         [COMPILED[0]] + [pytest.param(*c, marks=pytest.mark.slow) for c in COMPILED[1:]])
def test_units_exact_compiled_one_dynamic_graph(name, loss_reduction, unit_reduction, model_costs):
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    pm = run_units(name, loss_reduction, unit_reduction, compiled=True, sizes=(6, 5, 9, 7, 5))
    # a static graph for the first size, one dynamic graph after: never a graph per size or ids
    assert stats["unique_graphs"] - before <= 2, stats["unique_graphs"] - before
    assert not pm.last_report.batch_size.isdigit()


def test_special_groupings_in_one_run():
    """All rows one unit, every row its own unit, one row, then an empty batch."""
    patterns = iter([lambda b: torch.full((b,), 7), lambda b: torch.arange(b) * -3 + 10 ** 15,
                     lambda b: torch.tensor([-1]), lambda b: torch.tensor([4, 4, -2, 4, -2])])
    run_units("mlp", ids_of=lambda b, g: next(patterns)(b), sizes=(6, 5, 1, 5))
    model = MODELS["mlp"][0]().to(D)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=row_losses)
    pm(torch.randn(0, 6, dtype=D), target=torch.randn(0, 3, dtype=D),
       privacy_unit=torch.zeros(0, dtype=torch.long)).sum().backward()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


@pytest.mark.filterwarnings("ignore:.*computed outside")
def test_units_without_loss_fn_and_padding_rows():
    """pm(x, privacy_unit=ids) with the loss outside; padding rows (set_valid_rows) share ids with
    real units yet add nothing to any unit's norm or sum."""
    torch.manual_seed(0)
    model = MODELS["mlp"][0]().to(D)
    oracle = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum")
    g = torch.Generator().manual_seed(3)
    for real, pad in ((5, 3), (6, 2), (4, 4)):
        x, y = torch.randn(real + pad, 6, dtype=D, generator=g), torch.randn(real + pad, 3, dtype=D, generator=g)
        ids = random_ids(real, g)
        ids = torch.cat([ids, ids[:pad] if pad <= real else ids.repeat(pad)[:pad]])  # padding reuses ids
        x[real:] *= 100  # padding with a large gradient: it would dominate any unit it joined
        model.zero_grad(set_to_none=True)
        pm.set_valid_rows(real)
        sq_loss(pm(x, privacy_unit=ids), y).backward()
        expected, norms = per_unit_reference(oracle, (x[:real],), y[:real], sq_loss, C, ids[:real], "sum")
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(pm.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
        assert pm.read_state()["units"] == ids[:real].unique().numel()
        pm.reset_state()


@pytest.mark.parametrize("unit_reduction", ["sum", "mean"])
def test_removing_one_unit_moves_the_clipped_sum_by_at_most_C(unit_reduction):
    """Sensitivity: the clipped gradient sum with and without all rows of one unit (spread
    through the batch) differ by at most C, over many random draws."""
    torch.manual_seed(0)
    model = MODELS["transformer"][0]().to(D)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_reduction="sum", loss_fn=row_losses,
                          unit_reduction=unit_reduction)
    g = torch.Generator().manual_seed(5)

    worst = 0.0
    for _ in range(30):
        b = int(torch.randint(3, 12, (), generator=g))
        x, y = torch.randn(b, 4, 8, dtype=D, generator=g) * 3, torch.randn(b, 3, dtype=D, generator=g) * 5
        ids = random_ids(b, g)
        gone = ids[int(torch.randint(0, b, (), generator=g))]
        keep = ids != gone
        if keep.sum() == 0:
            continue
        with_unit = unit_clipped_sum(model, pm, x, y, ids)
        without = unit_clipped_sum(model, pm, x[keep], y[keep], ids[keep])
        worst = max(worst, float((with_unit - without).norm()))
    assert C * 0.5 < worst <= C * (1 + 1e-9), worst  # reached, never exceeded


def test_mixing_across_units_is_refused():
    """A model that mixes rows (batch-centering) is refused, units given or not: units never
    weaken the row-level refusal."""
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return h - h.mean(0)

    pm = fxclip.privatize(Centered().to(D), max_grad_norm=C, loss_fn=row_losses)
    with pytest.raises(fxclip.PrivacyError) as info:
        pm(torch.randn(4, 6, dtype=D), target=torch.randn(4, 3, dtype=D),
           privacy_unit=torch.tensor([1, 1, 2, 2])).sum().backward()
    assert info.value.id == "mixes-samples"


@pytest.mark.parametrize("compiled", [False, True])
def test_units_of_one_row_are_row_clipping(compiled):
    """Distinct ids (negative, large, unsorted) give exactly today's row-level clipping."""
    torch.manual_seed(0)
    model = MODELS["transformer"][0]().to(D)
    rows_model = copy.deepcopy(model)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=row_losses)
    rows_pm = fxclip.privatize(rows_model, max_grad_norm=C, loss_fn=row_losses)
    run, rows_run = (torch.compile(pm), torch.compile(rows_pm)) if compiled else (pm, rows_pm)
    g = torch.Generator().manual_seed(2)
    for b in (5, 7, 4):
        x, y = torch.randn(b, 4, 8, dtype=D, generator=g), torch.randn(b, 3, dtype=D, generator=g)
        ids = torch.randperm(b, generator=g) * -(10 ** 14) + 17
        model.zero_grad(set_to_none=True)
        rows_model.zero_grad(set_to_none=True)
        run(x, target=y, privacy_unit=ids).mean().backward()
        rows_run(x, target=y).mean().backward()
        expected, norms = per_sample_reference(copy.deepcopy(rows_model), (x,), y, sq_loss, C)
        for (n, p), q in zip(model.named_parameters(), rows_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=n)
        torch.testing.assert_close(pm.per_sample_norms, rows_pm.per_sample_norms, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(pm.per_sample_norms, norms, rtol=1e-9, atol=1e-12)
        assert pm.read_state()["units"] == rows_pm.read_state()["samples"] == b
        pm.reset_state()
        rows_pm.reset_state()


def test_which_unit_norm_each_parameter_gets(model_costs):
    """Linear weights (ghost per row) get their unit norm from the Grams over the unit's rows (no
    per-sample gradient); a bias (instantiated per row) is summed by unit."""
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.small, self.wide, self.head = nn.Linear(3, 4), nn.Linear(4, 256), nn.Linear(256, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.wide(torch.tanh(self.small(x)))))

    MODELS["wide"] = (Wide, _floats(3))
    try:
        pm = run_units("wide", sizes=(6, 8, 5))
    finally:
        del MODELS["wide"]
    routes = {r.name: r for r in pm.last_report.params}
    for name in ("small.weight", "wide.weight", "head.weight"):
        assert (routes[name].rule, routes[name].strategy) == ("linear", "ghost"), routes[name]
        assert routes[name].shapes["unit norm"].startswith("ghost Gram"), routes[name].shapes
    assert routes["head.bias"].strategy == "instantiate"
    assert routes["head.bias"].shapes["unit norm"] == "instantiated per sample, summed by unit"


def test_bad_ids_and_options_are_refused():
    pm = fxclip.privatize(MODELS["mlp"][0]().to(D), max_grad_norm=C)
    with pytest.raises(TypeError, match="integer ids"):
        pm(torch.randn(3, 6, dtype=D), privacy_unit=torch.zeros(3))
    with pytest.raises(fxclip.PrivacyError):  # one id per row
        pm(torch.randn(3, 6, dtype=D), privacy_unit=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unit_reduction"):
        fxclip.privatize(MODELS["mlp"][0](), max_grad_norm=C, unit_reduction="max")


def test_explain_says_how_units_are_clipped(model_costs):
    jsonschema = pytest.importorskip("jsonschema")
    x, ids = torch.randn(6, 6, dtype=D), torch.tensor([3, 1, 3, 3, 8, 1])
    rep = fxclip.explain(MODELS["mlp"][0]().to(D), x, privacy_unit=ids, unit_reduction="mean")
    text = str(rep)
    assert "privacy unit: groups of rows by privacy_unit ids, unit_reduction=mean" in text
    assert "0.weight: instantiated per sample, summed by unit" in text or "0.weight: ghost Gram" in text
    doc = rep.to_json()
    jsonschema.validate(doc, fxclip.explain.JSON_SCHEMA)
    assert doc["model"]["privacy_unit"].endswith("unit_reduction=mean")
    assert fxclip.explain(MODELS["mlp"][0]().to(D), x).to_json()["model"]["privacy_unit"] is None
