"""Audit fxclip's privacy guarantee end to end with one training run (Steinke et al. 2023).

    python examples/audit.py                    # a few minutes on 2 CPU cores
    python examples/audit.py --break-clipping   # a deliberately false claim: the audit catches it
    python examples/audit.py --plot scores.png  # canary score histograms (pip install "fxclip[audit]")

Trains a small MLP on scikit-learn's bundled digits with fxclip.make_private at the target epsilon,
plus m white-box gradient canaries, each included with probability 1/2, then prints an empirical
lower bound on epsilon (95% confidence) next to the epsilon the accountant claims. A correct
implementation gives a lower bound below the claim. --break-clipping clips at 10x the bound the
noise and the accountant use, so the claim is false, and the lower bound must exceed it.

The one-run bound cannot certify large epsilons: at delta = 1e-5 and 95% confidence no outcome
gives more than about 6.3 (docs/audit.md), so the default target is epsilon = 4.
"""
from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from fxclip.audit import GradientCanaries, InputCanaries, audit_training, plot_scores


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilon", type=float, default=4.0, help="target (claimed) epsilon")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--canaries", type=int, default=2000, help="number of canaries m")
    p.add_argument("--black-box", action="store_true",
                   help="mislabeled random input canaries scored by loss, instead of gradient canaries")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--break-clipping", action="store_true",
                   help="clip at 10x the bound given to the noise and accountant (a false claim)")
    p.add_argument("--plot", metavar="PNG", help="save the canary score histograms here")
    return p.parse_args()


def main():
    args = parse_args()
    digits = load_digits()  # 1797 8x8 images shipped with scikit-learn
    train = TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target))
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    canaries = (InputCanaries(args.canaries, 10) if args.black_box
                else GradientCanaries(args.canaries, 10))
    result = audit_training(
        model, train, canaries, target_epsilon=args.epsilon, target_delta=args.delta,
        epochs=args.epochs, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr), seed=args.seed,
        _unsound_clip_factor=10.0 if args.break_clipping else None)
    print(f"{'black-box' if args.black_box else 'white-box'} audit of {result.canaries} canaries: "
          f"{result.correct}/{result.guesses} guesses correct, {result.seconds:.0f} s"
          + (" (clipping broken on purpose)" if args.break_clipping else ""))
    if result.claimed_epsilon >= result.ceiling:
        print(f"note: with {result.canaries} canaries no outcome can certify an epsilon above "
              f"{result.ceiling:.2f}, so this audit cannot refute the claim; use more canaries or a "
              "smaller epsilon (docs/audit.md)")
    if args.plot:
        plot_scores(result, args.plot)
        print(f"score histograms saved to {args.plot}")
    print(result.line())


if __name__ == "__main__":
    main()
