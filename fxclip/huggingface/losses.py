"""Per-sample losses of Hugging Face tasks, as transformers defines them, one loss per sample.

A Hugging Face model given `labels` returns the BATCH mean of its loss, which mixes samples; here
each sample's loss is computed on its own from the logits: `fn(output, labels) -> (B,)`, the
signature fxclip's `loss_fn` takes. A sample's token loss is the mean over its own non-ignored
tokens ("token_mean", what the model computes for a batch of one) or their sum ("token_sum").
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # transformers' label for "no loss at this position" (padding, prompt)
PER_SAMPLE_LOSSES = ("token_mean", "token_sum")
TASKS = ("causal_lm", "masked_lm", "seq2seq_lm", "token_classification", "sequence_classification")

_MAPPINGS = {
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq_lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def task_of(model: nn.Module) -> str:
    """The task whose loss the model's class computes, from transformers' auto-class tables."""
    from transformers.models.auto import modeling_auto

    name = type(base_model(model)).__name__
    for task, table in _MAPPINGS.items():
        if name in _class_names(getattr(modeling_auto, table)):
            return task
    raise ValueError(
        f"DPTrainer does not know which loss {name} computes (not a causal LM, masked LM, seq2seq "
        f"LM, token or sequence classification model of transformers). Pass task= (one of {TASKS}) "
        "or loss_fn=fn with fn(outputs, labels) returning one loss per sample, shape (B,).")


def _class_names(mapping) -> set:
    names = set()
    for v in mapping.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names


def loss_for(task: str, config=None, *, per_sample_loss: str = "token_mean", label_smoothing: float = 0.0):
    """fn(output, labels) -> per-sample losses (B,) for `task` (config: the model's, for the
    classification problem type)."""
    if per_sample_loss not in PER_SAMPLE_LOSSES:
        raise ValueError(f"per_sample_loss must be one of {PER_SAMPLE_LOSSES}, got {per_sample_loss!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "sequence_classification":
        return functools.partial(sequence_classification_losses, config=config, label_smoothing=label_smoothing)
    return functools.partial(token_losses, shift=task == "causal_lm", per_sample_loss=per_sample_loss,
                             label_smoothing=label_smoothing)


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # transformers' ModelOutput is a dict
        return output["logits"]
    return output[0]


def _for_loss(logits: torch.Tensor) -> torch.Tensor:
    # transformers computes its losses in float32 at least
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_losses(output, labels: torch.Tensor, *, shift: bool, per_sample_loss: str = "token_mean",
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over each sample's tokens; labels == -100 are ignored. shift=True predicts
    token t+1 from position t (causal LM: labels are the inputs, shifted here, as transformers does)."""
    logits = _for_loss(logits_of(output))
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    # (B, V, T) against (B, T): the batch stays in dim 0, one loss per token
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                reduction="none", label_smoothing=label_smoothing)
    total = per_token.sum(dim=1)
    if per_sample_loss == "token_sum":
        return total
    # a sample with no target token has loss 0 (and so no gradient)
    return total / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(total.dtype)


def problem_type(config, labels: torch.Tensor) -> str:
    """transformers' rule for a sequence classifier's loss."""
    if getattr(config, "problem_type", None) is not None:
        return config.problem_type
    num_labels = getattr(config, "num_labels", 2)
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_losses(output, labels: torch.Tensor, *, config=None,
                                   label_smoothing: float = 0.0) -> torch.Tensor:
    """One loss per sequence: MSE (regression), cross-entropy, or the mean binary cross-entropy over
    the labels (multi-label), as transformers' sequence classifiers compute them."""
    logits = _for_loss(logits_of(output))
    kind = problem_type(config, labels)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.reshape(logits.shape[0], -1), labels.reshape(-1), reduction="none",
                               label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing_factor applies to classification with one label, not {kind}")
    b = logits.shape[0]
    if kind == "regression":
        diff = logits.reshape(b, -1) - labels.reshape(b, -1).to(logits.dtype)
        return diff.square().mean(dim=1)
    if kind == "multi_label_classification":
        per_label = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return per_label.reshape(b, -1).mean(dim=1)
    raise ValueError(f"unknown problem_type {kind!r}")


def decoder_inputs_from_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """decoder_input_ids from labels, as an encoder-decoder model builds them when given labels."""
    prepare = getattr(base_model(model), "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise ValueError(
            f"{type(base_model(model)).__name__} cannot build decoder_input_ids from labels: put "
            "decoder_input_ids in the batch (DataCollatorForSeq2Seq(tokenizer, model=model) does).")
    return prepare(labels=labels)
