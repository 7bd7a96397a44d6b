"""fxclip data-parallel DP-SGD on 2 (or more) processes, CPU and gloo.

    torchrun --nproc_per_node 2 examples/ddp.py              # about 20 s on 2 CPU cores
    torchrun --nproc_per_node 2 examples/ddp.py --ddp        # torch's DDP machinery (fxclip's subclass)
    torchrun --nproc_per_node 2 examples/ddp.py --compile    # torch.compile'd privatized module

(fxclip.make_private(model, optimizer, loader, ...) does the same set-up in one call: under
torchrun it detects the process group.)
Every rank Poisson-samples its own shard of the dataset (global sample rate q = world_size *
batch_size / N), clips per sample in its privatized graph, the clipped sums are reduced across
ranks, the noise N(0, sigma^2 C^2) is added once (by rank 0) and the update is divided by the
global expected batch size. The accountant runs on the global q: epsilon is that of one
process training on the union of the ranks' batches.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fxclip
import fxclip.distributed as fxd
from fxclip import noise_multiplier_for


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="expected Poisson batch size PER RANK")
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--ddp", action="store_true", help="wrap in fxclip.distributed.DistributedDataParallel")
    p.add_argument("--compile", action="store_true", help="torch.compile the privatized module")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def blobs(n=4000, d=20, classes=4, seed=0):
    """A small synthetic classification task, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4]), TensorDataset(x[n * 3 // 4:], y[n * 3 // 4:])


def main():
    args = parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    train, test = blobs(seed=args.seed)

    torch.manual_seed(args.seed)  # the optimizer (or DDP) broadcasts rank 0's weights anyway
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 4))
    q = args.batch_size * world / len(train)  # the GLOBAL sample rate
    sigma = noise_multiplier_for(args.epsilon, args.delta, q, steps=args.epochs * round(1 / q))
    seed = torch.Generator().manual_seed(args.seed)  # reproducible; real runs: secure_rng=True, no seed

    pm = fxclip.privatize(model, max_grad_norm=args.max_grad_norm, loss_reduction="mean")
    module = torch.compile(pm) if args.compile else pm        # one graph per rank
    if args.ddp:
        module = fxd.DistributedDataParallel(module)          # buckets summed, graph kept whole
    opt = fxd.DistributedDPOptimizer(                         # reduces, noises once, / global B
        torch.optim.SGD(model.parameters(), lr=args.lr), module, noise_multiplier=sigma,
        expected_batch_size=args.batch_size * world, sample_rate=q, generator=seed)
    loader = fxd.DistributedPoissonDataLoader(train, q, generator=seed)  # this rank's shard
    if rank == 0:
        print(f"{world} ranks, global q = {opt.sample_rate:.4f}, expected global batch "
              f"{opt.expected_batch_size}, sigma = {opt.noise_multiplier:.3f}, "
              f"mode = {opt.mode}{' + compile' if args.compile else ''}")

    start = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            # an empty Poisson batch still runs forward/backward (exact zero gradients): DDP needs
            # every rank's backward; the plain mode would also allow skipping it
            F.cross_entropy(module(x), y).backward()
            opt.step()  # collective: every rank, every step
        if rank == 0:
            with torch.no_grad():
                acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
            print(f"epoch {epoch + 1}: test accuracy {acc:.3f}, last global batch {opt.last_batch_size} "
                  f"(this rank {opt.last_local_batch_size}), epsilon {opt.epsilon(args.delta):.2f}")

    same = torch.stack([p.detach().flatten().sum() for p in model.parameters()])
    ref = same.clone()
    dist.broadcast(ref, src=0)
    assert torch.equal(same, ref), "replicas diverged"
    if rank == 0:
        print(f"{opt.steps} steps in {time.perf_counter() - start:.1f} s; replicas identical; "
              f"(epsilon, delta) = ({opt.epsilon(args.delta):.2f}, {args.delta})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
