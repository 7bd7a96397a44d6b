"""Every refusal fxclip raises, by a stable id: `raise refusal("graph-break")`.

The id stays when the wording changes: tests and users' code match `err.id`, the message says
what to change. A leaf module.
"""
from __future__ import annotations

from .errors import PrivacyError

REFUSALS = {
    # --- the graph pass ---
    "not-rewritten": (
        "this privatized model ran without fxclip's graph rewrite, so its gradients would not be "
        "clipped. Call it eagerly or compile it with the default Inductor backend: torch.compile(pm)."),
    "graph-break": (
        "the privatized model was split into several compiled graphs (a graph break), so no single "
        "graph sees every parameter's per-sample gradient and the clipping would be wrong. Remove the "
        "graph break (run torch._dynamo.explain(model)(x) to find it), or compile with fullgraph=True "
        "to see where it happens."),
    "several-models": (
        "one compiled graph holds several privatized models; compile each privatized model on its own "
        "(torch.compile(pm)) and call them separately."),
    "loss-shape": (
        "loss_fn(output, target) returned a tensor of shape {shape}; it must return the per-sample "
        "losses, one number per sample: shape (B,) (e.g. F.cross_entropy(out, y, reduction=\"none\"); "
        "for token losses, reduce each sample's tokens inside loss_fn)."),
    "boundary-batch-size": (
        "a model {kind} has {size} but the first input has batch size {batch}: every "
        "tensor input and output of a privatized model must hold one row per sample "
        "in dim 0. Pass per-sample tensors (shared constants belong in the module as "
        "buffers), and return per-sample outputs (logits, or unreduced losses of shape "
        "(B,)), reducing them outside the model as loss_reduction says."),
    "output-gradient-batch-size": (
        "the model output has batch size {size} but the input has {batch}: every output of a "
        "privatized model must have the batch in dim 0."),
    "gradient-without-clip": (
        "internal error, refused: the gradient of parameter {name!r} does not depend on "
        "the clip factors, so it would reach .grad unclipped. Please report this model."),
    "trained-outside-model": (
        "{what} would receive an unclipped gradient: it is trained inside the compiled "
        "region but is not a trainable parameter of the privatized model. Move it into the "
        "model passed to fxclip.privatize, or freeze it (requires_grad_(False))."),
    "mixes-samples": (
        "{op}{where} mixes samples: it combines values across the batch "
        "dimension, so one sample's data would reach other samples' gradients and "
        "per-sample clipping would not bound its influence. {hint}"),
    "fused-rnn": "{op}{where}: {hint}",
    "embedding-bag-layout": "{op}{where}: {hint}",
    "unknown-batch-layout": (
        "{op}{where}: fxclip cannot prove that this op keeps samples "
        "independent (batch layout unknown). {hint}"),
    "parameter-modified-in-forward": (
        "parameter '{name}' is modified in place inside the privatized model's forward "
        "(e.g. `with torch.no_grad(): self.weight.mul_(...)`). Such updates bypass "
        "clipping and noise. Change parameters only outside the forward (in the optimizer "
        "step), or compute a new tensor from the parameter instead "
        "(torch.nn.utils.parametrize)."),
    "buffer-written-from-batch": (
        "{what}: a buffer written inside the forward from the batch's values would carry "
        "statistics of the samples out of the step without clipping or noise. Keep such modules in "
        "eval mode, build them with track_running_stats=False, or update the buffer outside the model."),
    "embedding-scale-grad-by-freq": (
        "nn.Embedding(scale_grad_by_freq=True) divides each token's gradient by its count "
        "over the whole batch, which couples samples: per-sample clipping cannot bound a "
        "sample's influence. Use scale_grad_by_freq=False."),
    "strided-view-of-non-contiguous": (
        "a strided view (as_strided) of a non-contiguous tensor{where} has a backward "
        "the per-sample gradient fallback cannot replay per sample; express the view "
        "with reshape/permute, or call .contiguous() before it."),
    "recompile-limit": (
        "the privatized model was compiled for more input shapes than Dynamo's recompile limit "
        "({limit}) allows, so it cannot run for this one. Usually an op fixed the batch size to a "
        "number, so that every new Poisson batch size compiles a new graph (fxclip.explain(model, x) "
        "shows the graph's ops; please report the model). Pad batches to a few sizes "
        "(fxclip.make_private(..., pad_to_multiple=k) pads rows with weight 0), or raise "
        "torch._dynamo.config.recompile_limit."),
    # --- tracing (see passes/_torch.tracing_failure) ---
    "untraceable-requires-grad-set": (
        "{head}: the forward sets `requires_grad` on a tensor{at}. torch.compile cannot "
        "trace that. Remove the assignment from the forward (fxclip's backward reaches "
        "every trainable parameter without it). Hugging Face models set it only for "
        "gradient checkpointing: T5 on its zero position bias while checkpointing is on "
        "(train T5 without gradient checkpointing), wav2vec2-style feature encoders (set "
        "`model.feature_extractor._requires_grad = False`; its parameters still train)."),
    "untraceable-requires-grad-hook": (
        "{head}: the forward calls requires_grad_() on an intermediate tensor{at} ({first}). "
        "Hugging Face's gradient_checkpointing_enable() (and PEFT) add such a hook to the "
        "input embeddings, for reentrant checkpointing with frozen embeddings: call "
        "`model.disable_input_require_grads()` after enabling checkpointing. fxclip traces "
        "the checkpointed layers into its one graph and needs no such hook."),
    "untraceable-data-dependent": (
        "{head}: control flow{at} depends on tensor values (a loop or branch over "
        "data-dependent values, such as a Mixture-of-Experts loop `for expert_idx in "
        "expert_hit`), so the graph's shape is not known at trace time. Compute every "
        "branch for every sample and combine with masks or torch.where (e.g. run each "
        "expert on all tokens and weight its output by the routing weights), or move the "
        "data-dependent part out of the privatized model. ({first})"),
    "untraceable": "{head}: {first}{at}. Make the forward traceable by torch.compile(fullgraph=True).",
    # --- the privatized module's inputs and calls ---
    "inputs-batch-sizes-disagree": (
        "the inputs' batch sizes disagree: {sizes} (tensor inputs in flattened order). Every tensor "
        "input must hold one row per sample in dim 0, all with the same number of samples; pass "
        "shared tensors (masks, tables) as module buffers instead."),
    "zero-dim-input": (
        "input {i} (in flattened order) is a 0-d tensor: every tensor input of a "
        "privatized model must hold one row per sample in dim 0. Pass a per-sample "
        "tensor of shape (B, ...), or keep shared values in the module (a buffer or "
        "attribute) or as a Python number."),
    "packed-sequence-input": (
        "input {i} (in flattened order) is a PackedSequence: it packs every sample's steps "
        "into one tensor ordered by time, so it has no batch dim to clip per sample. Pass "
        "the padded batch (B, T, ...) instead (with batch_first=True for nn.LSTM/GRU/RNN) "
        "and mask or gather the padded steps, e.g. h[arange(B), lengths - 1]."),
    "unsplittable-input": (
        "input {i} (in flattened order) is a {type}, which fxclip cannot "
        "split into samples. Pass torch.Tensors with the batch in dim 0, possibly nested in "
        "tuples, lists and dicts (register other containers with "
        "torch.utils._pytree.register_pytree_node); numpy arrays: torch.from_numpy(a)."),
    "no-tensor-input": (
        "the privatized model got no tensor input, so there is no batch to clip per sample. "
        "Pass the batch as torch.Tensors with the samples in dim 0."),
    "double-backward": (
        "backward with create_graph=True (double backward: gradient penalties, MAML, Hessian-vector "
        "products) through a privatized model is not supported: fxclip clips first-order per-sample "
        "gradients only. Call loss.backward() without create_graph, or compute higher-order terms with "
        "the plain model (fxclip.unprivatize(pm))."),
    "already-privatized": "this model is already privatized; pass the inner model (pm.module)",
    "embedding-max-norm": (
        "{where}: max_norm={max_norm} renormalizes rows of the weight in place "
        "inside the forward, from the batch's ids: an update of the model that bypasses "
        "clipping and noise. Use max_norm=None (renormalize in the optimizer step if you "
        "need it)."),
    "sparse-embedding": (
        "{where}: sparse=True gives sparse gradients, which the joint graph cannot carry "
        "per sample. Use nn.{type}(..., sparse=False)."),
    # --- the step ---
    "nonfinite": (
        "{count} sample(s) since the last step had a non-finite gradient (inf or NaN; rows {rows} of "
        "the latest batch), so no clipped "
        "gradient exists for them; the step was refused and no parameter changed. Find the cause "
        "(e.g. log(0) in the loss, float16 overflow without a GradScaler connected to fxclip, a too "
        "large learning rate), or pass nonfinite=\"drop\" to give such samples zero weight."),
    "bad-reduction": (
        "the gradient arriving at the per-sample losses was not the same for every sample as "
        "losses.{reduction}() gives (loss_reduction={reduction!r}): the loss outside the privatized "
        "module weighted or mixed the samples (or scaled the loss), which breaks the sensitivity bound "
        "the noise relies on. The step was refused and no parameter changed. Reduce the per-sample "
        "losses with exactly losses.{reduction}() (scale the learning rate, not the loss; for fp16 "
        "connect the GradScaler with privatize(..., grad_scaler=scaler))."),
    "unknown-scaler": (
        "this step comes from a GradScaler that fxclip was not told about: the backward was scaled, "
        "so every per-sample gradient was clipped at the scaled threshold and the update would be "
        "wrong. No parameter changed. Connect the scaler: fxclip.privatize(model, ..., "
        "grad_scaler=scaler) or fxclip.make_private(..., grad_scaler=scaler)."),
    "scaler-not-stepping": (
        "the privatized module is connected to a GradScaler, so its gradients are scaled: call "
        "scaler.step(optimizer) (then scaler.update()), not optimizer.step(). No parameter changed."),
    "no-backward": (
        "a parameter has a gradient but the privatized module recorded no backward since the last "
        "step: was the loss computed through the privatized module (pm(x), not model(x))? No "
        "parameter changed."),
    "noise-below-clipping": (
        "the noise threshold max_grad_norm={noise} is now below the "
        "module's clipping bound {bound}: the noise would not "
        "cover the sensitivity. Lower pm.max_grad_norm or raise the optimizer's."),
    "unprivatized-parameter-released": (
        "{count} optimizer parameter(s) outside the privatized module became trainable or hold a "
        "gradient since the optimizer was built: their gradients are not clipped. Freeze them "
        "(requires_grad_(False) and .grad = None) or privatize the model that holds them. No "
        "parameter changed."),
    "parameters-not-in-optimizer": (
        "{count} trainable parameter(s) of the privatized module are not in the "
        "optimizer (first: {first!r}): they would never be updated while the privacy "
        "budget is spent. Build the optimizer over all trainable parameters "
        "(model.parameters()), or freeze the others with requires_grad_(False) before privatize."),
    # --- Hugging Face and several processes ---
    "loss-bypassed-model": (
        "the training loss did not go through the privatized model, so its gradients "
        "are not clipped per sample. If you override compute_loss, call "
        "super().compute_loss (it runs the privatized model)."),
    "checkpoint-steps": (
        "the checkpoint {checkpoint} holds {accounted} accounted steps "
        "but {trained} trained ones: resuming would under-report epsilon. Resume "
        "from a checkpoint that DPTrainer wrote with save_only_model=False."),
    "checkpoint-not-dp": "{path} is missing: the checkpoint was not written by DPTrainer",
    "parameters-outside-blocks": (
        "trainable parameters outside every block would get unclipped gradients: "
        "{missing}. Add their module to `blocks`, or freeze them."),
    # --- privacy units ---
    "units-missing": (
        "this privatized module clips privacy units (make_private(..., privacy_unit=\"user\")), but "
        "a training forward got no unit ids: its rows would be clipped one by one while the "
        "accounting is per unit, so one unit could move the update by more than C. Train on the "
        "batches of the loader make_private returned (it tells the module each batch's ids), or "
        "pass privacy_unit=ids yourself."),
    "units-rows-mismatch": (
        "the loader's batch has {expected} rows (and unit ids) but this training forward got "
        "{got} rows: a unit-level batch trains in one forward and one backward (splitting it "
        "could split a unit, each part clipped to C). Call the module on the whole batch, or pass "
        "privacy_unit=ids for the rows you pass."),
    "units-two-sources": (
        "this forward got privacy_unit= ids while the unit-level loader set the batch's ids: the "
        "accounting is for the loader's units, so clipping other groups could break it. Drop "
        "privacy_unit= (the loader's ids are used), or use a loader that sets no ids."),
    "units-several-backwards": (
        "{count} backward passes fed this step, but unit-level clipping needs each unit's rows in "
        "one backward (a unit split over two would be clipped twice, moving the update by up to "
        "2C). Run one backward per unit-level batch (no gradient accumulation over parts of it)."),
}


def refusal(id: str, **fields) -> PrivacyError:
    """The PrivacyError of refusal `id`, its message filled with `fields`."""
    return PrivacyError(REFUSALS[id].format(**fields), id=id)
