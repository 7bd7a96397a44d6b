"""fxclip.huggingface: DPTrainer's step against a per-sample reference built from the models' own
losses (float64), LoRA, accounting, resuming, torch.compile, refusals."""
import copy
import subprocess
import sys
import threading

import dp_accounting
import peft
import pytest
import torch
import transformers
from torch import nn

import fxclip
from fxclip import noise
from fxclip.huggingface import DPTrainer, DPTrainingArguments
from fxclip.huggingface import losses as L

V, T = 32, 6


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _bert(num_labels=3, **kw):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=num_labels, **kw)
    return transformers.BertForSequenceClassification(cfg).double()


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).double()


def _lm_data(n=4):
    ids = torch.randint(2, V, (n, T))
    labels = ids.clone()
    for i in range(n):
        labels[i, : i % 3] = -100  # samples differ in their number of target tokens
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _cls_data(n=4):
    ids = torch.randint(2, V, (n, T))
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)} for i in range(n)]


def _seq2seq_data(n=4):
    ids = torch.randint(2, V, (n, T))
    labels = torch.randint(2, V, (n, 4))
    labels[0, 3] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, noise_multiplier=0.0,
                max_grad_norm=0.05, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1)
    base.update(kw)
    return DPTrainingArguments(**base)


def _collate(batch):
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def _sample_loss(model, batch):
    """The loss of a batch of one as the model computes it (the mean over the sample's target
    tokens); for causal LMs written out here, as transformers computes that one in float32."""
    if not isinstance(model, transformers.GPT2LMHeadModel):
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    keep = labels != -100
    return -logits.log_softmax(-1)[keep, labels[keep]].mean()


def _reference_step(model, data, lr, C, expected_batch_size):
    """The DP-SGD update with noise 0, from each sample's loss on its own."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    factors = []
    for sample in data:
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        grads = torch.autograd.grad(_sample_loss(model, batch), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        r = min(1.0, C / (norm.item() + 1e-6))
        factors.append(r)
        total = [t + r * g for t, g in zip(total, grads)]
    with torch.no_grad():
        return [p - lr * t / expected_batch_size for p, t in zip(params, total)], factors


def _check_one_step_matches_reference(tmp_path, model, data, **kw):
    reference = copy.deepcopy(model)
    args = _args(tmp_path, **kw)
    expected, factors = _reference_step(reference, data, args.learning_rate, args.max_grad_norm,
                                        args.per_device_train_batch_size)
    assert min(factors) < 1.0, "the test must clip"
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=_collate)
    trainer.train()
    assert trainer.state.global_step == 1 and trainer._dp_optimizer.last_batch_size == len(data)
    assert trainer._dp_optimizer.module.last_report is not None  # fxclip's pass rewrote the graph
    got = [p for p in model.parameters() if p.requires_grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_causal_lm_step_equals_the_per_sample_update(tmp_path, accumulation):
    # sample rate 1 (expected batch = dataset): every sample in the step, split into micro-batches
    trainer = _check_one_step_matches_reference(tmp_path, _gpt2(), _lm_data(),
                                                gradient_accumulation_steps=accumulation)
    assert trainer._dp_optimizer.last_micro_batches == accumulation  # backwards in the one step


def test_sequence_classification_step_equals_the_per_sample_update(tmp_path):
    _check_one_step_matches_reference(tmp_path, _bert(), _cls_data())


def test_seq2seq_step_equals_the_per_sample_update(tmp_path):
    # decoder inputs are built from the labels outside the privatized model, as T5 does inside
    _check_one_step_matches_reference(tmp_path, _t5(), _seq2seq_data())


def test_token_sum_weights_each_token():
    model = _gpt2()
    batch = _collate(_lm_data())
    out = model(input_ids=batch["input_ids"])
    mean = L.loss_for("causal_lm")(out, batch["labels"])
    total = L.loss_for("causal_lm", per_sample_loss="token_sum")(out, batch["labels"])
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    torch.testing.assert_close(total, mean * counts)
    for i in range(len(mean)):  # token_mean is the model's own loss on a batch of one
        one = model(input_ids=batch["input_ids"][i:i + 1], labels=batch["labels"][i:i + 1]).loss
        torch.testing.assert_close(mean[i], one.double(), rtol=1e-6, atol=0)  # transformers: float32
        torch.testing.assert_close(mean[i], _sample_loss(model, {k: v[i:i + 1] for k, v in batch.items()}),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("num_labels,problem_type,labels", [
    (1, None, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)),
    (2, "multi_label_classification", torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)),
])
def test_classification_losses_match_the_model_per_sample(num_labels, problem_type, labels):
    model = _bert(num_labels, problem_type=problem_type)
    ids = torch.randint(2, V, (3, T))
    losses = L.loss_for("sequence_classification", model.config)(model(input_ids=ids), labels)
    for i in range(3):
        torch.testing.assert_close(losses[i], model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss)


def _lora_gpt2():
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    return peft.get_peft_model(_gpt2(), config)


def test_lora_weights_change_and_base_weights_do_not(tmp_path):
    model = _lora_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=2, noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = DPTrainer(model=model, args=args, train_dataset=_lm_data(8), data_collator=_collate)
    trainer.train()
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in lora), n
    assert trainer.epsilon > 0


def test_an_optimizer_missing_trainable_parameters_is_refused(tmp_path):
    model = _lora_gpt2()
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(lora[:1], lr=0.1)  # LoRA weights left out would never train
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_lm_data(), data_collator=_collate,
                        optimizers=(optimizer, None))
    with pytest.raises(fxclip.PrivacyError, match="not in the optimizer"):
        trainer.train()


def _rdp_epsilon(sigma, q, steps, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def _resume_args(tmp_path, name, **kw):
    return _args(tmp_path, output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=6,
                 noise_multiplier=0.8, max_grad_norm=1.0, learning_rate=0.1, save_strategy="steps", save_steps=2,
                 **kw)


def test_epsilon_and_resume_match_an_uninterrupted_run(tmp_path, monkeypatch):
    # bit-for-bit equality: the ghost-or-instantiate choice must not depend on compile-time timings
    # (the resumed run compiles anew, on a loaded machine the timings can choose the other form)
    monkeypatch.setenv("FXCLIP_STRATEGY", "model")
    data = _lm_data(8)  # q = 2/8: 4 steps per epoch, checkpoints mid-epoch (2) and at an epoch's end (4)
    init = _gpt2().state_dict()

    def run(name, resume=None):
        model = _gpt2()
        model.load_state_dict(init)
        trainer = DPTrainer(model=model, args=_resume_args(tmp_path, name), train_dataset=data,
                            data_collator=_collate)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run("full")
    assert full.state.global_step == 6
    assert full.epsilon == pytest.approx(_rdp_epsilon(0.8, 0.25, 6, 1e-5), rel=1e-12)
    logged = [h["epsilon"] for h in full.state.log_history if "loss" in h]
    assert logged == pytest.approx([_rdp_epsilon(0.8, 0.25, s, 1e-5) for s in range(1, 7)], rel=1e-12)
    for step in (2, 4):
        resumed, model = run(f"resumed{step}", resume=str(tmp_path / "full" / f"checkpoint-{step}"))
        assert resumed.state.global_step == 6
        assert resumed.epsilon == full.epsilon
        for (n, p), q in zip(model.named_parameters(), full_model.parameters()):
            assert torch.equal(p, q), (step, n)


class _LogRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_target_epsilon_is_met_and_an_unreachable_one_warned(tmp_path):
    # with the Trainer's usual companions: a user optimizer, a callback, evaluation
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=3, noise_multiplier=None,
                 target_epsilon=2.0, max_grad_norm=1.0, eval_strategy="steps", eval_steps=3)
    model, recorder = _gpt2(), _LogRecorder()
    trainer = DPTrainer(model=model, args=args, train_dataset=_lm_data(8), eval_dataset=_lm_data(4),
                        data_collator=_collate, callbacks=[recorder],
                        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None))
    trainer.train()
    assert 0.99 * 2.0 <= trainer.epsilon <= 2.0
    assert isinstance(trainer.optimizer.optimizer, fxclip.DPOptimizer)  # inside accelerate's wrapper
    assert [log["epsilon"] for log in recorder.logs if "loss" in log][-1] == trainer.epsilon
    assert any("eval_loss" in log for log in recorder.logs)  # the model's own loss, without privacy
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=1, noise_multiplier=0.3,
                 target_epsilon=0.5, max_grad_norm=1.0)
    trainer = DPTrainer(model=_gpt2(), args=args, train_dataset=_lm_data(8), data_collator=_collate)
    with pytest.warns(UserWarning, match="target_epsilon=0.5 cannot be reached") as caught:
        trainer.train()
    assert sum("cannot be reached" in str(w.message) for w in caught) == 1  # warned once


@pytest.mark.slow
def test_torch_compile_step_equals_the_per_sample_update(tmp_path):
    trainer = _check_one_step_matches_reference(tmp_path, _gpt2(), _lm_data(), torch_compile=True)
    assert hasattr(trainer._pm, "_orig_mod")  # the privatized model ran under torch.compile


def test_refusals(tmp_path):
    ok = dict(train_dataset=_lm_data(), data_collator=_collate)
    with pytest.raises(ValueError, match="not Poisson"):
        DPTrainer(model=_gpt2(), args=_args(tmp_path, train_sampling_strategy="group_by_length"), **ok)
    args = _args(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="DeepSpeed"):
        DPTrainer(model=_gpt2(), args=args, **ok)
    with pytest.raises(ValueError, match="plain model"):
        DPTrainer(model=fxclip.privatize(_gpt2(), max_grad_norm=1.0), args=_args(tmp_path), **ok)
    with pytest.raises(ValueError, match="per sample"):
        DPTrainer(model=_gpt2(), args=_args(tmp_path), compute_loss_func=lambda o, y, **kw: o.loss, **ok)
    with pytest.raises(TypeError, match="DPTrainingArguments"):
        DPTrainer(model=_gpt2(), args=transformers.TrainingArguments(str(tmp_path), use_cpu=True), **ok)
    with pytest.raises(ValueError, match="target_epsilon"):
        _args(tmp_path, noise_multiplier=None)
    with pytest.raises(ValueError, match="clipping threshold"):
        _args(tmp_path, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="does not know which loss"):
        DPTrainer(model=nn.Linear(3, 3), args=_args(tmp_path), **ok).train()


def test_a_loss_fn_that_mixes_samples_is_refused(tmp_path):
    def centered(output, labels):  # each loss minus the batch mean: one sample moves another's
        losses = L.token_losses(output, labels, shift=True)
        return losses - losses.mean()

    model = _gpt2()
    before = copy.deepcopy(model.state_dict())
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_lm_data(), data_collator=_collate,
                        loss_fn=centered)
    with pytest.raises(fxclip.PrivacyError, match="mixes samples"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _BypassingTrainer(DPTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return model(**inputs).loss  # then the plain model's batch loss: unclipped gradients


def test_a_loss_that_bypasses_the_privatized_model_is_refused(tmp_path):
    # the second step's backward finds the first step's per-sample norms, which DPOptimizer
    # alone would take for this batch's
    args = _args(tmp_path, max_steps=2, noise_multiplier=1.0)
    trainer = _BypassingTrainer(model=_gpt2(), args=args, train_dataset=_lm_data(), data_collator=_collate)
    with pytest.raises(fxclip.PrivacyError, match="did not go through the privatized model"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer._dp_optimizer.steps == 1


def test_the_core_package_does_not_import_transformers():
    code = "import sys, fxclip; assert 'transformers' not in sys.modules and 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefetched_noise_is_the_forked_stream_at_every_step(tmp_path, monkeypatch):
    """DPTrainingArguments(prefetch_noise=True): BERT on padded rows (attention masks), two steps;
    each update is the per-sample reference step plus sigma C / B times the next values of the
    optimizer's own generator, the second step's drawn on the worker thread."""
    threads, fill = [], noise.NoiseSource._fill  # every draw fills its run's pieces
    monkeypatch.setattr(noise.NoiseSource, "_fill",
                        lambda self, *a: threads.append(threading.current_thread().name) or fill(self, *a))
    model, data = _bert(), _cls_data()
    reference = copy.deepcopy(model)
    sigma, args = 0.7, _args(tmp_path, noise_multiplier=0.7, max_steps=2, prefetch_noise=True)
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=_collate)
    trainer.train()
    opt = trainer._dp_optimizer
    assert opt.prefetch_noise and trainer.state.global_step == 2
    # the stream: the forked generator from its seed, in the optimizer's parameter order
    values = torch.Generator().manual_seed(opt.noise_source.generator.initial_seed())
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for _ in range(2):
        expected, _ = _reference_step(reference, data, args.learning_rate, args.max_grad_norm, 4)
        z = {names[id(p)]: torch.randn(p.shape, dtype=p.dtype, generator=values) for p in opt._params}
        with torch.no_grad():
            for (n, p), e in zip(trainable.items(), expected):
                p.copy_(e - args.learning_rate * sigma * args.max_grad_norm * z[n] / 4)
    for (n, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12, msg=n)
    opt.noise_source._wait()
    assert threads[0] == "MainThread" and len(threads) == 3
    assert all(t.startswith("fxclip-noise") for t in threads[1:])  # the 2nd step's and the next's
