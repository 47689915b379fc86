"""FSDP2 QLoRA jobs, run by tests/test_fsdp.py under torchrun (gloo, CPU) and in-process at world size 1.

python fsdp_worker.py OUT JOB [JOB ...]; each JOB is "name:opt,opt,..." and every rank writes
OUT/<name>-rank<r>.pt with the job's history, its adapters (whole) and this rank's share of the 4-bit bytes.
  train:<quantize>[,bf16][,ckpt][,offload]  SFT 3 steps then DPO 2 steps with fsdp=True
  save:<dir>                                 SFT 4 steps, checkpoints at steps 2 and 4 in <dir>
  resume:<dir>                               the same 4-step SFT resumed from checkpoint <dir>
  measure:<json>                              pyllmops.plan.measure on real CPU tensors, FSDP over this group
                                             (json: {"config": DecoderConfig kwargs, "setup": plan.Setup kwargs})
  load:<dir>[,fsdp]                           models.from_pretrained(<dir>, "nf4") (sharded per layer with
                                             fsdp); records the peak RSS it added (ru_maxrss minus the RSS
                                             before; run it first in a fresh process) and logits of a fixed input
"""
import os
import resource
import sys

import torch
import torch.distributed as dist

import pyllmops
from pyllmops import train
from pyllmops.models import PROJECTIONS as TARGETS, Decoder, DecoderConfig
from pyllmops.train import fsdp

TOTAL_ACCUM = 2  # micro-batches per optimizer step over all ranks: the same plan at every world size


def build(quantize="nf4"):
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  initializer_range=0.1))
    return pyllmops.apply_lora(model, r=8, alpha=16, target_modules=TARGETS, quantize=quantize)


def _sft(model, steps, **kw):
    return train.sft(model, train.instruction_data()[:80], steps=steps, batch_tokens=200, lr=5e-3, warmup_steps=1,
                     progress=False, grad_accum=TOTAL_ACCUM // dist.get_world_size(), fsdp=True, **kw)


def _dpo(model, steps, **kw):
    return train.dpo(model, train.preference_data()[:80], steps=steps, batch_pairs=4, lr=5e-3, warmup_steps=1,
                     progress=False, grad_accum=TOTAL_ACCUM // dist.get_world_size(), fsdp=True, **kw)


def run_job(job):
    """-> {"history", "adapters", "shard"} of one job (see the module docstring)."""
    kind, _, arg = job.partition(":")
    opts = arg.split(",")
    if kind == "train":
        model = build(None if opts[0] == "none" else opts[0])
        kw = dict(bf16="bf16" in opts, activation_checkpointing="ckpt" in opts, fsdp_offload="offload" in opts)
        history = _sft(model, 3, **kw) + _dpo(model, 2, **kw)
    elif kind == "measure":
        import json

        from pyllmops import plan

        spec = json.loads(arg)
        setup = plan.Setup(**spec["setup"])
        return {"peak": plan.measure(DecoderConfig(**spec["config"]), setup, fake=False)}
    elif kind == "load":
        from pyllmops.models.loading import from_pretrained

        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        model = from_pretrained(opts[0], "nf4", lora=dict(r=4, alpha=8, target_modules=TARGETS),
                                fsdp="fsdp" in opts)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        with torch.no_grad():
            logits = model(torch.arange(24).reshape(2, 12) % model.config.vocab_size)
        return {"peak_added": peak - before, "logits": logits, "shard": fsdp.shard_bytes(model)}
    elif kind == "save":
        model = build()
        history = _sft(model, 4, checkpoint_dir=arg, checkpoint_every=2)
    elif kind == "resume":
        model = build()
        history = _sft(model, 4, resume_from=arg)
    else:
        raise ValueError(f"unknown job {job!r}")
    return {"history": history, "adapters": fsdp.full_trainable_state_dict(model), "shard": fsdp.shard_bytes(model)}


def main(out, *jobs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for i, job in enumerate(jobs):
        torch.save(run_job(job), os.path.join(out, f"job{i}-rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
