"""Private fine-tuning with transformers' Trainer: fxclip.huggingface.DPTrainer (no downloads).

    pip install torch==2.13.0 -e ".[hf]" && python examples/hf_finetune.py   # minutes on 2 idle cores

Text: docstrings that ship with installed packages. torch's are the "public" corpus a small
GPT-2 (built from a config, byte-level tokens) is pre-trained on without privacy; numpy's are
the "private" corpus it is then fine-tuned on with LoRA, once privately (DPTrainer) and once
plainly (Trainer), from the same weights. Printed: perplexity on held-out numpy docstrings
(before fine-tuning, private, plain) and epsilon. Then a sequence-classification run: a small
BERT, trained from scratch, tells numpy docstring snippets from ROT13-encoded ones (a label
computable from the text: letter frequencies give it away), privately and plainly; printed:
accuracy on held-out snippets (0.5 is chance) and epsilon. `--part classification` runs only it.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import tempfile
import time

import numpy
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from fxclip.huggingface import DPTrainer, DPTrainingArguments

PAD, CLS = 0, 257  # token ids: byte b is b + 1
SEQ = 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of each private run")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--samples", type=int, default=2000, help="private training sequences")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("all", "lm", "classification"), default="all",
                   help="run both parts, or only the LoRA language model or the BERT classifier")
    p.add_argument("--cls-samples", type=int, default=8000, help="classifier training sequences (half per class)")
    p.add_argument("--cls-epochs", type=float, default=3.0)
    p.add_argument("--cls-batch-size", type=int, default=1024, help="classifier's expected (Poisson) batch size")
    p.add_argument("--cls-lr", type=float, default=3e-3)
    return p.parse_args()


# ---- data: docstrings of installed packages, byte-level tokens ----

def docstrings(*modules) -> list[str]:
    texts = []
    for module in modules:
        for name in sorted(dir(module)):
            doc = None if name.startswith("_") else inspect.getdoc(getattr(module, name, None))
            if doc and doc not in texts:
                texts.append(doc)
    return texts


def chunks(texts: list[str], n: int) -> torch.Tensor:
    """The texts' bytes, concatenated and cut into n sequences of SEQ tokens."""
    data = "\n\n".join(texts).encode("utf-8")[: n * SEQ]
    ids = torch.tensor(list(data), dtype=torch.long) + 1
    return ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)


def lm_dataset(ids: torch.Tensor) -> list[dict]:
    return [{"input_ids": x, "labels": x} for x in ids]


def split(texts: list[str], seed: int, held_out: float = 0.15):
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(len(texts) * held_out)
    return [texts[i] for i in order[k:]], [texts[i] for i in order[:k]]


def collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


# ---- training ----

def common_args(out, **kw) -> dict:
    return dict(output_dir=out, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_strategy="no", dataloader_pin_memory=False, **kw)


def train(trainer_cls, args_cls, model, train_set, eval_set, **kw):
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_cls(model=model, args=args_cls(**common_args(out, **kw)), train_dataset=train_set,
                              eval_dataset=eval_set, data_collator=collate)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate() if eval_set is not None else {}
    return trainer, metrics, seconds


def perplexity(model, eval_set) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=TrainingArguments(**common_args(out)), eval_dataset=eval_set,
                          data_collator=collate)
        return math.exp(trainer.evaluate()["eval_loss"])


def gpt2(seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=258, n_positions=SEQ, n_embd=96, n_layer=2, n_head=4,
                                     bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(config)


def with_lora(model):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                        fan_in_fan_out=True)  # GPT-2's Conv1D stores weights transposed
    return get_peft_model(copy.deepcopy(model), config)


def language_model(args, public, private_train, private_eval):
    base = gpt2(args.seed)
    start = time.perf_counter()
    train(Trainer, TrainingArguments, base, lm_dataset(public), None, per_device_train_batch_size=32,
          num_train_epochs=1, learning_rate=3e-3, warmup_steps=10)
    print(f"pre-trained the base GPT-2 on {len(public)} torch docstring sequences "
          f"({time.perf_counter() - start:.0f} s)")
    train_set, eval_set = lm_dataset(private_train), lm_dataset(private_eval)
    print(f"  perplexity on held-out numpy docstrings before fine-tuning: {perplexity(base, eval_set):.2f}")
    hyper = dict(per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=1e-2,
                 seed=args.seed)
    trainer, private, secs = train(DPTrainer, DPTrainingArguments, with_lora(base), train_set, eval_set,
                                   target_epsilon=args.epsilon, target_delta=args.delta,
                                   max_grad_norm=args.max_grad_norm, **hyper)
    lora = trainer.model
    print(f"  LoRA, private (DPTrainer): perplexity {math.exp(private['eval_loss']):.2f}, "
          f"epsilon {trainer.epsilon:.2f} at delta {args.delta}, noise multiplier "
          f"{trainer._dp_optimizer.noise_multiplier:.3f}, {trainer.state.global_step} steps, {secs:.0f} s; "
          f"{sum(p.numel() for p in lora.parameters() if p.requires_grad)} trainable of "
          f"{sum(p.numel() for p in lora.parameters())} parameters")
    _, plain, secs = train(Trainer, TrainingArguments, with_lora(base), train_set, eval_set, **hyper)
    print(f"  LoRA, plain (Trainer):     perplexity {math.exp(plain['eval_loss']):.2f}, {secs:.0f} s")


def classifier(seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=SEQ + 1, num_labels=2,
                                     pad_token_id=PAD)
    return transformers.BertForSequenceClassification(config)


def rot13(ids: torch.Tensor) -> torch.Tensor:
    """Byte-token ids with each ASCII letter moved 13 places along the alphabet."""
    table = torch.arange(258)
    for first in (ord("a"), ord("A")):
        table[first + 1: first + 27] = (torch.arange(26) + 13) % 26 + first + 1
    return table[ids]


def classification_set(ids: torch.Tensor) -> list[dict]:
    """Label 0: the first half of the snippets as they are; label 1: the second half, ROT13-encoded."""
    cls, half = torch.full((1,), CLS), len(ids) // 2
    return [{"input_ids": torch.cat([cls, x]), "labels": torch.tensor(label)}
            for label, part in ((0, ids[:half]), (1, rot13(ids[half:]))) for x in part]


def accuracy(trainer, dataset) -> float:
    predictions = trainer.predict(dataset)
    return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())


def sequence_classification(args, train_ids, eval_ids):
    train_set, eval_set = classification_set(train_ids), classification_set(eval_ids)
    hyper = dict(per_device_train_batch_size=args.cls_batch_size, num_train_epochs=args.cls_epochs,
                 learning_rate=args.cls_lr, warmup_steps=5, seed=args.seed)
    private, _, secs = train(DPTrainer, DPTrainingArguments, classifier(args.seed), train_set, None,
                             target_epsilon=args.epsilon, target_delta=args.delta,
                             max_grad_norm=args.max_grad_norm, **hyper)
    print(f"sequence classification, numpy docstrings plain vs ROT13 ({len(train_set)} training sequences, "
          f"{len(eval_set)} held out):")
    print(f"  BERT, private (DPTrainer): accuracy {accuracy(private, eval_set):.3f}, epsilon "
          f"{private.epsilon:.2f}, {secs:.0f} s")
    plain, _, secs = train(Trainer, TrainingArguments, classifier(args.seed), train_set, None, **hyper)
    print(f"  BERT, plain (Trainer):     accuracy {accuracy(plain, eval_set):.3f}, {secs:.0f} s")


def main():
    args = parse_args()
    transformers.logging.set_verbosity_error()
    torch_train, torch_eval = split(docstrings(torch, torch.nn, torch.nn.functional, torch.Tensor), args.seed)
    numpy_train, numpy_eval = split(docstrings(numpy, numpy.linalg, numpy.random), args.seed)
    n, n_eval = args.samples, max(args.samples // 8, 64)
    if args.part in ("all", "lm"):
        language_model(args, chunks(torch_train, n), chunks(numpy_train, n), chunks(numpy_eval, n_eval))
    if args.part in ("all", "classification"):
        sequence_classification(args, chunks(numpy_train, args.cls_samples),
                                chunks(numpy_eval, max(args.cls_samples // 8, 128)))


if __name__ == "__main__":
    main()
