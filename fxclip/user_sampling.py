"""User-level Poisson sampling: each USER joins each batch independently with probability q,
with all of their rows or a random subset of at most `max_rows_per_user` of them.

With unit-level clipping (one unit = one user, docs/privacy-units.md) this is the sampling that
user-level DP-SGD accounting assumes: PoissonSampledDpEvent over users with rate q, each step's
release having sensitivity C per user. The cap bounds the work one user brings to a batch (and
biases training towards users with few rows); it never changes the privacy guarantee, which
holds for any rows a user contributes.

Several processes: rank r of W draws only the users whose dense index u has u % W == r, each
with the global rate q, so a user's rows never span processes and the union over the ranks is
one Poisson sample of users.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate as _default_collate

from .sampling import _EmptyAwareCollate, _rows, check_pad_to_multiple, membership_blocks, pad_to, rank_generator


class UserIndex:
    """The rows of each user: users are numbered 0..U-1 (dense, in sorted order of their ids)."""

    def __init__(self, user_ids: Sequence):
        ids = np.asarray(user_ids.cpu() if isinstance(user_ids, torch.Tensor) else user_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"user_ids must be one id per row of a non-empty dataset, got shape {ids.shape}")
        _, self.user_of_row = np.unique(ids, return_inverse=True)  # row -> dense user
        self.rows_by_user = np.argsort(self.user_of_row, kind="stable")  # rows, grouped by user
        self.counts = np.bincount(self.user_of_row)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def __len__(self) -> int:
        return len(self.user_of_row)

    @property
    def num_users(self) -> int:
        return len(self.counts)

    def rows_of(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, position of each row inside its user's run) of `users`, grouped by user."""
        counts = self.counts[users]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.rows_by_user[np.repeat(self.starts[users], counts) + within], within


class UserPoissonBatchSampler(Sampler[list[int]]):
    """Yields `num_batches` index lists: each user (of this rank's share) is in a batch with
    probability `sample_rate`, with all of their rows, or `max_rows_per_user` of them drawn
    uniformly without replacement (new at every inclusion) when they have more."""

    def __init__(self, users: UserIndex, sample_rate: float, num_batches: int | None = None,
                 generator: torch.Generator | None = None, *, max_rows_per_user: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if max_rows_per_user is not None and (isinstance(max_rows_per_user, bool)
                                              or not isinstance(max_rows_per_user, int) or max_rows_per_user <= 0):
            raise ValueError(f"max_rows_per_user must be a positive int or None, got {max_rows_per_user!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.users = users
        self.sample_rate = sample_rate
        self.max_rows_per_user = max_rows_per_user
        self.num_batches = max(1, round(1 / sample_rate)) if num_batches is None else num_batches
        self.mine = np.arange(rank, users.num_users, world_size)  # this rank's users
        self.generator = generator if world_size == 1 else rank_generator(generator, rank)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for mask in membership_blocks(self.num_batches, len(self.mine), self.sample_rate, self.generator):
            for row in mask.numpy():
                yield self._rows(self.mine[row]).tolist()

    def _rows(self, users: np.ndarray) -> np.ndarray:
        rows, within = self.users.rows_of(users)
        cap = self.max_rows_per_user
        if cap is None or not (self.users.counts[users] > cap).any():
            return rows
        # a uniform subset of cap rows per user: rank each user's rows by a uniform key
        keys = torch.rand(len(rows), generator=self.generator).numpy()
        group = np.repeat(np.arange(len(users)), self.users.counts[users])
        order = np.lexsort((keys, group))
        return rows[order][within < cap]


class _WithIndex(Dataset):
    """dataset[i] as (i, item): the loader learns which rows (so which users) a batch holds,
    also when workers collate it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _IndexCollate:
    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs):
        return torch.tensor([i for i, _ in pairs], dtype=torch.long), self.collate([x for _, x in pairs])


class UserPoissonDataLoader(DataLoader):
    """A DataLoader of user-level Poisson batches of `dataset`, whose row i belongs to user
    `user_ids[i]` (any ids numpy can sort: ints, strings; or a UserIndex of them).

    Before yielding a batch it gives `privatized_module` the batch's unit ids (each row's user),
    so the module clips each user's summed gradient to C; a training forward on anything but the
    whole batch is refused. `expected_batch_size` is the expected number of USERS per batch
    (q * number of users), which DPOptimizer divides by. pad_to_multiple=k pads every batch with
    weight-0 rows as PoissonDataLoader does. Other DataLoader options pass through.
    """

    def __init__(self, dataset: Dataset, user_ids: Sequence, sample_rate: float, *, privatized_module,
                 max_rows_per_user: int | None = None, num_batches: int | None = None,
                 generator: torch.Generator | None = None, collate_fn=None, pad_to_multiple: int | None = None,
                 rank: int = 0, world_size: int = 1, **kwargs):
        for k in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if kwargs.get(k) not in (None, False):
                raise ValueError(f"{type(self).__name__} chooses its own batches; do not pass {k}=")
            kwargs.pop(k, None)
        if privatized_module is None:
            raise ValueError("a user-level loader must tell the privatized module each batch's users: "
                             "pass privatized_module=pm (make_private(..., privacy_unit=\"user\") does)")
        if len(user_ids) != len(dataset):
            raise ValueError(f"user_ids has {len(user_ids)} entries for {len(dataset)} rows: give one per row")
        check_pad_to_multiple(pad_to_multiple, privatized_module)
        self.users = user_ids if isinstance(user_ids, UserIndex) else UserIndex(user_ids)
        sampler = UserPoissonBatchSampler(self.users, sample_rate, num_batches, generator,
                                          max_rows_per_user=max_rows_per_user, rank=rank, world_size=world_size)
        collate = _IndexCollate(collate_fn or _default_collate)
        indexed = _WithIndex(dataset)
        super().__init__(indexed, batch_sampler=sampler, collate_fn=_EmptyAwareCollate(indexed, collate), **kwargs)
        self.sample_rate = sample_rate
        self.max_rows_per_user = max_rows_per_user
        self.expected_batch_size = sample_rate * self.users.num_users
        self.pad_to_multiple = pad_to_multiple
        self.privatized_module = privatized_module

    @property
    def num_users(self) -> int:
        return self.users.num_users

    def __iter__(self):
        from .optim import _unwrap

        pm = _unwrap(self.privatized_module)
        user_of_row = torch.from_numpy(self.users.user_of_row)
        try:
            for index, batch in super().__iter__():
                ids = user_of_row[index]
                if self.pad_to_multiple is not None:
                    pm.set_valid_rows(_rows(batch))
                    batch, ids = pad_to(batch, self.pad_to_multiple), pad_to(ids, self.pad_to_multiple)
                pm.set_unit_ids(ids.to(pm.device_state.tensor.device))
                yield batch
        finally:  # batches from elsewhere bring their own ids, and are all real
            pm.set_unit_ids(None)
            if self.pad_to_multiple is not None:
                pm.set_valid_rows(float("inf"))
