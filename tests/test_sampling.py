"""Poisson-sampling loader: batch-size statistics, coverage, empty batches, seeding."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fxclip.sampling import PoissonBatchSampler, PoissonDataLoader, micro_batches


def test_batch_sizes_vary_around_q_times_n():
    n, q, batches = 1000, 0.05, 400
    sampler = PoissonBatchSampler(n, q, num_batches=batches, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert len(sizes) == batches
    # each size ~ Binomial(n, q): mean q*n, std sqrt(n q (1-q)); the sample mean has std /sqrt(400)
    sd = math.sqrt(n * q * (1 - q))
    assert abs(sizes.mean().item() - q * n) < 4 * sd / math.sqrt(batches)
    assert sizes.std().item() == pytest.approx(sd, rel=0.15)
    assert len(set(sizes.tolist())) > 10  # really variable


def test_every_sample_can_appear_and_indices_are_distinct():
    n = 60
    seen = set()
    for batch in PoissonBatchSampler(n, 0.1, num_batches=200, generator=torch.Generator().manual_seed(1)):
        assert len(set(batch)) == len(batch)  # no sample twice in a batch
        seen.update(batch)
    assert seen == set(range(n))


def test_default_epoch_is_one_over_q_batches():
    assert len(PoissonBatchSampler(1000, 0.05)) == 20
    assert len(PoissonBatchSampler(10, 0.3)) == 3


def test_empty_batches_survive_with_right_shapes_and_dtypes():
    ds = TensorDataset(torch.randn(40, 3, 2), torch.randint(0, 5, (40,)))
    loader = PoissonDataLoader(ds, 0.02, num_batches=100, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 100  # nothing skipped
    empty = [b for b in batches if len(b[1]) == 0]
    assert len(empty) > 20  # P(empty) = 0.98^40 ~ 0.45
    x, y = empty[0]
    assert x.shape == (0, 3, 2) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64
    full = next(b for b in batches if len(b[1]) > 0)
    assert full[0].shape[1:] == (3, 2)


class DictDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"ids": torch.full((4,), i), "label": i % 2}


def test_empty_batch_of_dict_samples():
    loader = PoissonDataLoader(DictDataset(), 0.01, num_batches=5, generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["ids"].shape == (0, 4) and batch["label"].shape == (0,)


def test_seeded_sampling_is_reproducible():
    make = lambda seed: [b for b in PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(seed))]  # noqa: E731
    assert make(3) == make(3)
    assert make(3) != make(4)


def test_from_data_loader_keeps_dataset_and_expected_batch_size():
    ds = TensorDataset(torch.arange(200.0).unsqueeze(1))
    loader = PoissonDataLoader.from_data_loader(DataLoader(ds, batch_size=20, shuffle=True))
    assert loader.dataset is ds
    assert loader.sample_rate == pytest.approx(0.1) and loader.expected_batch_size == pytest.approx(20)
    assert len(loader) == 10


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(10, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        PoissonBatchSampler(0, 0.1)
    with pytest.raises(ValueError, match="batch_size"):
        PoissonDataLoader(TensorDataset(torch.zeros(5)), 0.5, batch_size=2)
    with pytest.raises(ValueError, match="exceeds"):
        PoissonDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(5)), batch_size=6))


@given(n=st.integers(0, 40), size=st.integers(1, 9))
def test_micro_batches_partition_the_batch(n, size):
    batch = (torch.arange(n), {"m": torch.arange(n) * 2})
    chunks = list(micro_batches(batch, size))
    assert all(0 < len(c[0]) <= size for c in chunks)
    assert torch.equal(torch.cat([c[0] for c in chunks]) if chunks else torch.arange(0), batch[0])
    assert all(torch.equal(c[1]["m"], c[0] * 2) for c in chunks)
