"""DPTrainer under torchrun: 2 gloo processes (CPU) started as torchrun starts them (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment), bounded by a timeout.

One step equals the one-process DPTrainer step on the union of the ranks' batches (noise 0;
sample rate 1, so every sample is in the step); epsilon is that of the global sample rate and
identical on every rank, also after resuming from a checkpoint.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxclip.accounting import epsilon_for  # noqa: E402
from fxclip.huggingface import DPTrainer, DPTrainingArguments  # noqa: E402

V, T, WORLD = 32, 6, 2


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).double()


def _data(n):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (n, T), generator=g)
    return [{"input_ids": ids[i], "labels": torch.tensor(i % 3)} for i in range(n)]


def _collate(batch):
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def _args(out, per_device, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=per_device, max_steps=1, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, noise_multiplier=0.0,
                max_grad_norm=0.05, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=3)
    base.update(kw)
    return DPTrainingArguments(**base)


def _one_step(out, per_device):
    """One step with sample rate 1 (expected global batch = the dataset)."""
    model = _bert()
    trainer = DPTrainer(model=model, args=_args(out, per_device), train_dataset=_data(4),
                        data_collator=_collate)
    trainer.train()
    return model, trainer


def _worker(outdir):
    rank = int(os.environ["RANK"])
    model, trainer = _one_step(os.path.join(outdir, "step"), per_device=4 // WORLD)
    opt = trainer._dp_optimizer
    torch.save([p.detach() for p in model.parameters()], os.path.join(outdir, f"params-{rank}.pt"))
    result = {"batch": opt.last_batch_size, "local": opt.last_local_batch_size, "q": trainer.sample_rate,
              "mode": opt.mode, "shard": trainer._sampler.batches.indices.tolist()}
    # epsilon on the global rate, equal on every rank, and again after resuming a checkpoint
    out = os.path.join(outdir, "resume")
    kw = dict(noise_multiplier=1.0, max_steps=2, save_strategy="steps", save_steps=1)
    first = DPTrainer(model=_bert(), args=_args(out, 2, **kw), train_dataset=_data(8), data_collator=_collate)
    first.train()
    resumed = DPTrainer(model=_bert(), args=_args(out, 2, **kw), train_dataset=_data(8), data_collator=_collate)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-1"))
    result.update(eps=first.epsilon, eps_resumed=resumed.epsilon, q_resume=first.sample_rate,
                  steps=resumed._dp_optimizer.steps)
    with open(os.path.join(outdir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("trainer"))
    port = str(_free_port())
    procs = []
    for r in range(WORLD):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), outdir], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
    log = "\n".join(f"--- rank {r} ---\n{(text or '')[-4000:]}" for r, text in enumerate(logs))
    results = []
    for r in range(WORLD):
        path = os.path.join(outdir, f"result-{r}.json")
        assert os.path.exists(path), f"rank {r} did not finish:\n{log}"
        results.append(json.load(open(path)))
    params = [torch.load(os.path.join(outdir, f"params-{r}.pt")) for r in range(WORLD)]
    return results, params, outdir


def test_dptrainer_step_on_two_processes_equals_one_process_on_the_union(torchrun_job, tmp_path):
    results, params, _ = torchrun_job
    model, trainer = _one_step(str(tmp_path / "one"), per_device=4)
    assert trainer._dp_optimizer.last_batch_size == 4
    for r, res in enumerate(results):
        assert res["mode"] == "allreduce" and res["q"] == 1.0 and res["batch"] == 4 and res["local"] == 2, res
        for got, want in zip(params[r], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
    assert sorted(results[0]["shard"] + results[1]["shard"]) == [0, 1, 2, 3]  # disjoint shards


def test_dptrainer_epsilon_is_the_global_rates_on_every_rank_and_survives_resuming(torchrun_job):
    results, _, _ = torchrun_job
    want = epsilon_for([(1.0, 0.5, 2)], 1e-5)
    for res in results:
        assert res["q_resume"] == 0.5 and res["steps"] == 2, res
        assert res["eps"] == pytest.approx(want, rel=1e-9) and res["eps_resumed"] == pytest.approx(want, rel=1e-9)


if __name__ == "__main__":
    _worker(sys.argv[1])
