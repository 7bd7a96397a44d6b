"""Private fine-tuning of all-MiniLM-L6-v2: fxclip against Opacus' ghost clipping, same everything.

    python -m bench.finetune_vs_opacus            # writes bench/results/finetune_vs_opacus.json
    python -m bench.finetune_vs_opacus --quick    # a small run of the same code (no file written)

Model, data, trainable layers, expected batch size, epochs, optimizer (AdamW, linear decay to 0),
clipping threshold C and noise multiplier are those of examples/finetune_pretrained.py (its
functions build them): the frozen lower layers run once, and both libraries train the top
layer(s) (default none), mean pooling and head on their hidden states, with the attention
masks. Both sides run the same DP-SGD: Poisson sampling, flat per-sample clipping at C,
Gaussian noise sigma*C once per step, division by the expected batch size; sigma is calibrated
once (dp_accounting RDP, fxclip.accounting.noise_multiplier_for) for the target epsilon and given
to both, and each library's own accountant reports the epsilon it spent.

- fxclip: `fxclip.make_private` (eager: the privatized model traces itself, one backward).
- Opacus: `PrivacyEngine.make_private(..., grad_sample_mode="ghost")`, which returns a criterion
  that runs ghost clipping's two backward passes.

Both run the same hand-written loop (not transformers' Trainer), so the time per step compares
the libraries only. Runs are interleaved (fxclip, Opacus, Opacus, fxclip, ...) so that a change
in machine load falls on both. Time per step: the median over the steps after the first two
(fxclip compiles at the first batch and at the first new batch size).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import finetune_pretrained as example  # noqa: E402

import fxclip  # noqa: E402
from fxclip.accounting import noise_multiplier_for  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "finetune_vs_opacus.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the example's --quick scale; writes no file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--libraries", nargs="+", default=["fxclip", "opacus"], choices=["fxclip", "opacus"])
    p.add_argument("--out", default=RESULTS)
    args, rest = p.parse_known_args(argv)
    # model, data and DP hyperparameters: the example's flags and defaults
    args.example = example.parse_args(rest + (["--quick"] if args.quick else []))
    return args


def tensors(samples: list[dict]) -> TensorDataset:
    """The example's samples (frozen layers' hidden states) as (hidden_states, attention_mask, labels)."""
    batch = example.collate(samples)
    return TensorDataset(batch["hidden_states"], batch["attention_mask"], batch["labels"])


def optimizer_and_schedule(model, ex, steps: int):
    """AdamW with a linear decay to 0 over the run: what DPTrainer (transformers' Trainer) builds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ex.dp_lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=steps)


def seeded_generator(seed: int, device: str):
    """A CPU generator for sampling and noise on the CPU; on a GPU the noise is drawn on the device,
    from torch's global generators, seeded here."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed) if device == "cpu" else None


def per_sample_cross_entropy(outputs, labels):
    return F.cross_entropy(outputs.logits, labels, reduction="none")


def accuracy(model, test: TensorDataset, device: str) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for h, mask, y in DataLoader(test, batch_size=256):
            logits = model(h.to(device), mask.to(device)).logits
            correct += int((logits.argmax(-1).cpu() == y).sum())
    model.train()
    return correct / len(test)


def train_fxclip(model, train: TensorDataset, ex, sigma: float, seed: int, epochs: int):
    opt, _ = optimizer_and_schedule(model, ex, 1)
    pm, dp_opt, loader = fxclip.make_private(
        model, opt, DataLoader(train, batch_size=ex.dp_batch_size), noise_multiplier=sigma,
        max_grad_norm=ex.max_grad_norm, loss_fn=per_sample_cross_entropy,
        generator=seeded_generator(seed, ex.device))
    schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=epochs * len(loader))

    def step(h, mask, y):
        dp_opt.zero_grad()
        pm(h, mask, target=y).mean().backward()
        dp_opt.step()

    times = run_epochs(loader, step, schedule, epochs, ex.device)
    return times, dp_opt.epsilon(ex.delta)


def train_opacus(model, train: TensorDataset, ex, sigma: float, seed: int, epochs: int):
    from opacus import PrivacyEngine

    opt, _ = optimizer_and_schedule(model, ex, 1)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG advice
        gsm, dp_opt, criterion, loader = engine.make_private(
            module=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
            data_loader=DataLoader(train, batch_size=ex.dp_batch_size), noise_multiplier=sigma,
            max_grad_norm=ex.max_grad_norm, poisson_sampling=True, grad_sample_mode="ghost",
            noise_generator=seeded_generator(seed, ex.device))
    schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=epochs * len(loader))

    def step(h, mask, y):
        dp_opt.zero_grad()
        loss = criterion(gsm(h, mask).logits, y)
        loss.backward()  # ghost clipping: the criterion's tensor runs both backward passes
        dp_opt.step()

    times = run_epochs(loader, step, schedule, epochs, ex.device)
    return times, engine.get_epsilon(ex.delta)


def run_epochs(loader, step, schedule, epochs: int, device: str) -> list[float]:
    """Trains; returns each step's seconds (synchronized with the device)."""
    times = []
    for _ in range(epochs):
        for batch in loader:
            start = time.perf_counter()
            step(*(t.to(device) for t in batch))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            schedule.step()
    return times


def one_run(library: str, seed: int, data, ex, sigma: float, epochs: int) -> dict:
    train, test, n_classes, top = data
    model = example.classifier(top, n_classes, seed).to(ex.device)
    model.train()  # the Trainer trains with dropout on; Opacus requires train mode
    trainer = train_fxclip if library == "fxclip" else train_opacus
    start = time.perf_counter()
    times, epsilon = trainer(model, train, ex, sigma, seed, epochs)
    total = time.perf_counter() - start
    return {"library": library, "seed": seed, "accuracy": accuracy(model, test, ex.device), "epsilon_spent": epsilon,
            "steps": len(times), "sec_per_step": statistics.median(times[2:] or times),
            "first_two_steps_s": sum(times[:2]), "train_seconds": total}


def table(runs: list[dict]) -> str:
    lines = ["| library | seed | test accuracy | epsilon spent | s/step (median) | first 2 steps (s) | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['library']} | {r['seed']} | {r['accuracy']:.3f} | {r['epsilon_spent']:.2f} | "
                     f"{r['sec_per_step']:.2f} | {r['first_two_steps_s']:.1f} | {r['steps']} |")
    for library in sorted({r["library"] for r in runs}):
        mine = [r for r in runs if r["library"] == library]
        accs = [r["accuracy"] for r in mine]
        lines.append(f"| {library} | mean of {len(mine)} | {statistics.mean(accs):.3f} "
                     f"(min {min(accs):.3f}, max {max(accs):.3f}) | | "
                     f"{statistics.mean(r['sec_per_step'] for r in mine):.2f} | | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    ex = args.example
    import transformers
    transformers.logging.set_verbosity_error()
    train, test, classes = example.docstring_dataset(ex.per_class, ex.seed)
    tok = example.tokenizer()
    frozen, top = example.pretrained_parts(ex.top_layers)
    data = (*(tensors(example.frozen_features(frozen, example.tokenize(pairs, tok, ex.max_length), ex.device))
              for pairs in (train, test)), len(classes), top)
    epochs = round(ex.dp_epochs)
    q = ex.dp_batch_size / len(data[0])
    sigma = noise_multiplier_for(args.epsilon, ex.delta, q, epochs * round(1 / q))
    print(f"{len(data[0])} training, {len(data[1])} test docstrings; expected batch {ex.dp_batch_size}, "
          f"{epochs} epochs, lr {ex.dp_lr}, C {ex.max_grad_norm}, trained: top {ex.top_layers} layer(s), pooling, "
          f"head; sigma {sigma:.3f} for epsilon {args.epsilon} at delta {ex.delta}", flush=True)
    runs = []
    for i, seed in enumerate(args.seeds):
        order = args.libraries if i % 2 == 0 else args.libraries[::-1]  # interleave: A B, B A, ...
        for library in order:
            runs.append(one_run(library, seed, data, ex, sigma, epochs))
            r = runs[-1]
            print(f"{library} seed {seed}: accuracy {r['accuracy']:.3f}, epsilon {r['epsilon_spent']:.2f}, "
                  f"{r['sec_per_step']:.2f} s/step, {r['train_seconds']:.0f} s", flush=True)
    print(table(runs))
    if not args.quick:
        result = {
            "what": "private fine-tuning of all-MiniLM-L6-v2 (examples/finetune_pretrained.py's model and data): "
                    "fxclip.make_private against Opacus PrivacyEngine(grad_sample_mode='ghost')",
            "settings": {"epsilon": args.epsilon, "delta": ex.delta, "noise_multiplier": sigma,
                         "expected_batch_size": ex.dp_batch_size, "epochs": epochs, "lr": ex.dp_lr,
                         "optimizer": "AdamW, weight_decay 0, linear decay to 0", "max_grad_norm": ex.max_grad_norm,
                         "trained": "top layer(s), mean pooling, linear head", "top_layers": ex.top_layers,
                         "max_length": ex.max_length,
                         "train_samples": len(data[0]), "test_samples": len(data[1]), "per_class": ex.per_class},
            "machine": {"device": ex.device, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
            "runs": runs,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
