"""make_private: the one-call setup Opacus users know, on top of privatize + DPOptimizer, for one
process or several (torchrun): the same function, the same options."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from .optim import DPOptimizer
from .privatize import privatize
from .sampling import PoissonDataLoader, loader_batch_size


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: int | None = None,
    max_grad_norm: float,
    loss_reduction: str = "mean",
    poisson_sampling: bool = True,
    generator: torch.Generator | None = None,
    secure_rng: bool = False,
    prefetch_noise: bool = False,
    noise_rng: str = "torch",
    accountant: str = "rdp",
    loss_fn=None,
    grad_scaler=None,
    pad_to_multiple: int | None = None,
    adaptive_clipping=None,
    nonfinite: str = "refuse",
    distributed: bool | None = None,
    process_group=None,
    ddp: bool = False,
    privacy_unit: str = "example",
    user_ids=None,
    max_rows_per_user: int | None = None,
    **privatize_options,
):
    """Returns (privatized module, DPOptimizer, data loader) ready for DP-SGD.

    Give either `noise_multiplier`, or `target_epsilon` + `target_delta` + `epochs` (the noise
    multiplier is then calibrated with dp_accounting so that training for `epochs` epochs of the
    returned loader spends exactly the target).

    The loader is a Poisson-sampling loader over `data_loader`'s dataset with sample rate
    q = data_loader.batch_size / len(dataset) and expected batch size data_loader.batch_size;
    an epoch is round(1/q) batches. `generator` seeds both the sampling and the noise (tests,
    experiments); real deployments should use secure_rng=True for the noise. prefetch_noise=True
    draws each step's noise ahead on a worker thread (CPU; see DPOptimizer); noise_rng="philox"
    draws it from a counter-based stream about twice as fast on CPU (fxclip.philox).

    loss_fn(output, target) -> per-sample losses (B,): the loss is traced with the model and
    checked (see fxclip.privatize); train with `pm(x, target=y).mean()` (or .sum() for
    loss_reduction="sum"). grad_scaler: the GradScaler of an fp16 loop. pad_to_multiple=k pads
    every Poisson batch to a multiple of k rows with weight-0 rows (fixed shapes for compiled
    and CUDA graphs; same update). adaptive_clipping: an fxclip.AdaptiveClipping. Other keyword
    arguments (clipping=, ...) go to fxclip.privatize.

    privacy_unit="user" (user-level DP, docs/privacy-units.md): `user_ids` gives each row of the
    dataset its user (ints or strings); the loader samples USERS, each with probability
    q = batch_size / number of users, with all their rows or at most `max_rows_per_user` of
    them, and tells the module each batch's users; the module clips each user's summed gradient
    (unit_reduction="sum", or "mean") to C; the optimizer divides by the expected number of
    users per batch (data_loader.batch_size, per rank); epsilon is user-level. The loop is
    unchanged; a training forward without the loader's ids, or a batch split over several
    backwards, is refused.

    poisson_sampling=False keeps `data_loader` as is. The accountant still assumes Poisson
    sampling, so epsilon is then a heuristic, not a guarantee.

    Several processes (torchrun): with an initialized process group of more than one rank (or
    distributed=True, or process_group=), call it on every rank (it is collective). Then
    `data_loader.batch_size` is the expected batch PER RANK (as with DistributedSampler): the
    global expected batch is B = batch_size * world_size and q = B / len(dataset), which the
    accountant uses. Each rank Poisson-samples its disjoint shard with q, the clipped sums are
    reduced, the noise is added once, and every option above works as in one process. The
    optimizer is a fxclip.distributed.DistributedDPOptimizer; ddp=True wraps the module in
    fxclip.distributed.DistributedDataParallel. distributed=False trains one independent model
    per rank (each spends its own epsilon).
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier= or target_epsilon= (with target_delta= "
                         f"and epochs=); got noise_multiplier={noise_multiplier!r}, "
                         f"target_epsilon={target_epsilon!r}")
    if target_epsilon is not None and (target_delta is None or epochs is None):
        raise ValueError("target_epsilon needs target_delta= and epochs= to calibrate the noise")
    if noise_multiplier is not None and epochs is not None:
        raise ValueError("epochs= is only used with target_epsilon=; with noise_multiplier= just "
                         "train as long as you like and read opt.epsilon(delta)")
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if pad_to_multiple is not None and not poisson_sampling:
        raise ValueError("pad_to_multiple pads Poisson batches: it needs poisson_sampling=True")
    if privacy_unit not in ("example", "user"):
        raise ValueError(f"privacy_unit must be 'example' or 'user', got {privacy_unit!r}")
    by_user = privacy_unit == "user"
    if by_user and (user_ids is None or not poisson_sampling):
        raise ValueError("privacy_unit=\"user\" samples users: it needs user_ids= (one per row of the "
                         "dataset) and poisson_sampling=True")
    if not by_user and (user_ids is not None or max_rows_per_user is not None):
        raise ValueError("user_ids= and max_rows_per_user= are for privacy_unit=\"user\"")
    rank, world = _rank_and_world(distributed, process_group)
    if ddp and world is None:
        raise ValueError("ddp=True needs several processes (an initialized process group)")
    ranks = world or 1
    batch_size = loader_batch_size(data_loader) * ranks  # the global expected batch (of units)

    pm = privatize(model, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction, loss_fn=loss_fn,
                   grad_scaler=grad_scaler, nonfinite=nonfinite, **privatize_options)
    if by_user:
        loader = _user_loader(data_loader, user_ids, batch_size, pm, generator=generator,
                              max_rows_per_user=max_rows_per_user, pad_to_multiple=pad_to_multiple,
                              rank=rank or 0, world_size=ranks)
    elif poisson_sampling:
        loader = PoissonDataLoader.from_data_loader(data_loader, generator=generator,
                                                    pad_to_multiple=pad_to_multiple, privatized_module=pm,
                                                    rank=rank or 0, world_size=ranks)
    else:
        loader = data_loader
    sample_rate = loader.sample_rate if by_user else batch_size / len(data_loader.dataset)

    from .accounting import Accountant, noise_multiplier_for  # dp_accounting: at first use

    if target_epsilon is not None:
        if not (isinstance(epochs, (int, float)) and epochs > 0):
            raise ValueError(f"epochs must be positive, got {epochs!r}")
        steps = int(round(epochs * len(loader)))
        noise_multiplier = noise_multiplier_for(target_epsilon, target_delta, sample_rate, steps,
                                                mechanism=accountant)

    options = dict(noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
                   sample_rate=sample_rate, generator=None if secure_rng else generator,
                   secure_rng=secure_rng, prefetch_noise=prefetch_noise, noise_rng=noise_rng,
                   accountant=Accountant(accountant),
                   adaptive_clipping=adaptive_clipping)
    if world is None:
        return pm, DPOptimizer(optimizer, pm, **options), loader
    from . import distributed as fxd

    module = fxd.DistributedDataParallel(pm, process_group=process_group) if ddp else pm
    opt = fxd.DistributedDPOptimizer(optimizer, module, process_group=process_group, **options)
    return module, opt, loader


def _user_loader(data_loader: DataLoader, user_ids, batch_size: int, pm, *, rank: int, world_size: int,
                 **options):
    """A UserPoissonDataLoader over data_loader's dataset and options; q = expected users per
    batch / number of users. The module then requires unit ids at every training forward."""
    from .user_sampling import UserIndex, UserPoissonDataLoader

    users = UserIndex(user_ids)
    if batch_size > users.num_users:
        raise ValueError(f"batch_size {batch_size // world_size} x {world_size} rank(s) is the expected number "
                         f"of users per batch; it exceeds the {users.num_users} users")
    loader = UserPoissonDataLoader(
        data_loader.dataset, users, batch_size / users.num_users, privatized_module=pm, rank=rank,
        world_size=world_size, collate_fn=data_loader.collate_fn, num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory, timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn, **options)
    pm.requires_units = True
    return loader


def _rank_and_world(distributed: bool | None, process_group) -> tuple[int | None, int | None]:
    """(rank, world size) for data parallelism, or (None, None) for one process: several
    processes when asked (distributed=True, a process_group), or by default when a process
    group of more than one rank is initialized."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = process_group is not None or (initialized and dist.get_world_size() > 1)
    if not distributed:
        return None, None
    if not initialized:
        raise RuntimeError("distributed=True needs an initialized process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(process_group), dist.get_world_size(process_group)
