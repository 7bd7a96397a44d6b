"""DPTrainer: transformers' Trainer with DP-SGD (per-sample clipping, Poisson sampling, noise,
accounting).

What changes against transformers.Trainer, hook by hook:
- get_train_dataloader: Poisson batches with q = per_device_train_batch_size * world_size /
  len(dataset), each split into gradient_accumulation_steps micro-batches (one optimizer step =
  one Poisson draw); the loader bypasses accelerate.prepare, which would re-batch or shard it.
  Several processes (torchrun): each draws its disjoint shard with the global q.
- create_optimizer: privatizes the model and wraps the optimizer in DPOptimizer (noise once per
  step, division by the expected batch size, one accounted step per step); several processes:
  fxclip.distributed.DistributedDPOptimizer (clipped sums all-reduced in step(), noise added
  once by rank 0, the step's checks decided on all ranks together). accelerate's DDP wrapper
  stays unused: the privatized model runs outside it, so its reducer never fires.
- compute_loss (training): labels are popped; the model runs privatized without them and each
  sample's loss is computed from the logits by loss_fn inside the privatized graph
  (fxclip.huggingface.losses), then reduced with exactly .mean(); evaluation keeps the model's
  own loss.
- training_step: backward of the micro-batch's mean loss, not divided by the accumulation steps
  (DPOptimizer rescales each backward exactly); empty micro-batches skip the forward.
- gradient checkpointing: the hooks transformers/PEFT add to make the input embeddings' output
  require grad are removed at each train() (fxclip traces checkpointed layers without them).
- HF's global gradient-norm clipping and grad_norm logging are off: args.max_grad_norm is the
  per-sample threshold C, and the un-noised gradient's norm must not be logged.
- checkpoints: the accountant (in DPOptimizer's state_dict, optimizer.pt) and the sampler's RNG
  (fxclip_dp_sampler.pt; one file per process under torchrun) are saved and restored.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainingArguments
from transformers.utils import is_datasets_available

from ..accounting import epsilon_for, noise_multiplier_for
from ..optim import DPOptimizer
from ..passes.refusals import refusal
from ..privatize import PrivatizedModule, privatize
from ..sampling import _EmptyAwareCollate, _rows
from . import losses as L
from .sampling import PoissonMicroBatchSampler

SAMPLER_STATE = "fxclip_dp_sampler.pt"


@dataclasses.dataclass
class DPTrainingArguments(TrainingArguments):
    """TrainingArguments for DP-SGD.

    per_device_train_batch_size is the EXPECTED (Poisson) logical batch size, and max_grad_norm
    the per-sample clipping threshold C. Give target_epsilon (with target_delta) to calibrate the
    noise for the planned steps, or noise_multiplier directly.
    """

    target_epsilon: float | None = dataclasses.field(
        default=None, metadata={"help": "Privacy budget: the noise is calibrated so that the planned "
                                        "steps spend it (with target_delta)."})
    target_delta: float = dataclasses.field(
        default=1e-5, metadata={"help": "delta of (epsilon, delta)-DP; keep it below 1 / dataset size."})
    noise_multiplier: float | None = dataclasses.field(
        default=None, metadata={"help": "sigma: noise std on the clipped gradient sum is sigma * C."})
    per_sample_loss: str = dataclasses.field(
        default="token_mean", metadata={"help": "A sample's loss over its tokens: 'token_mean' or 'token_sum'."})
    accountant: str = dataclasses.field(default="rdp", metadata={"help": "'rdp' or 'pld' (dp_accounting)."})
    secure_rng: bool = dataclasses.field(
        default=False, metadata={"help": "Draw the noise from the OS's CSPRNG (real deployments); "
                                         "default: torch's seedable RNG (research, tests)."})
    prefetch_noise: bool = dataclasses.field(
        default=False, metadata={"help": "Draw each step's noise ahead on a worker thread while the "
                                         "forward and backward run (CPU training; see fxclip.noise)."})
    noise_rng: str = dataclasses.field(
        default="torch", metadata={"help": "'torch' (torch.randn) or 'philox': a counter-based stream about "
                                           "twice as fast on CPU (fxclip.philox)."})

    def __post_init__(self):
        super().__post_init__()
        if self.per_sample_loss not in L.PER_SAMPLE_LOSSES:
            raise ValueError(f"per_sample_loss must be one of {L.PER_SAMPLE_LOSSES}, got {self.per_sample_loss!r}")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("DPTrainingArguments needs target_epsilon= (with target_delta=) or noise_multiplier=")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}")
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm is the per-sample clipping threshold C of DP-SGD: give a "
                             f"positive number, got {self.max_grad_norm!r}")


class DPTrainer(Trainer):
    """transformers.Trainer that trains with DP-SGD; `trainer.epsilon` is the privacy spent so far.

    Extra arguments: task= (one of fxclip.huggingface.losses.TASKS) when the model's class does
    not tell, or loss_fn=fn(outputs, labels) -> per-sample losses (B,) for a custom loss.
    """

    def __init__(self, model=None, args: DPTrainingArguments | None = None, *more, task: str | None = None,
                 loss_fn=None, **kwargs):
        if not isinstance(args, DPTrainingArguments):
            raise TypeError("DPTrainer needs args=DPTrainingArguments(...) (the privacy settings live there)")
        _refuse_unsupported_args(args)
        _refuse_wrapped_model(model)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func returns a batch loss, which DP-SGD cannot clip per sample; "
                             "pass loss_fn=fn with fn(outputs, labels) -> one loss per sample, shape (B,)")
        super().__init__(model, args, *more, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("DPTrainer uses one device per process: launch one process per GPU with "
                             "torchrun (DataParallel over several GPUs in one process is not supported)")
        self._task, self._custom_loss_fn = task, loss_fn
        self._pm = None  # the privatized model (compiled when args.torch_compile)
        self._dp_optimizer = None
        self._sampler = None
        self._warned_budget = False

    # ---- privacy accounting ----

    @property
    def expected_batch_size(self) -> int:
        """The global expected Poisson batch: per_device_train_batch_size on every process."""
        return self.args.per_device_train_batch_size * self.args.world_size

    @property
    def sample_rate(self) -> float:
        n = len(self.train_dataset)
        if self.expected_batch_size > n:
            raise ValueError(f"per_device_train_batch_size {self.args.per_device_train_batch_size} x "
                             f"{self.args.world_size} process(es) (the expected Poisson batch size) exceeds "
                             f"the dataset size {n}")
        return self.expected_batch_size / n

    @property
    def epsilon(self) -> float:
        """epsilon spent so far at args.target_delta (0 before the first step)."""
        if self._dp_optimizer is None:
            return 0.0
        return self._dp_optimizer.epsilon(self.args.target_delta)

    def _noise_multiplier(self, steps: int) -> float:
        a, q = self.args, self.sample_rate
        if a.noise_multiplier is not None:
            sigma = float(a.noise_multiplier)
        else:
            sigma = noise_multiplier_for(a.target_epsilon, a.target_delta, q, steps, mechanism=a.accountant)
        if a.target_epsilon is not None:
            planned = epsilon_for([(sigma, q, steps)], a.target_delta, a.accountant)
            self._check_budget(planned, f"the {steps} planned steps with noise_multiplier={sigma}")
        return sigma

    def _check_budget(self, epsilon: float, what: str) -> None:
        target = self.args.target_epsilon
        if target is not None and epsilon > target * (1 + 1e-6) and not self._warned_budget:
            self._warned_budget = True
            warnings.warn(f"target_epsilon={target} cannot be reached: {what} spend epsilon={epsilon:.4g}. "
                          "Raise noise_multiplier (or leave it out to calibrate it), train fewer steps, or "
                          "accept the larger epsilon.", stacklevel=3)

    # ---- hooks of transformers.Trainer ----

    def _build_accelerator_args(self, **kwargs):
        # torch_compile applies to the privatized model (see _privatized), not to the plain one
        args = super()._build_accelerator_args(**kwargs)
        args.pop("dynamo_plugin", None)
        return args

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("Poisson sampling needs a dataset with a length and random access; "
                             "an IterableDataset cannot be Poisson-sampled")
        collator = self.data_collator
        if _is_datasets_dataset(dataset):  # as the Trainer does: drop the columns forward() does not take
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(seed)
        self._sampler = PoissonMicroBatchSampler(len(dataset), self.sample_rate,
                                                 self.args.gradient_accumulation_steps, generator,
                                                 rank=self.args.process_index, world_size=self.args.world_size)
        # not passed through accelerator.prepare: it would rebuild the batches
        return DataLoader(dataset, batch_sampler=self._sampler, collate_fn=_EmptyAwareCollate(dataset, collator),
                          num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=self.args.dataloader_persistent_workers
                          and self.args.dataloader_num_workers > 0)

    def create_optimizer(self, model=None):
        _drop_input_require_grads_hooks(self.model)  # train() has just (re)enabled checkpointing
        if self._dp_optimizer is not None and self._dp_optimizer.module.module is self.model:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper from an earlier train()
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        pm = self._privatized()
        dp_optimizer = DPOptimizer
        if self.args.world_size > 1:
            from ..distributed import DistributedDPOptimizer as dp_optimizer
        self._dp_optimizer = dp_optimizer(
            optimizer, pm, noise_multiplier=self._noise_multiplier(self.state.max_steps),
            expected_batch_size=self.expected_batch_size, max_grad_norm=self.args.max_grad_norm,
            loss_reduction="mean", sample_rate=self.sample_rate, secure_rng=self.args.secure_rng,
            prefetch_noise=self.args.prefetch_noise, noise_rng=self.args.noise_rng,
            accountant=self.args.accountant)
        self.optimizer = self._dp_optimizer
        return self.optimizer

    def _privatized(self):
        _refuse_wrapped_model(self.model)
        if self._custom_loss_fn is None and self._task is None:
            self._task = L.task_of(self.model)
        self._loss_fn = self._custom_loss_fn or L.loss_for(
            self._task, getattr(L.base_model(self.model), "config", None),
            per_sample_loss=self.args.per_sample_loss, label_smoothing=self.args.label_smoothing_factor)
        # the per-sample loss is traced with the model: a loss that mixes samples is refused, and
        # the backward checks that exactly losses.mean() followed
        pm = privatize(self.model, max_grad_norm=self.args.max_grad_norm, loss_reduction="mean",
                       loss_fn=self._loss_fn)
        self._pm = pm
        if self.args.torch_compile:
            self._pm = torch.compile(pm, backend=self.args.torch_compile_backend or "inductor",
                                     mode=self.args.torch_compile_mode)
        return pm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (torch.is_grad_enabled() and self.model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # evaluation
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("DPTrainer needs `labels` in every training batch: each sample's loss is "
                             "computed from them outside the model")
        if self._task == "seq2seq_lm" and "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
            inputs["decoder_input_ids"] = L.decoder_inputs_from_labels(self.model, labels)
        losses = self._pm(**inputs, target=labels)  # (B,): the model's output never leaves the graph
        loss = losses.mean()
        return (loss, {"losses": losses}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        rows = _rows(inputs)
        if rows == 0:  # an empty micro-batch adds nothing; step() still adds the noise
            return torch.zeros((), device=self.args.device)
        pm = self._dp_optimizer.module
        before = pm.read_state()["backwards"]
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        # plain backward: not divided by the accumulation steps (DPOptimizer sums micro-batches exactly)
        loss.backward()
        state = pm.read_state()  # one host sync, as the Trainer's own nan check of the loss does
        if state["backwards"] != before + 1 or state["batch_size"] != rows:
            raise refusal("loss-bypassed-model")
        # logged loss: the logical batch's summed sample losses over the expected batch size (the
        # Trainer averages it over the processes: times world_size makes that the global sum)
        return loss.detach() * (rows * self.args.world_size / self._dp_optimizer.expected_batch_size)

    def _clip_grad_norm(self, model):
        return None  # clipping is per sample, in the backward; a global clip would change the update

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # the norm of the un-noised gradient is not private: never log it

    def log(self, logs, start_time=None):
        if self._dp_optimizer is not None and self._dp_optimizer.steps > 0:
            logs = {**logs, "epsilon": self.epsilon}
            self._check_budget(logs["epsilon"], f"the {self._dp_optimizer.steps} steps taken")
        super().log(logs, start_time)

    # ---- checkpoints ----

    def _sampler_state_path(self, directory: str) -> str:
        """This process's sampler state file (each process draws its own shard)."""
        if self.args.world_size == 1:
            return os.path.join(directory, SAMPLER_STATE)
        return os.path.join(directory, SAMPLER_STATE.replace(".pt", f"_{self.args.process_index}.pt"))

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        if self._sampler is not None and (self.args.should_save or self.args.world_size > 1):
            torch.save(self._sampler.state_dict(), self._sampler_state_path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self._dp_optimizer.accountant.steps != self.state.global_step:
            raise refusal("checkpoint-steps", checkpoint=checkpoint, accounted=self._dp_optimizer.accountant.steps,
                          trained=self.state.global_step)
        path = self._sampler_state_path(checkpoint)
        if not os.path.isfile(path):
            raise refusal("checkpoint-not-dp", path=path)
        mid_epoch = self.state.global_step % self._sampler.batches_per_epoch != 0 and not self.args.ignore_data_skip
        self._sampler.load_state_dict(torch.load(path, weights_only=True), mid_epoch=mid_epoch)


def _is_datasets_dataset(dataset) -> bool:
    if not is_datasets_available():
        return False
    import datasets
    return isinstance(dataset, datasets.Dataset)


def _refuse_unsupported_args(args: DPTrainingArguments) -> None:
    if args.deepspeed:
        raise ValueError("DPTrainer does not support DeepSpeed: its engine owns the backward, gradient "
                         "accumulation and clipping. Train without deepspeed=")
    if args.fsdp:
        raise ValueError("DPTrainer does not support FSDP through the Trainer (accelerate would shard the "
                         "model before fxclip privatizes it). Use DPTrainer with torchrun for data "
                         "parallelism (replicated model), or for sharded DP-SGD your own loop with "
                         "fxclip.privatize then torch.distributed.fsdp.fully_shard and "
                         "fxclip.distributed.DistributedDPOptimizer (docs/distributed.md)")
    strategy = "group_by_length" if getattr(args, "group_by_length", False) else args.train_sampling_strategy
    if strategy != "random":
        raise ValueError(f"train_sampling_strategy={strategy!r} is not Poisson sampling, "
                         "which DP-SGD's accounting assumes (length-grouped or rebalanced batches depend on "
                         "the data). Leave train_sampling_strategy='random': DPTrainer draws Poisson batches.")
    if args.fp16:
        raise ValueError("fp16 loss scaling is not supported by DPTrainer: use bf16=True or float32")
    if args.auto_find_batch_size:
        raise ValueError("auto_find_batch_size changes the batch size, and so the sampling rate the privacy "
                         "accounting assumes; to save memory keep per_device_train_batch_size and raise "
                         "gradient_accumulation_steps (each Poisson batch is split into micro-batches)")


def _drop_input_require_grads_hooks(model) -> None:
    """Remove the hooks with which transformers' gradient checkpointing (and PEFT) make the input
    embeddings' output require grad: reentrant checkpointing with frozen embeddings needs it in
    eager PyTorch. fxclip traces the checkpointed layers into its one graph, reentrant or not, where
    the hook changes no gradient, and Dynamo refuses requires_grad_() on an intermediate tensor."""
    disable = getattr(L.base_model(model), "disable_input_require_grads", None)
    if callable(disable):
        disable()


def _refuse_wrapped_model(model) -> None:
    if model is None:
        return
    if isinstance(getattr(model, "_orig_mod", model), PrivatizedModule):
        raise ValueError("pass the plain model to DPTrainer: it privatizes the model itself")
    if hasattr(model, "_orig_mod"):
        raise ValueError("pass the model before torch.compile to DPTrainer and set torch_compile=True: the "
                         "privatized model is what gets compiled")
