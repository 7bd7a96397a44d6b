"""Hugging Face transformers integration: DP-SGD fine-tuning through transformers.Trainer.

    from fxclip.huggingface import DPTrainer, DPTrainingArguments

Needs `pip install fxclip[hf]` (transformers, accelerate; peft for LoRA). The core fxclip package
never imports transformers.
"""
from .losses import PER_SAMPLE_LOSSES, TASKS, loss_for, task_of
from .trainer import DPTrainer, DPTrainingArguments

__all__ = ["DPTrainer", "DPTrainingArguments", "loss_for", "task_of", "TASKS", "PER_SAMPLE_LOSSES"]
