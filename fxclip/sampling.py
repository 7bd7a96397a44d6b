"""Poisson sampling: each sample joins each batch independently with probability q.

This is the sampling DP-SGD's accounting assumes (PoissonSampledDpEvent). Batch sizes vary from
batch to batch and can be zero; an empty batch is still yielded, as correctly shaped empty
tensors, so that the training loop still takes (and the accountant still counts) the step.

Several processes: rank r of W draws only its disjoint shard (indices j with j % W == r), each
index with the GLOBAL rate q, from a generator of its own (rank_generator). The union over the
ranks is then exactly one Poisson sample of the whole dataset with rate q, what the accountant
assumes; one process is the shard of rank 0 of 1.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate as _default_collate

MASK_BLOCK = 1 << 20  # membership draws per block of batches (4 MB of uniforms at a time)


def rank_generator(generator: torch.Generator | None, rank: int, stream: int = 0) -> torch.Generator:
    """A generator for `rank` that is independent of every other rank's.

    From `generator`'s seed (reproducible runs) through numpy's SeedSequence with the rank as
    spawn key; with generator=None from os.urandom. Identical streams on two ranks would make
    their Poisson draws (or their noise shards) equal, i.e. correlated, which the accounting
    and the Gaussian mechanism do not allow; torch.manual_seed(0) on every rank does exactly that.
    """
    if generator is None:
        seed = int.from_bytes(os.urandom(8), "little")
    else:
        seed = int(np.random.SeedSequence([generator.initial_seed(), stream], spawn_key=(rank,))
                   .generate_state(1, np.uint64)[0])
    device = generator.device if generator is not None else "cpu"
    return torch.Generator(device=device).manual_seed(seed)


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields `num_batches` index lists; index j is in each list with probability `sample_rate`.

    rank/world_size: only this rank's shard (j % world_size == rank) is drawn, still with the
    global `sample_rate`, from rank_generator(generator, rank); every rank yields the same number
    of batches (some may be empty), so collectives in the training loop stay matched.
    """

    def __init__(self, num_samples: int, sample_rate: float, num_batches: int | None = None,
                 generator: torch.Generator | None = None, *, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError(f"need a non-empty dataset, got {num_samples} samples")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        # one "epoch" = 1/q batches: each sample is seen once per epoch in expectation
        self.num_batches = max(1, round(1 / sample_rate)) if num_batches is None else num_batches
        self.rank, self.world_size = rank, world_size
        self.indices = torch.arange(rank, num_samples, world_size)  # this rank's shard
        # one process keeps the caller's generator (a stream it may share with the noise)
        self.generator = generator if world_size == 1 else rank_generator(generator, rank)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for mask in membership_blocks(self.num_batches, len(self.indices), self.sample_rate, self.generator):
            yield from self._batches(mask)

    def _batches(self, mask: torch.Tensor) -> Iterator[list[int]]:
        """The index lists of a (k, n) membership block: a few tensor ops per k batches."""
        rows, cols = mask.nonzero(as_tuple=True)
        cols = (cols if self.world_size == 1 else self.indices[cols]).tolist()
        start = 0
        for count in torch.bincount(rows, minlength=mask.shape[0]).tolist():
            yield cols[start:start + count]
            start += count


def membership_blocks(num_batches: int, n: int, rate: float, generator) -> Iterator[torch.Tensor]:
    """Poisson memberships of n candidates in num_batches batches, as (k, n) boolean blocks drawn
    k batches at a time. The uniforms are those of one draw of n per batch, so a generator of its
    own gives the same batches as per-batch draws; a generator shared with the noise is read in
    blocks."""
    left = num_batches
    while left > 0:
        k = max(1, min(left, MASK_BLOCK // max(1, n)))
        yield torch.rand(k, n, generator=generator) < rate
        left -= k


class _EmptyAwareCollate:
    """Collates as `collate_fn` does; an empty batch becomes the collated first sample cut to 0 rows."""

    def __init__(self, dataset: Dataset, collate_fn):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty = None

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _cut_to_empty(self.collate_fn([self.dataset[0]]))
        return self._empty


def _cut_to_empty(x):
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, dict):
        return type(x)({k: _cut_to_empty(v) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_cut_to_empty(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_cut_to_empty(v) for v in x)
    raise TypeError(f"cannot build an empty batch from a collated {type(x).__name__}; "
                    "make collate_fn return tensors (or dicts/tuples of tensors)")


class PoissonDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson samples of `dataset`.

    `expected_batch_size` is the EXPECTED (global) batch size q * len(dataset) (DPOptimizer
    divides by it; the DataLoader machinery itself sees only the batch sampler). Seed it with
    `generator`. Other DataLoader options (num_workers, collate_fn, pin_memory, ...) pass through.
    rank/world_size: this rank's Poisson share of the global batch (PoissonBatchSampler).

    pad_to_multiple=k: every batch is padded with zero rows to a multiple of k rows (an empty
    batch to k), so compiled graphs and CUDA graphs see few shapes. `privatized_module` (the
    module from fxclip.privatize) is told how many leading rows are real before each batch is
    yielded, and gives the padding rows weight exactly 0: the update equals the unpadded one.
    Accounting is unchanged (padding is not sampling).
    """

    def __init__(self, dataset: Dataset, sample_rate: float, *, num_batches: int | None = None,
                 generator: torch.Generator | None = None, collate_fn=None,
                 pad_to_multiple: int | None = None, privatized_module=None, rank: int = 0,
                 world_size: int = 1, **kwargs):
        for k in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if kwargs.get(k) not in (None, False):
                raise ValueError(f"{type(self).__name__} chooses its own batches; do not pass {k}=")
            kwargs.pop(k, None)
        sampler = PoissonBatchSampler(len(dataset), sample_rate, num_batches, generator,
                                      rank=rank, world_size=world_size)
        collate = _EmptyAwareCollate(dataset, collate_fn or _default_collate)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)
        self.sample_rate = sample_rate
        self.expected_batch_size = sample_rate * len(dataset)
        check_pad_to_multiple(pad_to_multiple, privatized_module)
        self.pad_to_multiple = pad_to_multiple
        self.privatized_module = privatized_module

    def __iter__(self):
        if self.pad_to_multiple is None:
            yield from super().__iter__()
            return
        from .optim import _unwrap

        pm = _unwrap(self.privatized_module)
        try:
            for batch in super().__iter__():
                pm.set_valid_rows(_rows(batch))
                yield pad_to(batch, self.pad_to_multiple)
        finally:  # batches from elsewhere are all real
            pm.set_valid_rows(float("inf"))

    @classmethod
    def from_data_loader(cls, loader: DataLoader, *, generator: torch.Generator | None = None,
                         num_batches: int | None = None, pad_to_multiple: int | None = None,
                         privatized_module=None, rank: int = 0,
                         world_size: int = 1) -> "PoissonDataLoader":
        """Same dataset and options, q = world_size * loader.batch_size / len(dataset): the
        loader's batch_size is the expected batch PER RANK (as with DistributedSampler)."""
        batch_size = loader_batch_size(loader) * world_size
        n = len(loader.dataset)
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size // world_size} x {world_size} rank(s) exceeds "
                             f"the dataset size {n}")
        return cls(loader.dataset, batch_size / n, num_batches=num_batches, generator=generator,
                   pad_to_multiple=pad_to_multiple, privatized_module=privatized_module,
                   rank=rank, world_size=world_size,
                   collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                   pin_memory=loader.pin_memory, timeout=loader.timeout,
                   worker_init_fn=loader.worker_init_fn)


def loader_batch_size(loader: DataLoader) -> int:
    """A DataLoader's batch size (also when built from a batch_sampler)."""
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not batch_size:
        raise ValueError("cannot infer the expected batch size: give the data loader a batch_size")
    return batch_size


def pad_to(batch, multiple: int):
    """batch with zero rows appended up to a multiple of `multiple` rows (an empty batch: to
    `multiple`)."""
    rows = _rows(batch)
    return _pad(batch, max(multiple, -(-rows // multiple) * multiple) - rows)


def check_pad_to_multiple(pad_to_multiple, privatized_module) -> None:
    if pad_to_multiple is None:
        return
    if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple <= 0:
        raise ValueError(f"pad_to_multiple must be a positive int, got {pad_to_multiple!r}")
    if privatized_module is None:
        raise ValueError(
            "padding rows must get weight 0 in the privatized module's backward: pass "
            "privatized_module=pm with pad_to_multiple= (or use fxclip.make_private(..., "
            "pad_to_multiple=k), which connects them)")


def _pad(x, extra: int):
    """x with `extra` zero rows appended along dim 0 (every tensor of a nested batch)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]) if extra else x
    if isinstance(x, dict):
        return type(x)({k: _pad(v, extra) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_pad(v, extra) for v in x))
    return type(x)(_pad(v, extra) for v in x)


def micro_batches(batch, max_size: int):
    """Splits a (possibly nested) batch along dim 0 into chunks of at most max_size rows, for
    gradient accumulation: backward on each chunk, then one DPOptimizer.step() for the whole
    Poisson batch. An empty batch yields nothing (step() still adds noise)."""
    if max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    n = _rows(batch)
    for start in range(0, n, max_size):
        yield _slice(batch, start, start + max_size)


def _rows(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    items = list(x.values()) if isinstance(x, dict) else list(x)
    return _rows(items[0])


def _slice(x, a, b):
    if isinstance(x, torch.Tensor):
        return x[a:b]
    if isinstance(x, dict):
        return type(x)({k: _slice(v, a, b) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_slice(v, a, b) for v in x))
    return type(x)(_slice(v, a, b) for v in x)
