"""Real third-party architectures: Hugging Face transformers models built from tiny configs (no
downloads). A run of each, called as users call it (keyword tensors, padding masks) at batch sizes
that change from step to step, must equal per-sample clipping of gradients computed one sample at
a time in float64 at every step (tests/zoo_check.py), with both attention implementations, and
every parameter must take the rule its op family has (projections `linear`, tables `embedding`,
convolutions `conv`), not the generic fallback. Models that really mix samples (BatchNorm in
training) must be refused."""
from __future__ import annotations

import pytest
import torch.nn as nn
from zoo_check import check
from zoo_models import MODELS

import fxclip

slow = pytest.mark.slow

# (model, attention implementation); HF has only "eager" for some (GPT-Neo, BLOOM, DeBERTa-v2,
# WavLM, the convolutional vision models).
CASES = [
    ("gpt2", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("bert", "eager"), ("distilbert", "sdpa"),
    ("t5", "eager"), ("vit", "sdpa"), ("convnext", "eager"), ("wav2vec2", "sdpa"), ("whisper_encoder", "eager"),
    *[pytest.param(*c, marks=slow) for c in [
        ("gpt_neo", "eager"), ("bloom", "eager"), ("falcon", "sdpa"), ("gptj", "sdpa"), ("opt", "sdpa"),
        ("mistral", "sdpa"), ("gemma", "eager"), ("phi", "sdpa"),
        ("mixtral", "sdpa"), ("gpt_neox", "eager"), ("roberta", "sdpa"), ("albert", "eager"),
        ("deberta_v2", "eager"), ("bart", "sdpa"), ("beit", "sdpa"),
        ("dinov2", "eager"), ("swin", "sdpa"), ("convnextv2", "eager"), ("clip_vision", "sdpa"),
        ("siglip_vision", "eager"), ("wav2vec2_group", "eager"), ("hubert", "eager"),
        ("wavlm", "eager"),
    ]],
]

# Parameters with no ghost rule today, taking the exact fallback: Mixtral's experts are 3-d
# weights gathered per token (gate_up_proj[top_k_index]) and multiplied with bmm.
FALLBACK = {
    "mixtral": {"layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"},
    # DeBERTa-v2 projects the batch-independent relative-position table (shared by all samples)
    # and gathers it per sample: the gradient sums over samples before the projection's matmul.
    "deberta_v2": {"encoder.rel_embeddings.weight", *(f"encoder.layer.0.attention.self.pos_{k}_proj.{p}"
                                                         for k in ("key", "query") for p in ("weight", "bias"))},
    # wav2vec2's positional conv is weight-normed: its weight g * v / ||v|| is computed from the
    # two parameters, and their gradients reach them from the conv's weight gradient through
    # parameter-dependent factors that no rule passes through.
    **{n: {f"encoder.pos_conv_embed.conv.parametrizations.weight.original{i}" for i in (0, 1)}
       for n in ("wav2vec2", "wav2vec2_group", "hubert", "wavlm")},
    # BEiT resizes its relative-position table with a bilinear interpolate before the gather.
    "beit": {"layers.0.relative_position_bias.relative_position_bias_table"},
}


def expected_rule(module: nn.Module) -> str | None:
    """The rule a parameter of this module must get, by the module's op family."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D)):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return None


def assert_rules(model: nn.Module, rules: dict, name: str, fallback=None) -> None:
    """Only the listed parameters took the fallback; every Linear, Embedding and Conv weight
    took its own rule."""
    want = FALLBACK.get(name, set()) if fallback is None else fallback
    assert {n for n, r in rules.items() if "fallback" in r.split("+")} == want
    for n, r in rules.items():
        rule = expected_rule(model.get_submodule(n.rpartition(".")[0]))
        if rule is not None and n.endswith("weight") and n not in want:
            assert rule in r.split("+"), (n, r)


@pytest.mark.parametrize("name,impl", CASES)
def test_runs_exact_with_padding_masks(name, impl):
    case = MODELS[name](impl)
    rules = check(case)
    assert_rules(case.model, rules, name)


@pytest.mark.parametrize("name,targets", [("llama", ["q_proj", "v_proj"]), ("bert", ["query", "value"])])
def test_peft_lora_only_adapters_trainable(name, targets):
    from peft import LoraConfig, get_peft_model

    case = MODELS[name]("sdpa")
    # init_lora_weights=False: B starts random, not zero, so A's gradient is not zero either
    model = get_peft_model(case.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                  init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    rules = check(case._replace(model=model))
    assert set(rules) == trainable
    assert all(r == "linear" for r in rules.values()), rules
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_batchnorm_in_training_is_refused():
    """BatchNorm in training normalizes each sample with the whole batch's statistics."""
    case = MODELS["resnet"]("eager")
    module = "embedder.embedder.normalization"
    with pytest.raises(fxclip.PrivacyError, match=rf"var_mean.* in module '{module}' \(BatchNorm2d\) mixes samples"):
        check(case)
    assert all(p.grad is None for p in case.model.parameters())


def test_batchnorm_in_eval_is_exact():
    """Frozen running statistics keep samples apart: ResNet with BatchNorm in eval mode."""
    case = MODELS["resnet"]("eager")
    case.model.eval()
    rules = check(case)
    assert_rules(case.model, rules, "resnet")
    norms = [n for n, m in case.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(rules[f"{n}.{p}"] == "unreduce" for n in norms for p in ("weight", "bias"))


def test_float32_upcasts_as_shipped():
    """Llama as HF ships it: RMSNorm and the attention softmax upcast to float32, here a downcast
    from float64. Those float32 parts of the backward round differently in the traced graph
    (decomposed backward formulas) and in eager autograd, so this check is exact to float32's
    precision (observed error 5e-8): it proves the casts reach the same rules, no fallback."""
    case = MODELS["llama"]("eager")
    rules = check(case, tol=1e-6, float64_islands=False)
    assert_rules(case.model, rules, "llama")


@slow
@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("bert", "sdpa"), ("t5", "eager"), ("vit", "sdpa"),
                                       ("whisper_encoder", "sdpa")])
def test_compiled_runs(name, impl):
    """One model per family under torch.compile: a static graph, then a dynamic one."""
    case = MODELS[name](impl)
    rules = check(case, compiled=True)
    assert_rules(case.model, rules, name)
