"""DPTrainer end to end, as users run it: several steps of Poisson batches (q < 1) of right-padded
text, full fine-tuning and LoRA, eager and torch.compile, gradient accumulation, gradient
checkpointing, evaluation between steps, a second epoch. With noise 0, every step's update must
equal the float64 oracle's for the samples the sampler drew for that step: each sample's
gradient on its own (unpadded, batch of one), clipped to C, summed, / the expected batch size."""
import copy
import functools
import types

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_huggingface import V, _bert, _gpt2, _t5
from torch import nn

import fxclip
from fxclip.huggingface import DPTrainer, DPTrainingArguments
from fxclip.huggingface import losses as L

PAD = 0
N = 12  # samples; expected batch 4: q = 1/3, 3 steps an epoch


def _rms_norm_float64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rotary_float64(self, x, position_ids):
    emb = (position_ids[..., None].double() * self.inv_freq.double()).repeat(1, 1, 2)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _float64(model):
    """RMSNorm and the rotary embedding compute in float32 even in a float64 model: float32
    islands whose roundoff (~1e-7) differs between eager PyTorch and Inductor's code, or between
    autograd and any traced graph. Computed in float64 here, so that the comparison with the
    oracle is exact."""
    forms = {"LlamaRMSNorm": _rms_norm_float64, "T5LayerNorm": _rms_norm_float64,
             "LlamaRotaryEmbedding": _rotary_float64}
    for m in model.modules():
        if type(m).__name__ in forms:
            m.forward = types.MethodType(forms[type(m).__name__], m)
    return model


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   pad_token_id=PAD)
    return _float64(transformers.LlamaForCausalLM(cfg).double())


FAMILIES = {  # model, task, LoRA config
    "gpt2": (_gpt2, "causal_lm", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama": (_llama, "causal_lm", dict(target_modules=["q_proj", "v_proj"])),
    "bert": (_bert, "sequence_classification", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "t5": (lambda: _float64(_t5()), "seq2seq_lm", dict(target_modules=["q", "v"])),
}


def _model(family, lora):
    make, _, lora_kw = FAMILIES[family]
    model = make()
    if lora:  # the LoRA weights (and a SEQ_CLS head) train, the base is frozen
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **lora_kw))
    return model


def _data(task, n=N, seed=0):
    """Unpadded samples of varying lengths (2..7 tokens); the collator pads them."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        ids = torch.randint(2, V, (int(torch.randint(2, 8, (), generator=g)),), generator=g)
        if task == "causal_lm":
            labels = ids.clone()
        elif task == "sequence_classification":
            labels = torch.randint(0, 3, (), generator=g)
        else:
            labels = torch.randint(2, V, (int(torch.randint(2, 6, (), generator=g)),), generator=g)
        data.append({"input_ids": ids, "labels": labels})
    return data


def _pad(rows, value, multiple):
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    return torch.stack([F.pad(r, (0, length - len(r)), value=value) for r in rows])


def _collate(features, multiple=1):
    """Right padding to the batch's longest sample rounded up to `multiple`, as
    DataCollatorWithPadding(pad_to_multiple_of=multiple) does; labels -100 on padding (no loss
    there). multiple=8 pads every batch here to 8 tokens: fewer shapes, fewer recompiles."""
    ids = [f["input_ids"] for f in features]
    batch = {"input_ids": _pad(ids, PAD, multiple),
             "attention_mask": _pad([torch.ones_like(i) for i in ids], 0, multiple)}
    labels = [f["labels"] for f in features]
    batch["labels"] = torch.stack(labels) if labels[0].dim() == 0 else _pad(labels, -100, multiple)
    return batch


def _oracle_loss(model, task, sample):
    """The sample's loss on its own, float64: the mean over its target tokens (token_mean) or the
    cross-entropy of its class."""
    ids, labels = sample["input_ids"][None], sample["labels"]
    if task == "causal_lm":  # token t predicts token t + 1
        return F.cross_entropy(model(input_ids=ids).logits[0, :-1], labels[1:])
    if task == "sequence_classification":
        return F.cross_entropy(model(input_ids=ids).logits[0], labels)
    decoder_ids = L.base_model(model).prepare_decoder_input_ids_from_labels(labels=labels[None])
    return F.cross_entropy(model(input_ids=ids, decoder_input_ids=decoder_ids).logits[0], labels)


def _sample_grads(model, task, samples):
    """Each sample's gradient (over the trainable parameters) of its own loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    for sample in samples:
        grads = torch.autograd.grad(_oracle_loss(model, task, sample), params, allow_unused=True)
        yield [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _norm(grads):
    return torch.sqrt(sum(g.square().sum() for g in grads)).item()


def _oracle_step(model, task, samples, C, lr, expected_batch_size):
    """SGD update of DP-SGD with noise 0, and each sample's clip factor."""
    total = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    factors = []
    for grads in _sample_grads(model, task, samples):
        r = min(1.0, C / (_norm(grads) + 1e-6))
        factors.append(r)
        total = [t + r * g for t, g in zip(total, grads)]
    return [-lr * t / expected_batch_size for t in total], factors


def _median_norm(model, task, data):
    """C in the middle of the samples' gradient norms: the run has clipped and unclipped samples."""
    return float(torch.tensor([_norm(g) for g in _sample_grads(model, task, data)]).median())


class _Recorder(transformers.TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.after = [[p.detach().clone() for p in self.params]]

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append([p.detach().clone() for p in self.params])


class _RecordingTrainer(DPTrainer):
    """Records every micro-batch as training_step gets it, with the step it belongs to."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches.append((self.state.global_step, {k: v.clone() for k, v in inputs.items()}))
        return super().training_step(model, inputs, num_items_in_batch)


def _poisson_draws(n, q, seed, steps):
    """The Poisson batches of the first `steps` steps, replayed: each sample joins with
    probability q, from a generator seeded as the trainer seeds its own."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, generator=g) < q).nonzero().flatten().tolist() for _ in range(steps)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=5, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, noise_multiplier=0.0,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=3)
    base.update(kw)
    return DPTrainingArguments(**base)


def _check_run(tmp_path, family, *, lora=False, compiled=False, accumulation=1, checkpointing=False,
               evaluate=False, steps=5, seed=3, multiple=1, **kw):
    """Train `steps` steps; check each step's update against the oracle's for its Poisson batch.
    Returns the trainer and each step's draw (sample indices)."""
    torch.manual_seed(0)
    model = _model(family, lora)
    task = FAMILIES[family][1]
    data = _data(task)
    reference = copy.deepcopy(model)  # plain: no checkpointing, no fxclip
    C = _median_norm(reference, task, data)
    args = _args(tmp_path, max_steps=steps, seed=seed, max_grad_norm=C, torch_compile=compiled,
                 gradient_accumulation_steps=accumulation,
                 **(dict(gradient_checkpointing=True) if checkpointing else {}),
                 **(dict(eval_strategy="steps", eval_steps=2) if evaluate else {}), **kw)
    recorder = _Recorder(model)
    collate = functools.partial(_collate, multiple=multiple)
    trainer = _RecordingTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                                eval_dataset=_data(task, 4, seed=1) if evaluate else None, callbacks=[recorder])
    trainer.micro_batches = []
    trainer.train()

    assert trainer.state.global_step == steps and len(recorder.after) == steps + 1  # no step refused
    assert trainer._dp_optimizer.module.last_report is not None  # fxclip's pass rewrote the graph
    if compiled:
        assert hasattr(trainer._pm, "_orig_mod")  # the privatized model ran under torch.compile
    if evaluate:  # evaluated at step 2 and 4, and training went on after it
        assert {2, 4} <= {h["step"] for h in trainer.state.log_history if "eval_loss" in h}

    q = args.per_device_train_batch_size / len(data)
    draws = _poisson_draws(len(data), q, seed, steps)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    factors = []
    for step, drawn in enumerate(draws):
        # the micro-batches of this step are the draw, split in order and collated
        got = [b for s, b in trainer.micro_batches if s == step]
        pieces = [piece.tolist() for piece in np.array_split(np.array(drawn, dtype=np.int64), accumulation)]
        assert len(got) == accumulation
        for batch, piece in zip(got, pieces):
            assert len(batch["input_ids"]) == len(piece)
            if piece:
                expected = collate([data[i] for i in piece])
                assert all(torch.equal(batch[k], expected[k]) for k in expected)
        with torch.no_grad():
            for p, v in zip(ref_params, recorder.after[step]):
                p.copy_(v)
        update, f = _oracle_step(reference, task, [data[i] for i in drawn], C, args.learning_rate,
                                 args.per_device_train_batch_size)
        factors += f
        for before, after, u in zip(recorder.after[step], recorder.after[step + 1], update):
            torch.testing.assert_close(after, before + u, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(after - before, u, rtol=1e-7, atol=1e-13)  # the update itself
    sizes = [len(d) for d in draws]
    assert len(set(sizes)) > 1, "batch sizes must differ between steps"
    assert any(f < 1 for f in factors) and any(f == 1 for f in factors), "clipped and unclipped samples"
    return trainer, draws


# eager: fxclip compiles the privatized model itself (no Inductor), a few seconds a graph
EAGER = [
    # accumulation 3 of draws [2, 3, 6, 3, 0, 3]: empty micro-batches and an empty step; two
    # epochs; evaluation every 2 steps (the model's own loss, no privacy) between training steps
    pytest.param("gpt2", False, dict(accumulation=3, evaluate=True, steps=6, seed=2, empty=True),
                 id="gpt2-accumulation-eval"),
    pytest.param("llama", True, dict(seed=7), id="llama-lora"),  # draws [3, 4, 1, 4, 4]: a batch of one
    pytest.param("bert", True, {}, id="bert-lora"),  # LoRA and the classifier head (modules_to_save)
    pytest.param("t5", False, dict(seed=1, steps=4), id="t5"),  # draws [2, 4, 4, 4]: fewer shapes to compile
    pytest.param("gpt2", True, {}, id="gpt2-lora", marks=pytest.mark.slow),
    pytest.param("llama", False, dict(accumulation=2), id="llama-accumulation", marks=pytest.mark.slow),
    pytest.param("t5", True, {}, id="t5-lora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family,lora,kw", EAGER)
def test_eager_run_matches_the_oracle_every_step(tmp_path, family, lora, kw):
    kw = dict(kw)
    empty = kw.pop("empty", False)
    trainer, draws = _check_run(tmp_path, family, lora=lora, **kw)
    if empty:  # the scenario has them: an empty step, and empty micro-batches of non-empty steps
        assert [] in draws and any(len(b["input_ids"]) == 0 for s, b in trainer.micro_batches if draws[s])
    if lora:
        assert all("lora_" in n or "classifier" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


# torch.compile (Inductor): 30-50 s a graph on 2 CPU cores. Batches padded to 8 tokens (as
# pad_to_multiple_of does) compile twice: the first batch size, then a symbolic one; BERT pads
# to the longest sample (sequence length symbolic too). Llama compiled: with checkpointing below.
COMPILED = [
    pytest.param("gpt2", False, dict(multiple=8), id="gpt2"),
    pytest.param("bert", False, dict(evaluate=True), id="bert-eval", marks=pytest.mark.slow),
    pytest.param("t5", False, dict(multiple=8, seed=1, steps=4), id="t5", marks=pytest.mark.slow),  # [2, 4, 4, 4]
]


@pytest.mark.parametrize("family,lora,kw", COMPILED)
def test_compiled_run_matches_the_oracle_every_step(tmp_path, family, lora, kw):
    _check_run(tmp_path, family, lora=lora, compiled=True, **kw)


CHECKPOINTING = [
    # use_cache=True: transformers logs (logger.warning_once) inside forward that it turns the
    # cache off; LoRA: it hooks requires_grad_() onto the frozen embeddings' output
    pytest.param("gpt2", True, {}, id="gpt2-lora"),
    pytest.param("llama", True, dict(compiled=True, multiple=8, accumulation=2), id="llama-lora-accumulation-compiled",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family,lora,kw", CHECKPOINTING)
def test_gradient_checkpointing_run_matches_the_oracle_every_step(tmp_path, family, lora, kw):
    trainer, _ = _check_run(tmp_path, family, lora=lora, checkpointing=True, use_cache=True, **kw)
    base = L.base_model(trainer.model)
    assert base.is_gradient_checkpointing and base.config.use_cache


def test_t5_gradient_checkpointing_is_refused_by_name(tmp_path):
    """T5 sets `position_bias.requires_grad = True` in its forward while checkpointing, which
    torch.compile cannot trace: refused at the first step, naming the line, nothing trained."""
    torch.manual_seed(0)
    model = _model("t5", lora=False)
    before = copy.deepcopy(model.state_dict())
    args = _args(tmp_path, max_grad_norm=1.0, gradient_checkpointing=True)
    trainer = DPTrainer(model=model, args=args, train_dataset=_data("seq2seq_lm"), data_collator=_collate)
    with pytest.raises(fxclip.PrivacyError, match=r"sets `requires_grad`.*modeling_t5.py.*gradient checkpointing"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_privatize_with_gradient_checkpointing_is_exact(family):
    """A plain privatize() user: gradient_checkpointing_enable() with the model's default
    use_cache=True (a logging call inside forward), padded batches of two sizes."""
    torch.manual_seed(0)
    model = _model(family, lora=False)
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    assert model.config.use_cache and model.is_gradient_checkpointing
    data = _data("causal_lm")
    C = _median_norm(reference, "causal_lm", data)
    pm = fxclip.privatize(model, max_grad_norm=C, loss_fn=L.loss_for("causal_lm"))
    params = [p for p in model.parameters() if p.requires_grad]
    for rows in (data[:5], data[5:8]):
        model.zero_grad()
        batch = _collate(rows)
        labels = batch.pop("labels")
        pm(**batch, target=labels).mean().backward()
        update, _ = _oracle_step(reference, "causal_lm", rows, C, 1.0, len(rows))
        for p, u in zip(params, update):
            torch.testing.assert_close(p.grad, -u, rtol=1e-9, atol=1e-13)
    assert pm.last_report is not None


def test_lora_checkpointing_hook_is_named_and_exact_without_it():
    """gradient_checkpointing_enable() on a LoRA model hooks requires_grad_() onto the frozen
    embeddings' output, which Dynamo cannot trace: the refusal says what to do, and after
    disable_input_require_grads() the gradients are exact."""
    torch.manual_seed(0)
    model = _model("gpt2", lora=True)
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    data = _data("causal_lm")[:4]
    batch = _collate(data)
    labels = batch.pop("labels")
    pm = fxclip.privatize(model, max_grad_norm=0.01, loss_fn=L.loss_for("causal_lm"))
    with pytest.raises(fxclip.PrivacyError, match="disable_input_require_grads"):
        pm(**batch, target=labels)
    model.get_base_model().disable_input_require_grads()
    pm(**batch, target=labels).mean().backward()
    update, factors = _oracle_step(reference, "causal_lm", data, 0.01, 1.0, len(data))
    assert max(factors) < 1
    for p, u in zip([p for p in model.parameters() if p.requires_grad], update):
        torch.testing.assert_close(p.grad, -u, rtol=1e-9, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5"])
def test_batch_sizes_share_one_graph(family):
    """Poisson batch sizes: one recompile (symbolic batch size) serves every later size. T5's
    relative attention bias reaches the loss through the attention mask, and its per-sample
    gradient is instantiated under vmap, where prims.fma (the softmax backward) had no batching
    rule: a loop over the batch fixed the batch size, one recompile per Poisson batch size until
    Dynamo's recompile limit (8) ended the run."""
    counters = torch._dynamo.utils.counters["stats"]
    torch.manual_seed(0)
    model = _model(family, lora=False)
    task = FAMILIES[family][1]
    pm = fxclip.privatize(model, max_grad_norm=1.0, loss_fn=L.loss_for(task))
    data = _data(task)
    before = counters["unique_graphs"]
    for rows in (4, 6, 5, 3):
        batch = _collate(data[:rows], multiple=8)
        labels = batch.pop("labels")
        if task == "seq2seq_lm":
            batch["decoder_input_ids"] = L.decoder_inputs_from_labels(model, labels)
        pm(**batch, target=labels).mean().backward()
    assert counters["unique_graphs"] - before <= 2


def test_the_recompile_limit_is_a_privacy_error_saying_why():
    """A model that recompiles for every batch size (as T5 did) meets Dynamo's recompile limit a
    few Poisson steps in: a PrivacyError saying what happened, not Dynamo's bare 'Hard failure
    due to fullgraph=True'."""
    pm = fxclip.privatize(nn.Linear(3, 2).double(), max_grad_norm=1.0)
    with torch._dynamo.config.patch(recompile_limit=1):
        pm(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
        with pytest.raises(fxclip.PrivacyError, match="recompile limit"):
            pm(torch.randn(5, 3, dtype=torch.float64))
