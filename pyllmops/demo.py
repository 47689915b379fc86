"""`python -m pyllmops demo`: QLoRA SFT, then DPO, then batched generation on the paged KV cache.

Everything is embedded: a small decoder built in code (random base weights, no download), the byte
tokenizer, the synthetic instruction and preference sets shipped in pyllmops/train/data. The report
shows the loss falling, the reward margin and accuracy rising, tokens/s, peak memory and which
backend ran each pyllmops op (recorded with a TorchDispatchMode while the phases run).
"""
import os
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyllmops
from pyllmops.models import PROJECTIONS as TARGETS, Decoder, DecoderConfig, generate, merge_adapters
from pyllmops.train import (ByteTokenizer, dpo, evaluate_dpo, evaluate_sft, instruction_data, preference_data, sft)


class OpRecorder(TorchDispatchMode):
    """Counts torch.ops.pyllmops.* calls by (op, device type of the first tensor argument), and by
    (op, dtype of the first tensor argument) in .dtypes."""

    def __init__(self):
        super().__init__()
        self.counts, self.dtypes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("pyllmops."):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            op = name.split(".", 1)[1]
            self.counts[(op, "?" if first is None else first.device.type)] += 1
            self.dtypes[(op, None if first is None else first.dtype)] += 1
        return func(*args, **(kwargs or {}))


def _mean(rows, key, part):
    vals = [r[key] for r in rows]
    k = max(1, len(vals) // 5)
    return sum(vals[:k]) / k if part == "first" else sum(vals[-k:]) / k


def run(device=None, sft_steps=200, dpo_steps=60, seed=0, threads=None, progress=True, out=print):
    """Runs the demo; returns a dict of the reported numbers."""
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Tiny matrices: torch's intra-op threads cost more than they give on a shared 2-core machine.
        torch.set_num_threads(threads or 1)
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    cfg = DecoderConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                        num_kv_heads=2, sliding_window=64, initializer_range=0.1)
    model = Decoder(cfg).to(device)
    pyllmops.apply_lora(model, r=16, alpha=32, target_modules=TARGETS, quantize="nf4")
    n_train, n_all = model.num_parameters(trainable_only=True), model.num_parameters()
    sft_data, pref_data = instruction_data(), preference_data()
    held_sft, train_sft = sft_data[:64], sft_data[64:]
    held_pref, train_pref = pref_data[:48], pref_data[48:]
    out(f"pyllmops {pyllmops.__version__} demo on {device} ({torch.get_num_threads()} torch threads)")
    out(f"model: decoder {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
        f"(GQA), window {cfg.sliding_window}, vocab {cfg.vocab_size} bytes; QLoRA r=16 on {len(TARGETS)} projections "
        f"(NF4 base): {n_train:,} trainable of {n_all:,} parameters")
    rec = OpRecorder()
    report = {}

    # ---- QLoRA SFT ----
    before = evaluate_sft(model, held_sft)
    with rec:
        hs = sft(model, train_sft, steps=sft_steps, batch_tokens=512, lr=5e-3, warmup_steps=10, seed=seed,
                 progress=progress)
    after = evaluate_sft(model, held_sft)
    report["sft"] = dict(train_loss_first=_mean(hs, "loss", "first"), train_loss_last=_mean(hs, "loss", "last"),
                         heldout_loss_before=before, heldout_loss_after=after,
                         tokens_per_s=sum(r["tokens"] for r in hs) / sum(r["time_s"] for r in hs),
                         peak_mem_mb=hs[-1]["peak_mem_mb"], steps=sft_steps)
    sft_ops = Counter(rec.counts)

    # ---- DPO: the SFT adapter is merged, the base re-quantized to NF4 and a fresh adapter trained; the
    # reference is this same model with its adapter disabled, i.e. the SFT model ----
    merge_adapters(model)
    pyllmops.apply_lora(model, r=16, alpha=32, target_modules=TARGETS, quantize="nf4")
    rec.counts.clear()
    rec.dtypes.clear()
    pre = evaluate_dpo(model, held_pref)
    with rec:
        hd = dpo(model, train_pref, steps=dpo_steps, batch_pairs=8, beta=0.1, lr=2e-3, warmup_steps=4, seed=seed,
                 progress=progress)
    post = evaluate_dpo(model, held_pref)
    report["dpo"] = dict(margin_first=_mean(hd, "rewards/margins", "first"),
                         margin_last=_mean(hd, "rewards/margins", "last"),
                         acc_first=_mean(hd, "rewards/accuracies", "first"),
                         acc_last=_mean(hd, "rewards/accuracies", "last"),
                         heldout_before=pre, heldout_after=post,
                         tokens_per_s=sum(r["tokens"] for r in hd) / sum(r["time_s"] for r in hd),
                         peak_mem_mb=hd[-1]["peak_mem_mb"], steps=dpo_steps)
    dpo_ops = Counter(rec.counts)

    # ---- batched generation on the paged KV cache ----
    rec.counts.clear()
    rec.dtypes.clear()
    prompts = [r["prompt"] for r in held_sft[:8]]
    t0 = time.perf_counter()
    with rec:
        outs = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new_tokens=16,
                        stop_tokens=[tok.eos_id])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    new_tokens = sum(len(o) for o in outs)
    report["generate"] = dict(new_tokens=new_tokens, tokens_per_s=new_tokens / dt,
                              samples=[(p, tok.decode(o)) for p, o in zip(prompts, outs)])
    gen_ops = Counter(rec.counts)
    correct = sum(tok.decode(o) == r["completion"] for o, r in zip(outs, held_sft[:8]))

    # ---- report ----
    s, d, g = report["sft"], report["dpo"], report["generate"]
    out("")
    out(f"QLoRA SFT   {s['steps']} steps: train loss {s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f} "
        f"(mean of first/last fifth); held-out completion loss {s['heldout_loss_before']:.3f} -> "
        f"{s['heldout_loss_after']:.3f}; {s['tokens_per_s']:,.0f} tokens/s")
    out(f"DPO         {d['steps']} steps (SFT adapter merged, NF4 base, new adapter; reference = adapters off):")
    out(f"            reward margin {d['margin_first']:.3f} -> {d['margin_last']:.3f}, "
        f"accuracy {d['acc_first']:.2f} -> {d['acc_last']:.2f} (training batches); held-out margin "
        f"{d['heldout_before']['rewards/margins']:.3f} -> {d['heldout_after']['rewards/margins']:.3f}, accuracy "
        f"{d['heldout_before']['rewards/accuracies']:.2f} -> {d['heldout_after']['rewards/accuracies']:.2f}; "
        f"{d['tokens_per_s']:,.0f} tokens/s")
    out(f"generation  {len(prompts)} prompts of different lengths in one batch, paged KV cache: {new_tokens} new "
        f"tokens at {g['tokens_per_s']:,.0f} tokens/s; {correct}/{len(prompts)} exactly right")
    for p, o in g["samples"][:4]:
        out(f"    {p.strip()!r:>24} -> {o!r}")
    mem = "max CUDA memory allocated" if device.type == "cuda" else "peak process RSS"
    out(f"peak memory {max(s['peak_mem_mb'], d['peak_mem_mb']):,.0f} MiB ({mem})")
    out("backends (pyllmops ops recorded while each phase ran; op: device x calls):")
    for phase, ops in (("sft", sft_ops), ("dpo", dpo_ops), ("generate", gen_ops)):
        items = ", ".join(f"{op}: {dev} x{n}" for (op, dev), n in sorted(ops.items()))
        out(f"    {phase:8} {items}")
    compiled = "cpu + cuda" if pyllmops.build_info()["cuda"] else "cpu"
    report["elapsed_s"] = time.perf_counter() - t_start
    out(f"kernels compiled: {compiled}; total time {report['elapsed_s']:.1f} s")
    report["ops"] = {"sft": dict(sft_ops), "dpo": dict(dpo_ops), "generate": dict(gen_ops)}
    return report


def run_fsdp(sft_steps=40, dpo_steps=10, seed=0, out=print):
    """One rank of `demo --fsdp` (under torchrun, gloo): the demo's model written in the Hugging Face
    layout (rank 0), loaded with models.from_pretrained(quantize="nf4", fsdp=True) (each rank keeps its
    shard of every layer), then QLoRA SFT and DPO with fsdp=True and a checkpoint; rank 0 reports."""
    import tempfile

    import torch.distributed as dist

    from pyllmops.models.loading import from_pretrained, save_pretrained
    from pyllmops.train import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = out if rank == 0 else (lambda *a: None)
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    cfg = DecoderConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                        num_kv_heads=2, sliding_window=64, initializer_range=0.1)
    box = [tempfile.mkdtemp(prefix="pyllmops-fsdp-demo-") if rank == 0 else None]
    dist.broadcast_object_list(box)
    path = box[0]
    if rank == 0:
        save_pretrained(Decoder(cfg), f"{path}/base", max_shard_bytes=200_000)
    dist.barrier()
    model = from_pretrained(f"{path}/base", "nf4", lora=dict(r=16, alpha=32, target_modules=TARGETS), fsdp=True)
    share = fsdp.shard_bytes(model)
    shares = [None] * world
    dist.all_gather_object(shares, share["local"])
    say(f"pyllmops {pyllmops.__version__} FSDP2 QLoRA demo: {world} CPU processes (gloo)")
    say(f"model: written in the Hugging Face layout ({len(os.listdir(f'{path}/base')) - 2} safetensors shards), "
        f"loaded on the meta device and quantized to NF4 layer by layer, each layer sharded as it arrived")
    say(f"4-bit bytes (codes + statistics) per rank: {', '.join(f'{b:,}' for b in shares)} of {share['total']:,}")
    sft_data, pref_data = instruction_data(), preference_data()
    hs = sft(model, sft_data[64:], steps=sft_steps, batch_tokens=512, lr=5e-3, warmup_steps=5, seed=seed,
             progress=False, fsdp=True, checkpoint_dir=f"{path}/run")
    say(f"QLoRA SFT {sft_steps} steps: train loss {_mean(hs, 'loss', 'first'):.3f} -> {_mean(hs, 'loss', 'last'):.3f}")
    hd = dpo(model, pref_data[48:], steps=dpo_steps, batch_pairs=8, beta=0.1, lr=2e-3, warmup_steps=2, seed=seed,
             progress=False, fsdp=True)
    say(f"DPO {dpo_steps} steps (reference = adapters off): reward margin {_mean(hd, 'rewards/margins', 'first'):.3f}"
        f" -> {_mean(hd, 'rewards/margins', 'last'):.3f}")
    say(f"checkpoint {path}/run/step-{sft_steps}: {sorted(os.listdir(f'{path}/run/step-{sft_steps}'))} (adapters in "
        f"peft format written once by rank 0; AdamW state in torch.distributed.checkpoint, loads at any world size)")
    dist.destroy_process_group()
    return {"sft": hs, "dpo": hd, "shares": shares, "total": share["total"]}


def main_fsdp(args):
    """Launches run_fsdp on 2 CPU processes with torchrun and waits."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pyllmops.demo", "--fsdp-worker", str(args.seed)]
    sys.exit(subprocess.call(cmd, env=env))


def main(args):
    if getattr(args, "fsdp", False):
        return main_fsdp(args)
    run(device=args.device, sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, seed=args.seed, threads=args.threads,
        progress=not args.no_progress and os.environ.get("PYLLMOPS_DEMO_NO_PROGRESS") is None)


if __name__ == "__main__":  # a rank of `python -m pyllmops demo --fsdp`
    import sys

    if sys.argv[1:2] == ["--fsdp-worker"]:
        run_fsdp(seed=int(sys.argv[2]))
