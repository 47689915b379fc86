"""Model-level benchmark: one QLoRA SFT step (forward, loss, backward, AdamW step on the adapters) of a
small Llama-shaped decoder, ours against the usual stack, side by side in one run.

  peer (baseline): transformers' LlamaForCausalLM (SDPA attention) whose seven projections per block
                   are bitsandbytes Linear4bit (NF4, blocksize 64, double quant), with peft LoRA on them
  pyllmops:        pyllmops.models.Decoder (flash_attention, the fused ops of pyllmops.nn.fused) with
                   apply_lora(quantize="nf4"); its loss is Decoder.loss (the peer's labels= loss, computed
                   by the chunked linear + cross-entropy)

Same sizes, rank, targets, tokens, loss and optimizer; fp32 activations on the CPU. Reported per provider:
the step's median time, and its peak memory above the resting footprint (CUDA: max_memory_allocated;
CPU: the process's peak RSS, VmHWM, reset through /proc/self/clear_refs before the step after
malloc_trim has returned freed heap pages, minus the RSS before it). `python -m pyllmops bench model` runs
it alone, `python -m pyllmops bench lora` ends with it (one row per provider); `python -m pyllmops.bench.model`
prints where our step's time goes (breakdown()).
"""
import ctypes
import ctypes.util
import time
import types
from pathlib import Path

import torch
from torch import nn

import pyllmops
from pyllmops.models.decoder import PROJECTIONS

TARGETS = list(PROJECTIONS)


def sizes(bench):
    """(config kwargs, batch, seqlen, rank)."""
    if bench.device.type == "cuda":
        return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16,
                    num_kv_heads=4), 4, 1024, 16
    if bench.quick:
        return dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4,
                    num_kv_heads=2), 2, 128, 16
    return dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                num_kv_heads=4), 4, 256, 16


def _ours(cfg, r, dev):
    model = pyllmops.models.Decoder(pyllmops.models.DecoderConfig(**cfg)).to(dev)
    pyllmops.apply_lora(model, r=r, alpha=2 * r, target_modules=TARGETS, quantize="nf4", blocksize=64,
                        double_quant=True)

    def loss_fn(ids):  # the same loss as the peer's model(input_ids=ids, labels=ids).loss
        return model.loss(ids, labels=ids)

    return model, loss_fn


def _peer(cfg, r, dev):
    import bitsandbytes as bnb
    import peft
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"], attn_implementation="sdpa", tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg)
    for name, mod in list(model.named_modules()):  # the seven projections of each block -> NF4
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                l4 = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.float32,
                                       compress_statistics=True, quant_type="nf4")
                l4.load_state_dict(child.state_dict())
                setattr(mod, child_name, l4.to(dev))
    model = model.to(dev)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _peak_step_mib(step, dev):
    """Peak memory of one step above the footprint before it, in MiB (None if the OS cannot tell)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # hand freed heap pages back: RSS = live
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        step()
        return (_rss_kib("VmHWM") - base) / 1024
    except (OSError, AttributeError, TypeError):
        return None


def run(bench):
    dev = bench.device
    cfg, batch, seqlen, r = sizes(bench)
    label = (f"h{cfg['hidden_size']} L{cfg['num_layers']} V{cfg['vocab_size']} {batch}x{seqlen} tok r{r} "
             f"NF4 all projections")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seqlen), generator=gen).to(dev)
    providers = [("transformers + peft + bitsandbytes + SDPA", _peer, True), ("pyllmops", _ours, False)]
    n_steps = 3 if bench.quick else 6
    ready = []  # (name, baseline, step, peak MiB, trainable params)
    for name, build, baseline in providers:
        try:
            torch.manual_seed(0)
            model, loss_fn = build(cfg, r, dev)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, loss_fn=loss_fn, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_fn(ids).backward()
                opt.step()

            step()  # warm-up (allocations, optimizer state)
            ready.append((name, baseline, step, _peak_step_mib(step, dev), sum(p.numel() for p in params)))
        except Exception as e:  # a missing peer is recorded, not fatal
            bench.rows.append(dict(kernel="qlora sft step", provider=name, mode="fwd+bwd+adamw", x=label,
                                   error=f"{type(e).__name__}: {e}"))
    times = [[] for _ in ready]
    for _ in range(n_steps):  # the providers' steps alternate, so load drift hits both alike
        for (_, _, step, _, _), dst in zip(ready, times):
            bench.sync()
            t0 = time.perf_counter()
            step()
            bench.sync()
            dst.append((time.perf_counter() - t0) * 1e3)
    for (name, baseline, _, peak, n_params), ms in zip(ready, times):
        ms.sort()
        pick = (lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))])
        bench.record("qlora sft step", name, "fwd+bwd+adamw", label, ms[len(ms) // 2], pick(0.2), pick(0.8),
                     baseline=baseline, peak_step_mib=peak, trainable_params=n_params,
                     note="" if peak is None else f"step peak {peak:.1f} MiB above rest")
    for row in bench.rows:
        if row.get("kernel") == "qlora sft step" and "median_ms" in row:
            peak = row["peak_step_mib"]
            print(f"qlora sft step, {row['provider']}: {row['median_ms']:.1f} ms, step peak "
                  f"{'n/a' if peak is None else f'{peak:.1f} MiB'} above rest, {row['trainable_params']} trainable")


# ---- where our step's time goes: `python -m pyllmops.bench.model [--quick] [--steps N]` ------------------
# Inclusive profiler time of each part's autograd nodes / ops, averaged over N profiled steps. The parts do not
# nest: a LoRA layer's time includes its NF4 dequantize and GEMMs, attention's includes torch's SDPA kernel
# where ours routes to it, the loss's includes the lm_head GEMMs. (The peer's modules nest their ops
# differently, e.g. bitsandbytes' MatMul4Bit calls aten::linear, so only its step time compares.)
PARTS = {
    "LoRA/QLoRA layers, forward (NF4 decode + GEMMs)": ("_Eager",),
    "LoRA/QLoRA layers, backward (NF4 decode + GEMMs)": ("_EagerBackward",),
    "attention, forward": ("pyllmops::flash_attn_fwd", "_FlashAttnEager"),  # registered op / eager entry
    "attention, backward": ("pyllmops::flash_attn_bwd", "_FlashAttnEagerBackward"),
    "lm_head + cross-entropy (fused), forward and backward": ("_LinearCrossEntropy", "_LinearCrossEntropyBackward"),
    "RMSNorm, forward and backward": ("_RMSNorm", "_RMSNormBackward"),
    "rotary, forward and backward": ("_Rotary", "_RotaryBackward"),
    "SwiGLU, forward and backward": ("_SwiGLU", "_SwiGLUBackward"),
    "AdamW step + zero_grad": ("Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"),
}


def breakdown(quick=False, steps=3):
    """-> {"step_ms": median wall time of our profiled steps, part: mean ms (see PARTS), "other": the rest
    (embedding, residual adds, autograd and Python)}."""
    from torch.profiler import ProfilerActivity, profile

    cfg, batch, seqlen, r = sizes(types.SimpleNamespace(device=torch.device("cpu"), quick=quick))
    ids = torch.randint(0, cfg["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model, loss_fn = _ours(cfg, r, torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        opt.step()

    step()
    parts, walls = {k: 0.0 for k in PARTS}, []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            walls.append((time.perf_counter() - t0) * 1e3)
        totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
        for part, keys in PARTS.items():
            parts[part] += sum(totals.get(k, 0.0) for k in keys) / steps
    res = {"step_ms": sorted(walls)[len(walls) // 2]}
    res.update(parts)
    res["other"] = max(0.0, sum(walls) / len(walls) - sum(parts.values()))
    return res


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m pyllmops.bench.model", description=breakdown.__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    res = breakdown(a.quick, a.steps)
    step_ms = res.pop("step_ms")
    print(f"pyllmops QLoRA SFT step: {step_ms:.0f} ms (median of {a.steps} profiled steps)")
    for part, ms in res.items():
        print(f"  {part:56s} {ms:8.1f} ms  {100 * ms / step_ms:5.1f}%")
