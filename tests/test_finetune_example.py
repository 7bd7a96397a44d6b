"""examples/finetune_pretrained.py end to end at a tiny scale: plain Trainer and DPTrainer on the
pre-trained all-MiniLM-L6-v2 (from its pip package; top layer, mean pooling and head trained on the
frozen layers' hidden states, with attention masks), 2 private steps of Poisson batches."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import finetune_pretrained as example  # noqa: E402

# 8 training docstrings per library (32 in all), expected Poisson batch 16: 2 steps in one epoch
TINY = ["--per-class", "10", "--max-length", "16", "--top-layers", "1", "--epochs", "1", "--dp-epochs", "1",
        "--batch-size", "16", "--dp-batch-size", "16", "--epsilon", "8"]


def test_dataset_is_deduplicated_balanced_and_split_by_seed():
    train, test, classes = example.docstring_dataset(per_class=10, seed=0)
    assert classes == ["numpy", "scipy", "scikit-learn", "torch"]
    assert len(train) == 32 and len(test) == 8
    texts = [t for t, _ in train + test]
    assert len(set(texts)) == len(texts)  # no docstring twice, and none in both splits
    assert not any(example.LIBRARY_NAMES.search(t) for t in texts)
    assert example.docstring_dataset(per_class=10, seed=0)[0] == train  # a fixed split
    assert example.docstring_dataset(per_class=10, seed=1)[0] != train


def test_example_end_to_end_tiny(monkeypatch, capsys):
    built, parts = [], []  # (model, its parameters before training); the frozen part and its parameters

    def recording_classifier(*args, **kwargs):
        model = classifier(*args, **kwargs)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    def recording_parts(*args, **kwargs):
        frozen, top = pretrained_parts(*args, **kwargs)
        parts.append((frozen, {n: p.detach().clone() for n, p in frozen.named_parameters()}))
        return frozen, top

    classifier, pretrained_parts = example.classifier, example.pretrained_parts
    monkeypatch.setattr(example, "classifier", recording_classifier)
    monkeypatch.setattr(example, "pretrained_parts", recording_parts)
    results = example.main(TINY)
    out = capsys.readouterr().out

    assert 0 < results[8.0]["epsilon_spent"] <= 8.0 * (1 + 1e-6)
    for accuracy in (results["plain"], results[8.0]["accuracy"], results["majority"]):
        assert 0.0 <= accuracy <= 1.0
    assert results[8.0]["sec_per_step"] > 0 and results[8.0]["steps"] == 2
    assert "plain (Trainer" in out and "private (DPTrainer" in out and "2 steps" in out

    (frozen, frozen_before), = parts
    assert len(frozen.encoder.layer) == 5 and not any(p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(p, frozen_before[n]) for n, p in frozen.named_parameters())
    assert len(built) == 2  # the plain run's model, then the private run's
    private, before = built[1]
    names = {n for n, _ in private.named_parameters()}
    assert names and all(n.startswith(("layers.0.", "classifier.")) for n in names)
    for name, p in private.named_parameters():
        assert p.requires_grad and not torch.equal(p.detach(), before[name]), name  # noise alone moves each


def test_padding_does_not_change_the_prediction():
    """The trained layers attend to and pool over the unpadded tokens only."""
    _, top = example.pretrained_parts(1)
    model = example.classifier(top, 4, seed=0).eval()
    h, mask = torch.randn(1, 6, 384), torch.ones(1, 6, dtype=torch.long)
    padded_h = torch.cat([h, torch.randn(1, 3, 384)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(h, mask).logits, model(padded_h, padded_mask).logits)
