"""Run by tests/test_ddp.py under torchrun: SFT then DPO with DDP (gloo), each rank saves its adapters."""
import sys

import torch
import torch.distributed as dist

import pyllmops
from pyllmops import train
from pyllmops.models import PROJECTIONS as TARGETS, Decoder, DecoderConfig


def build():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  initializer_range=0.1))
    return pyllmops.apply_lora(model, r=8, alpha=16, target_modules=TARGETS, quantize="nf4")


def run(model, grad_accum):
    h1 = train.sft(model, train.instruction_data()[:80], steps=3, batch_tokens=200, grad_accum=grad_accum, lr=5e-3,
                   warmup_steps=1, progress=False)
    h2 = train.dpo(model, train.preference_data()[:80], steps=3, batch_pairs=4, grad_accum=grad_accum, lr=5e-3,
                   warmup_steps=1, progress=False)
    return h1 + h2


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = build()
    hist = run(model, grad_accum=1)
    torch.save({"adapters": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "history": hist}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
