"""Poisson batches for the Trainer loop: each logical batch split into micro-batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..sampling import PoissonBatchSampler


class PoissonMicroBatchSampler(Sampler[list[int]]):
    """Yields `micro_batches` index lists per Poisson draw (some may be empty).

    transformers' Trainer takes one optimizer step per `gradient_accumulation_steps` batches, so
    splitting each draw into exactly that many pieces makes one step = one Poisson batch.
    The generator's state at the start of the current epoch is kept: a run resumed mid-epoch
    restores it, and the Trainer's skip of the batches already trained re-draws them.
    rank/world_size: this process's disjoint shard, drawn with the global `sample_rate` from a
    generator of its own (fxclip.sampling.PoissonBatchSampler).
    """

    def __init__(self, num_samples: int, sample_rate: float, micro_batches: int, generator: torch.Generator,
                 *, rank: int = 0, world_size: int = 1):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.batches = PoissonBatchSampler(num_samples, sample_rate, generator=generator, rank=rank,
                                           world_size=world_size)
        self.micro_batches = micro_batches
        self.generator = self.batches.generator  # this rank's
        self.epoch_start_state = generator.get_state()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return len(self.batches) * self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch_start_state = self.generator.get_state()
        for indices in self.batches:
            for piece in np.array_split(np.asarray(indices, dtype=np.int64), self.micro_batches):
                yield piece.tolist()

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start_state, "now": self.generator.get_state()}

    def load_state_dict(self, state: dict, *, mid_epoch: bool) -> None:
        """mid_epoch: the Trainer will skip the batches already trained in this epoch, so go back
        to the epoch's start; otherwise continue where the checkpoint stopped."""
        self.generator.set_state(state["epoch_start"] if mid_epoch else state["now"])
