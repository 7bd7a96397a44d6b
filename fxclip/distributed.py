"""Data-parallel DP-SGD on torch.distributed: the clipped sum of the union of the ranks' batches,
noise added once, Poisson sampling per rank, accounting on the global sample rate.

Under data parallelism every sample lives on one rank, so its per-sample norm is computed where
it lives (one privatized graph per rank, no communication inside the graph); only the clipped
gradient SUMS are reduced. Three ways to reduce, all with torch.distributed's own collectives:

- plain (recommended): every rank runs the privatized module (eager or torch.compile'd, one
  graph, no DDP); DistributedDPOptimizer.step() lets rank 0 add the noise to its clipped sum and
  then all-reduces (SUM) the gradients, Opacus's scheme. One all-reduce per step, after backward.
- DDP: fxclip.distributed.DistributedDataParallel(pm) -- torch's DDP whose gradient buckets are
  summed (not averaged) during backward and whose forward keeps the privatized graph whole
  (torch._dynamo's DDP graph split off for this module only). Every rank then holds the clipped
  sum; rank 0 draws the noise and broadcasts it, so the replicas stay identical.
- FSDP2 (torch.distributed.fsdp.fully_shard): gradients are reduce-scattered (summed) during
  backward; every rank adds noise to the shard it owns, so each coordinate is noised exactly
  once, by its owner, with a rank-distinct generator.

In all three the noise std on the global sum is sigma * C (not sqrt(world_size) times it) and
the update is divided by the GLOBAL expected batch size q * N.

Per-block privatization (torchtitan-style per-block compilation, FSDP2 per block): see
privatize_blocks, which gives each block b a bound C_b with sqrt(sum_b C_b^2) = C.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from .make_private import make_private as _make_private
from .optim import DPOptimizer, _privatized_parts, _unwrap
from .passes import _torch
from .passes.protocol import DeviceState
from .passes.refusals import refusal
from .privatize import _clipping_groups, privatize
from .sampling import PoissonBatchSampler, PoissonDataLoader, rank_generator

__all__ = ["DistributedDataParallel", "DistributedDPOptimizer", "DistributedPoissonBatchSampler",
           "DistributedPoissonDataLoader", "make_private", "privatize_blocks", "rank_generator"]


def _rank_world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fxclip.distributed needs an initialized default process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


# --------------------------------------------------------------------------------------------
# Poisson sampling per rank: fxclip.sampling's sampler and loader with rank and world_size
# --------------------------------------------------------------------------------------------

class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """PoissonBatchSampler of `rank`'s disjoint shard, with the GLOBAL sample rate (kept for
    compatibility; PoissonBatchSampler(..., rank=, world_size=) is the same)."""

    def __init__(self, num_samples: int, sample_rate: float, *, rank: int, world_size: int,
                 num_batches: int | None = None, generator: torch.Generator | None = None):
        super().__init__(num_samples, sample_rate, num_batches, generator, rank=rank,
                         world_size=world_size)


class DistributedPoissonDataLoader(PoissonDataLoader):
    """PoissonDataLoader over this rank's Poisson share of the global batch; rank and
    world_size default to the process group's. `sample_rate` is the GLOBAL rate q and
    `expected_batch_size` the global q * len(dataset), which DistributedDPOptimizer divides by."""

    def __init__(self, dataset: Dataset, sample_rate: float, *, rank: int | None = None,
                 world_size: int | None = None, **kwargs):
        if rank is None or world_size is None:
            rank, world_size = _rank_world()
        super().__init__(dataset, sample_rate, rank=rank, world_size=world_size, **kwargs)


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------

def _sum_hook(process_group, bucket):
    """DDP communication hook: all-reduce SUM (torch's default hook averages)."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP around a privatized module (eager, or torch.compile'd before wrapping).

    Differences from torch's DDP, both needed for exact DP-SGD:
    - gradient buckets are SUMMED across ranks, not averaged: every rank ends up with the clipped
      sum over the global batch (DistributedDPOptimizer then noises it and divides by the global
      expected batch size);
    - Dynamo compiles the privatized module as one graph inside this DDP's forward (its
      optimize_ddp graph split at bucket boundaries would give several graphs, each clipping with
      its own partial norm; fxclip refuses that as a graph break).
    Wrap `DistributedDataParallel(torch.compile(pm))`, not `torch.compile(DistributedDataParallel(pm))`.
    Every rank must run forward and backward every step (an empty batch included: privatized
    modules give exact zero gradients for B = 0), as with any DDP model.
    """

    def __init__(self, module: nn.Module, *args, **kwargs):
        if not _privatized_parts(module):
            raise TypeError("fxclip.distributed.DistributedDataParallel wraps a module from "
                            "fxclip.privatize (or privatize_blocks)")
        super().__init__(module, *args, **kwargs)
        self.register_comm_hook(self.process_group, _sum_hook)

    def forward(self, *args, **kwargs):
        with _torch.no_ddp_graph_split():
            return super().forward(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------

def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _bucketed(tensors):
    """Group tensors by (dtype, device) for one collective per group."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups.values()


def _flat_collective(tensors, fn) -> None:
    """Run fn(flat) on the concatenation of `tensors` (one call per dtype) and copy back."""
    for group in _bucketed(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        fn(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class DistributedDPOptimizer(DPOptimizer):
    """DPOptimizer for data parallelism: step() produces on every rank the update gradient

        (sum over ALL ranks' samples of R_i grad_i + N(0, sigma^2 C^2)) / expected_batch_size

    with the noise drawn once globally. `expected_batch_size` is the GLOBAL expected batch
    size q * N, `sample_rate` the global q. How the clipped sums are reduced depends on what
    `privatized_module` is (see the module docstring):

    - a privatized module (optionally torch.compile'd), no DDP/FSDP: rank 0 adds the noise to its
      local clipped sum, then one all-reduce (SUM) of the gradients, in step();
    - fxclip.distributed.DistributedDataParallel: DDP summed during backward; rank 0 noises its
      copy of the global sum and broadcasts it in step();
    - a model sharded with fully_shard (DTensor parameters): FSDP2 reduce-scattered during
      backward (this optimizer sets its gradient divide factor to 1 and SUM collectives, i.e. the
      sum); each rank noises
      its own shard with a rank-distinct generator. Needs loss_reduction="sum" in the privatized
      modules (FSDP2 reduces inside backward, before the per-rank 1/B_local of "mean" can be
      undone); give this optimizer loss_reduction="mean" to divide by the expected batch size.

    Construction and step() are collective: every rank must call them, the same number of
    times (a rank with an empty batch still calls step(); it may skip forward/backward except
    under DDP, which needs every rank's backward). In the plain mode the constructor broadcasts
    rank 0's parameters and buffers so the replicas start equal.

    Everything else is DPOptimizer's one implementation; only four methods differ (who adds
    noise, how the sums are combined, the step's state read summed over the ranks so that every
    rank refuses or skips the same step, adaptive clipping's count noise drawn once).

    Noise: rank 0 draws all of it in the plain and DDP modes (a rank other than 0 never holds
    noise, so no rank can subtract "its" part); `generator` is then rank 0's. secure_rng=True
    draws from os.urandom. Under FSDP each rank draws its shard's noise from
    rank_generator(generator, rank) (os.urandom-seeded when generator is None), never from
    torch's global RNG, which is commonly seeded identically on every rank.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, privatized_module: nn.Module, *,
                 noise_multiplier: float, expected_batch_size: int, process_group=None, **kwargs):
        super().__init__(optimizer, privatized_module, noise_multiplier=noise_multiplier,
                         expected_batch_size=expected_batch_size, **kwargs)
        self.rank, self.world_size = _rank_world(process_group)
        self.process_group = process_group
        self._root_rank = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        if isinstance(privatized_module, torch.nn.parallel.DistributedDataParallel):
            if not isinstance(privatized_module, DistributedDataParallel):
                raise TypeError(
                    "wrap the privatized module in fxclip.distributed.DistributedDataParallel, not "
                    "torch's: torch's averages the clipped sums across ranks and splits the compiled "
                    "graph at bucket boundaries")
            self.mode = "ddp"
            self.process_group = privatized_module.process_group
            self._root_rank = dist.get_global_rank(self.process_group, 0) \
                if self.process_group is not None else 0
        elif any(_is_dtensor(p) for p in self._params):
            if not all(_is_dtensor(p) for p in self._params):
                raise ValueError("some but not all trainable parameters are sharded (DTensor): shard "
                                 "the whole privatized model with fully_shard")
            if any(p.loss_reduction != "sum" for p in self._parts):
                raise ValueError(
                    "with FSDP2 privatize with loss_reduction=\"sum\" (and sum the loss): FSDP "
                    "reduce-scatters the gradients inside backward, before the per-rank 1/B_local of "
                    "\"mean\" can be undone. Pass loss_reduction=\"mean\" to this optimizer to "
                    "divide the update by the global expected batch size.")
            self.mode = "fsdp"
            root = _unwrap(privatized_module)
            for m in root.modules():
                if hasattr(m, "set_gradient_divide_factor"):
                    m.set_gradient_divide_factor(1.0)
                    # plain SUM collectives (gloo has no PREMUL_SUM; the factor is 1 anyway)
                    m.set_force_sum_reduction_for_comms(True)
            if not self.secure_rng:
                self.generator = rank_generator(self.generator, self.rank, stream=1)
                self.noise_source = self._new_noise_source()
        else:
            self.mode = "allreduce"
            root = _unwrap(privatized_module)
            with torch.no_grad():
                _flat_collective(
                    [t for t in list(root.parameters()) + list(root.buffers()) if t.numel()],
                    lambda flat: dist.broadcast(flat, src=self._root_rank, group=self.process_group))

    # --- the places where several processes differ from one (see DPOptimizer) ---
    def _adds_noise(self) -> bool:
        # rank 0 alone in the replicated modes; under FSDP2 every rank, on the shard it owns
        return self.mode == "fsdp" or self.rank == 0

    def _combine_sums(self, accs: list) -> None:
        if self.mode == "allreduce":  # rank 0's sum carries the noise: the SUM is the update
            _flat_collective(accs, lambda flat: dist.all_reduce(flat, group=self.process_group))
        elif self.mode == "ddp":  # every rank holds the global sum already: take rank 0's, noised
            _flat_collective(accs, lambda flat: dist.broadcast(flat, src=self._root_rank,
                                                               group=self.process_group))
        # fsdp: every coordinate lives on (and was noised by) its shard's owner

    def _read_states(self, found_inf, has_grad: bool) -> tuple[dict, dict]:
        # every rank decides the step (refuse, skip, train) on the same numbers: the vector is
        # all-reduced (SUM) before the one read, so a flag raised on any rank is > 0 on all
        state = self._device_state()
        no_backward = (state[DeviceState.INDEX["backwards"]] == 0) & has_grad
        # a GradScaler that saw no gradient on this rank (empty batch) passes found_inf = 0
        inf = torch.as_tensor(0.0 if found_inf is None else found_inf).reshape(1)
        local = torch.cat([state, inf.to(state), no_backward.reshape(1).to(state)])
        total = local.clone()
        dist.all_reduce(total, group=self.process_group)
        values = torch.cat([local, total]).tolist()
        names = DeviceState.FIELDS + ("found_inf", "no_backward")
        return dict(zip(names, values)), dict(zip(names, values[len(names):]))

    def _shared_normal(self, std: float) -> float:
        z = torch.tensor([super()._shared_normal(std) if self.rank == 0 else 0.0], dtype=torch.float64)
        dist.broadcast(z, src=self._root_rank, group=self.process_group)
        return float(z)


# --------------------------------------------------------------------------------------------
# per-block privatization
# --------------------------------------------------------------------------------------------

def _load_plain_keys(module, state_dict, prefix, *args):
    """State-dict pre-hook of a privatized block: accept the plain model's keys (no "module.")."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)


def privatize_blocks(model: nn.Module, blocks: list[str], *, max_grad_norm: float,
                     loss_reduction: str = "mean", clipping="flat", **kwargs) -> nn.Module:
    """Privatize each named submodule of `model` on its own, in place; returns `model`.

    For per-block compilation (`block.compile()` / torch.compile per block, as torchtitan does)
    and FSDP2 per block: every block is its own graph, so its per-sample norm can only cover its
    own parameters. Block b (holding G_b clipping groups of `clipping` -- "flat": one group,
    "per_layer": one per module, or lists of parameter names of `model`, each inside one block)
    is clipped to C_b = C * sqrt(G_b / G), G = sum_b G_b, so every group gets C / sqrt(G) and
    sqrt(sum_b C_b^2) = C: the sample's whole gradient still has norm <= C, the sensitivity the
    noise is calibrated for (DPOptimizer reads it from the blocks).

    Every trainable parameter of `model` must be in exactly one block (refused otherwise: it would
    get an unclipped gradient). The code BETWEEN blocks (the parent's forward) is not traced by
    fxclip: it must keep samples apart (no batch statistics, no mixing over dim 0), and every
    block's inputs and outputs must have the batch in dim 0.
    """
    if not blocks:
        raise ValueError("name at least one block")
    C = float(max_grad_norm)
    modules = dict(model.named_modules())
    unknown = [b for b in blocks if b not in modules or b == ""]
    if unknown:
        raise ValueError(f"no submodule named {unknown} (model.named_modules(); the root itself: "
                         "use fxclip.privatize)")
    for a in blocks:
        for b in blocks:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"blocks {a!r} and {b!r} overlap")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    covered = {f"{b}.{n}": b for b in blocks for n, p in modules[b].named_parameters()
               if p.requires_grad}
    missing = sorted(trainable - set(covered))
    if missing:
        raise refusal("parameters-outside-blocks", missing=missing)

    local_clipping, group_count = {}, {}
    for b in blocks:
        block = modules[b]
        if isinstance(clipping, (list, tuple)) and not isinstance(clipping, str):
            local = []
            for group in clipping:
                inside = [n[len(b) + 1:] for n in group if n.startswith(b + ".")]
                if inside and len(inside) != len(group):
                    raise ValueError(f"clipping group {group} spans several blocks; each group must "
                                     "lie inside one block")
                if inside:
                    local.append(inside)
            local_clipping[b] = local
        else:
            local_clipping[b] = clipping
        names = [n for n, p in block.named_parameters() if p.requires_grad]
        labels = _clipping_groups(block, local_clipping[b])
        group_count[b] = len({labels[n] for n in names})
    total = sum(group_count.values())
    for b in blocks:
        if group_count[b] == 0:  # frozen block: nothing to clip
            continue
        parent_name, _, child = b.rpartition(".")
        parent = modules[parent_name]
        pb = privatize(modules[b], max_grad_norm=C * math.sqrt(group_count[b] / total),
                       loss_reduction=loss_reduction, clipping=local_clipping[b], **kwargs)
        pb._register_load_state_dict_pre_hook(_load_plain_keys, with_module=True)
        setattr(parent, child, pb)
    return model


# --------------------------------------------------------------------------------------------
# make_private
# --------------------------------------------------------------------------------------------

def make_private(*args, **kwargs):
    """fxclip.make_private(..., distributed=True): kept for compatibility. Call it on every rank
    (it is collective); see fxclip.make_private for the arguments."""
    kwargs.setdefault("distributed", True)
    return _make_private(*args, **kwargs)
