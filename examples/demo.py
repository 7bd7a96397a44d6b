"""fxclip demo: DP-SGD on scikit-learn's bundled handwritten digits (no download).

    python examples/demo.py            # about a minute on 2 CPU cores

Trains the same small MLP twice, privately (fxclip: per-sample clipping compiled into one
backward, Gaussian noise, Poisson sampling, dp_accounting) and non-privately, then prints the
test accuracies, the privacy spent, how many per-sample gradients were clipped, and the time
per step of the private vs the plain torch.compile'd training step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fxclip.make_private import make_private


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilon", type=float, default=3.0, help="target epsilon for the whole run")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=300)
    return p.parse_args()


def load_data(seed):
    digits = load_digits()  # 1797 8x8 images shipped with scikit-learn
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values 0..16
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return TensorDataset(x_tr, y_tr), (x_te, y_te)


def make_model(seed):
    torch.manual_seed(seed)  # both runs start from the same weights
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def per_sample_loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def train_private(args, train, test):
    model = make_model(args.seed)
    pm, opt, loader = make_private(
        model, torch.optim.SGD(model.parameters(), lr=args.lr), DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, generator=torch.Generator().manual_seed(args.seed),
        noise_rng="philox",  # fxclip's counter-based CPU noise stream: about twice torch's speed
        loss_fn=per_sample_loss)  # the loss is traced with the model and checked per sample
    step_model = torch.compile(pm)  # the clipping pass runs inside Inductor's joint graph
    clipped = seen = 0
    eps = 0.0
    bar = tqdm(total=args.epochs * len(loader), desc="private", unit="step")
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            if len(y):  # an empty Poisson batch has no loss; step() still adds noise and counts
                loss = step_model(x, target=y).mean()
                loss.backward()
                clipped += (pm.per_sample_norms > args.max_grad_norm).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss.item():.3f}", eps=f"{eps:.2f}", refresh=False)
            opt.step()
            bar.update()
        eps = opt.epsilon(args.delta)  # once per epoch: accounting is cheap but not free
        bar.set_postfix(test_acc=f"{accuracy(model, *test):.3f}", eps=f"{eps:.2f}")
    bar.close()
    return model, step_model, opt, clipped / max(seen, 1)


def train_plain(args, train, test):
    model = make_model(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr / 4)  # no noise: a smaller step suits better
    step_model = torch.compile(model)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    bar = tqdm(total=args.epochs * len(loader), desc="plain  ", unit="step")
    for _ in range(args.epochs):
        for x, y in loader:
            opt.zero_grad()
            out = step_model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(out.argmax(1) == y).float().mean():.2f}",
                            refresh=False)
            bar.update()
        bar.set_postfix(test_acc=f"{accuracy(model, *test):.3f}")
    bar.close()
    return model, step_model, opt


def training_step(step_model, opt, x, y, private):
    """One full training step (zero_grad, forward, backward, optimizer step) on a fixed batch."""
    def step():
        opt.zero_grad()
        (step_model(x, target=y).mean() if private else F.cross_entropy(step_model(x), y)).backward()
        opt.step()
    return step


def time_steps(steps: dict, n: int, per_round: int = 10) -> dict:
    """Median seconds per step of each warm step function, timed in interleaved rounds of
    `per_round` steps (alternating order), so that load from elsewhere hits both alike."""
    for step in steps.values():
        for _ in range(5):
            step()
    rounds = {name: [] for name in steps}
    for r in range(max(1, n // per_round)):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            rounds[name].append((time.perf_counter() - t0) / per_round)
    return {name: statistics.median(ts) for name, ts in rounds.items()}


def main():
    args = parse_args()
    train, test = load_data(args.seed)
    t0 = time.perf_counter()
    private, private_step, dp_opt, clipped = train_private(args, train, test)
    plain, plain_step, plain_opt = train_plain(args, train, test)

    acc_private, acc_plain = accuracy(private, *test), accuracy(plain, *test)
    eps, steps = dp_opt.epsilon(args.delta), dp_opt.steps

    # Time both compiled steps on one random batch of the expected size: random inputs touch no
    # private data (no privacy spent) and the models were already evaluated above.
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 64, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    t = time_steps({"private": training_step(private_step, dp_opt, x, y, private=True),
                    "plain": training_step(plain_step, plain_opt, x, y, private=False)},
                   args.timing_steps)
    t_private, t_plain = t["private"], t["plain"]

    print()
    print(f"digits: {len(train)} train / {len(test[1])} test images, {args.epochs} epochs, "
          f"expected batch {args.batch_size}, C = {args.max_grad_norm}, sigma = {dp_opt.noise_multiplier:.3f}")
    print(f"test accuracy   private {acc_private:.3f}   non-private {acc_plain:.3f}")
    print(f"privacy spent   epsilon = {eps:.2f} at delta = {args.delta:g} after {steps} steps "
          f"(target {args.epsilon:g}; RDP accounting via dp_accounting)")
    print(f"clipped         {100 * clipped:.1f}% of per-sample gradients had norm > C during training")
    print(f"time per step   private {1e3 * t_private:.2f} ms   plain {1e3 * t_plain:.2f} ms   "
          f"({t_private / t_plain:.2f}x), both torch.compile'd, batch {args.batch_size}")
    print(f"total           {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
