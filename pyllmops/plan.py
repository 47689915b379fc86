"""`python -m pyllmops plan`: per-rank peak memory of a (Q)LoRA fine-tuning step, before you rent anything.

The estimate is derived from the model config and what our code keeps alive (docs/train.md, "The
planner"), for the setup our loops run: every projection of every layer adapted (LoRA rank r, adapters
fp32 with AdamW), the quantized bases frozen, embeddings / norms / lm_head dense in the activation dtype
(bf16 on GPU, fp32 on CPU); with --gpus > 1 (or --offload), FSDP2 as pyllmops.train.fsdp.shard_model
builds it.

Parts, per rank (T = batch * seq_len tokens, a = activation bytes, W = world size):
  weights      the quantized projections (the format's exact bytes) and the norms, / W
  dense        embeddings + lm_head, / W
  adapters     fp32 adapters / W; their gradients fp32 / W; AdamW moments 2 x fp32 / W
and, in whichever of three phases is largest (estimate() explains them):
  gathered     FSDP: whole units gathered at that moment
  activations  what autograd has saved (enumerated in _layer_saved)
  temporary    the phase's transients (_head_temp, _layer_backward_temp)
--offload (FSDP2 CPUOffloadPolicy) moves the sharded weights, adapters, gradients and AdamW state to the
host: the device keeps the gathered units, activations and temporaries.

measure() runs the same step and reports torch's MemTracker / FSDPMemTracker peak (FakeTensorMode:
no real memory; or real tensors on the CPU); the tests hold estimate and measurement within 10%.
"""
import argparse
import json
import os
from dataclasses import dataclass

from pyllmops.models.decoder import PROJECTIONS, DecoderConfig

GiB = 2 ** 30

PRESETS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                      num_kv_heads=40),
    "llama-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                      num_kv_heads=8),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, sliding_window=4095),
}
QUANTIZE = ("nf4", "int4", "int2", "none")
# GPU: the CUDA context and cuBLAS workspaces outside torch's allocator (a typical figure, not measured here).
CUDA_CONTEXT = 0.5 * GiB


def model_config(model):
    """DecoderConfig of a preset name, a DecoderConfig, or a path to a Hugging Face config.json."""
    if isinstance(model, DecoderConfig):
        return model
    if model in PRESETS:
        return DecoderConfig(**PRESETS[model])
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        from pyllmops.models.loading import config_from_hf

        return config_from_hf(model)
    raise ValueError(f"--model must be one of {sorted(PRESETS)} or a path to a config.json, got {model!r}")


def parse_bytes(text):
    """'24GiB', '24GB' (taken as GiB, as GPU makers' marketing sizes), '80G', '1.5TiB' or a number of bytes."""
    t = str(text).strip().lower().replace(" ", "")
    for suffix, mult in (("tib", 2 ** 40), ("tb", 2 ** 40), ("t", 2 ** 40), ("gib", GiB), ("gb", GiB), ("g", GiB),
                         ("mib", 2 ** 20), ("mb", 2 ** 20), ("m", 2 ** 20)):
        if t.endswith(suffix):
            return float(t[:-len(suffix)]) * mult
    return float(t)


def projections(cfg):
    """[(name, out_features, in_features)] of one decoder layer."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q), ("gate_proj", i, h),
            ("up_proj", i, h), ("down_proj", h, i)]


def quantized_bytes(out_f, in_f, quantize, dense_bytes=2, blocksize=64, double_quant=True, group_size=64):
    """Bytes of one frozen projection in the format (codes and statistics, as stored)."""
    n = out_f * in_f
    if quantize == "nf4":
        blocks = -(-n // blocksize)
        if double_quant:  # uint8 absmax codes, fp32 per 256 blocks, code book + offset
            return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 257
        return -(-n // 2) + 4 * blocks
    if quantize in ("int4", "int3", "int2"):
        bits = int(quantize[3:])
        return 4 * out_f * -(-in_f // (32 // bits)) + 2 * 4 * out_f * (in_f // group_size)
    return n * dense_bytes


@dataclass
class Setup:
    gpus: int = 1
    seq_len: int = 2048
    batch: int = 1
    lora_r: int = 16
    quantize: str = "nf4"
    checkpointing: bool = False
    offload: bool = False
    device: str = "cuda"

    @property
    def act_bytes(self):
        return 2 if self.device == "cuda" else 4  # bf16 autocast / FSDP param_dtype on GPU; fp32 on CPU


def _layer_saved(cfg, s):
    """Bytes autograd saves for one decoder layer's backward (pyllmops.models.decoder, its fused ops in
    pyllmops.nn.fused, LoRA kernels): each RMSNorm its input and rstd (T fp32); the projections' shared
    inputs (the normed x twice, the attention output, silu(gate) * up) and each adapter's x.A^T (T x r
    fp32) and compute-dtype A and B; flash attention q, k, v after rotary, out and lse; gate and up
    (SwiGLU recomputes silu in its backward). The rotary tables are shared by all layers (estimate())."""
    t, a, r = s.batch * s.seq_len, s.act_bytes, s.lora_r
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    norms = 2 * (a * t * h + 4 * t)
    proj_inputs = a * t * (2 * h + i)            # normed x (q/k/v and gate/up share it), silu(gate)*up
    attention = a * t * (2 * q + 2 * kv) + 4 * t * cfg.num_heads
    mlp = a * t * 2 * i                          # gate, up
    adapters = sum(4 * t * r + a * r * (o + n) for _, o, n in projections(cfg))
    return norms + proj_inputs + attention + mlp + adapters


def _layer_backward_temp(cfg, s):
    """The largest transient of a layer's backward, beside its saved tensors: the down_proj LoRA backward
    makes fp32 copies of its input (T x I) and of dy (T x H) when activations are not fp32 already, and
    returns dx (T x I) while dy is alive; then the SwiGLU product's two gradients and the incoming one
    (3 x T x I) exist, the down_proj input being freed by then (net 2 x T x I), beside dy."""
    t, a = s.batch * s.seq_len, s.act_bytes
    h, i = cfg.hidden_size, cfg.intermediate_size
    fp32_copies = 0 if a == 4 else 4 * t * (i + h)
    return max(fp32_copies + a * t * i + a * t * h, 2 * a * t * i + a * t * h)


def _head_temp(cfg, s):
    """At the loss: fp32 logits and their log-softmax (forward); in its backward the log-softmax output,
    the loss gradient and the logits' fp32 gradient, then the compute-dtype gradient of lm_head's output."""
    t, v, a = s.batch * s.seq_len, cfg.vocab_size, s.act_bytes
    return max(3 * 4 * t * v, 2 * 4 * t * v + a * t * v) + 4 * t * cfg.hidden_size


def estimate(model, setup):
    """{part: bytes per rank} plus "total"; see the module docstring."""
    cfg, s = model_config(model), setup
    w = s.gpus
    a = s.act_bytes
    layer_q = sum(quantized_bytes(o, n, None if s.quantize == "none" else s.quantize, dense_bytes=a)
                  for _, o, n in projections(cfg))
    layer_norms = 2 * cfg.hidden_size * a
    layer_adapters = sum(s.lora_r * (o + n) for _, o, n in projections(cfg))
    n_adapters = layer_adapters * cfg.num_layers
    embed = cfg.vocab_size * cfg.hidden_size * a
    dense = embed * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size * a
    t = s.batch * s.seq_len
    parts = {
        "weights (quantized + norms)": cfg.num_layers * (layer_q + layer_norms) / w,
        "embeddings + lm_head": dense / w,
        "adapters": 4 * n_adapters / w,
        "adapter grads": 4 * n_adapters / w,
        "AdamW state": 8 * n_adapters / w,
    }
    # The peak is in one of three phases (the largest wins):
    #   loss:         every layer's saved tensors + the head's temporaries (FSDP: every unit resharded);
    #   lm_head bwd:  FSDP re-gathers the root (all-gather buffer + unsharded copy: 2 x lm_head) while the
    #                 fp32 logits' gradient (T x vocab x 4) is alive;
    #   layer bwd:    the last layer's backward temporaries; FSDP: that layer gathered, and the root too
    #                 (buffer + copy: frozen, it is resharded only when the whole backward ends; measured
    #                 with FSDPMemTracker). With checkpointing a layer's saved tensors exist only while it is
    #                 recomputed (its backward), beside the layer inputs kept for every layer.
    saved, inputs = _layer_saved(cfg, s), a * t * cfg.hidden_size
    kept = cfg.num_layers * (inputs if s.checkpointing else saved) + 4 * t * cfg.head_dim  # + rotary cos/sin
    root = embed + cfg.hidden_size * a
    layer_full = layer_q + layer_norms + a * layer_adapters
    sharded = w > 1 or s.offload  # offload needs FSDP, also on one GPU
    phases = {"loss": (0.0, kept, _head_temp(cfg, s)),
              "layer backward": (2 * root + layer_full if sharded else 0.0, kept + (saved if s.checkpointing else 0),
                                 _layer_backward_temp(cfg, s))}
    if sharded:
        phases["lm_head backward"] = (2 * root, kept, 4 * t * cfg.vocab_size)
    phase = max(phases, key=lambda k: sum(phases[k]))
    parts["gathered (FSDP)"], parts["activations"], parts["largest temporary"] = phases[phase]
    parts["peak phase: " + phase] = 0.0
    if s.offload:
        for k in ("weights (quantized + norms)", "embeddings + lm_head", "adapters", "adapter grads", "AdamW state"):
            parts[k + " [host]"] = parts.pop(k)
    device_parts = {k: v for k, v in parts.items() if not k.endswith("[host]")}
    parts["total"] = sum(device_parts.values()) + (CUDA_CONTEXT if s.device == "cuda" else 0)
    return parts


def advice(model, setup, budget):
    """What to turn on (in this order) until the estimate fits; [] if it fits already."""
    from dataclasses import replace

    steps, cur = [], setup
    if estimate(model, cur)["total"] <= budget:
        return []
    for change, label in ((dict(checkpointing=True), "--checkpointing (activation checkpointing)"),
                          (dict(offload=True), "--offload (FSDP2 CPU offload of weights, adapters, AdamW; "
                                               "sft/dpo(fsdp=True, fsdp_offload=True))"),
                          (dict(quantize="int2"), "--quantize int2 (QA-LoRA 2-bit base)")):
        key, val = next(iter(change.items()))
        if getattr(cur, key) == val or (key == "offload" and cur.device == "cpu"):
            continue
        cur = replace(cur, **change)
        steps.append(label)
        if estimate(model, cur)["total"] <= budget:
            return steps
    for gpus in (2, 4, 8, 16, 32):
        if gpus > cur.gpus and estimate(model, replace(cur, gpus=gpus))["total"] <= budget:
            return steps + [f"--gpus {gpus} (FSDP: shard over more GPUs)"]
    t = cur.seq_len
    while t > 256:
        t //= 2
        if estimate(model, replace(cur, seq_len=t))["total"] <= budget:
            return steps + [f"--seq-len {t} (shorter sequences)"]
    return steps + ["nothing here fits: a larger GPU, or more GPUs than 32"]


def report(model, setup, gpu_mem):
    budget = parse_bytes(gpu_mem)
    cfg = model_config(model)
    parts = estimate(cfg, setup)
    lines = [f"model: {model if isinstance(model, str) else 'config'} ({cfg.num_layers} layers, hidden "
             f"{cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
             f"vocab {cfg.vocab_size})",
             f"setup: {setup.gpus} x {setup.device} ({budget / GiB:.1f} GiB each), quantize {setup.quantize}, "
             f"seq_len {setup.seq_len}, batch {setup.batch}, lora r {setup.lora_r}, checkpointing "
             f"{'on' if setup.checkpointing else 'off'}, offload {'on' if setup.offload else 'off'}"
             + (", FSDP2" if setup.gpus > 1 else ""),
             "per-rank peak memory by part:"]
    for k, v in parts.items():
        if k.startswith("peak phase"):
            lines.append(f"  ({k})")
        elif k != "total":
            lines.append(f"  {k:<34} {v / GiB:9.3f} GiB")
    if setup.device == "cuda":
        lines.append(f"  {'CUDA context + workspaces':<34} {CUDA_CONTEXT / GiB:9.3f} GiB (typical, not measured)")
    total = parts["total"]
    fits = total <= budget
    lines.append(f"total per rank: {total / GiB:.2f} GiB")
    lines.append(f"fits: {'yes' if fits else 'no'}")
    if not fits:
        lines.append("to fit, turn on: " + "; then ".join(advice(cfg, setup, budget)))
    return "\n".join(lines), parts, fits


def main(args):
    for name in ("gpus", "seq_len", "batch", "lora_r"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        parse_bytes(args.gpu_mem)
    except ValueError:
        raise SystemExit(f"--gpu-mem must be a size such as 24GiB, 80GB or 512MiB, got {args.gpu_mem!r}") from None
    try:
        model_config(args.model)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(str(e)) from None
    setup = Setup(gpus=args.gpus, seq_len=args.seq_len, batch=args.batch, lora_r=args.lora_r, quantize=args.quantize,
                  checkpointing=args.checkpointing, offload=args.offload, device=args.device)
    text, parts, fits = report(args.model, setup, args.gpu_mem)
    print(text)
    if args.json:
        print(json.dumps({k: v / GiB for k, v in parts.items()}))


def add_arguments(p):
    p.add_argument("--model", required=True, help=f"one of {sorted(PRESETS)} or a path to a Hugging Face config.json")
    p.add_argument("--gpus", type=int, default=1, help="ranks (FSDP2 when > 1)")
    p.add_argument("--gpu-mem", default="24GiB", help="memory per GPU (or per host with --device cpu)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--quantize", choices=QUANTIZE, default="nf4")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--offload", action="store_true", help="FSDP2 CPU offload")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", action="store_true", help="also print the parts as JSON (GiB)")


# ---------------------------------------------------------------------------------------- measuring
def _tracker(fsdp):
    """torch's MemTracker / FSDPMemTracker, taught to skip frozen parameters (torch 2.13 installs a
    gradient hook on every parameter, which raises for requires_grad=False ones)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    base = FSDPMemTracker if fsdp else MemTracker

    class Tracker(base):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                        def hook(g):
                            self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(hook), p.register_post_accumulate_grad_hook(lambda q: hook(q.grad)))
            return out

    return Tracker


def build_model(model, setup):
    """The model the estimate describes: dense parts in the activation dtype, every projection quantized
    (setup.quantize) with an fp32 adapter of rank setup.lora_r."""
    import torch
    from torch import nn

    from pyllmops.models.decoder import Decoder
    from pyllmops.nn.lora import _ADAPTERS, apply_lora

    cfg = model_config(model)
    dtype = torch.bfloat16 if setup.act_bytes == 2 else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        m = Decoder(cfg)
        apply_lora(m, r=setup.lora_r, alpha=2 * setup.lora_r, target_modules=PROJECTIONS,
                   quantize=None if setup.quantize == "none" else setup.quantize)
    finally:
        torch.set_default_dtype(old)
    for mod in m.modules():
        if isinstance(mod, _ADAPTERS):
            mod.lora_A, mod.lora_B = nn.Parameter(mod.lora_A.float()), nn.Parameter(mod.lora_B.float())
    m.gradient_checkpointing = setup.checkpointing
    return m


def measure(model, setup, fake=True):
    """Peak bytes of one training step (the second: AdamW's state exists) as torch's MemTracker sees it
    (FSDPMemTracker over a fake process group of setup.gpus ranks when > 1, this process being rank 0).
    fake=True: under FakeTensorMode, no real memory (the checks that read values, the attention's offsets,
    the decoder's token ids and the quantizers' finiteness, are skipped there). fake=False: real tensors on the CPU (a process group must exist when
    setup.gpus > 1: the caller's, e.g. gloo under torchrun). Returns the tracker's peak total in bytes."""
    import contextlib

    import torch
    import torch.distributed as dist

    import pyllmops.ops.attention as attention_ops
    from pyllmops.ops.nf4 import dynamic_code
    from pyllmops.train.losses import sft_loss

    fsdp = setup.gpus > 1
    mesh = None
    stack = contextlib.ExitStack()
    with stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dynamic_code()  # cached before fake mode: the code book is computed from values
            from pyllmops.models.decoder import Decoder

            # checks that read values (offsets, token ids) cannot run on fake tensors: skipped while tracing
            import pyllmops.ops.lora as lora_ops
            import pyllmops.ops.nf4 as nf4_ops

            checks = [(attention_ops, "_check_cu_seqlens"), (Decoder, "_check_ids")]
            checks += [(mod, "_check_finite") for mod in (nf4_ops, lora_ops) if hasattr(mod, "_check_finite")]
            checks += [(nf4_ops, "_check_nested_finite"), (lora_ops, "check_finite_weight")]
            for owner, name in checks:
                stack.callback(setattr, owner, name, getattr(owner, name))
                setattr(owner, name, lambda *a, **k: None)
            if fsdp:
                dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=setup.gpus)
                stack.callback(dist.destroy_process_group)
        if fsdp:
            from pyllmops.train.fsdp import _mesh

            mesh = _mesh()  # outside fake mode: building the mesh runs collectives on real tensors
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        torch.manual_seed(0)
        m = build_model(model, setup)
        if fsdp:
            from pyllmops.train.fsdp import shard_model

            shard_model(m, mesh=mesh, param_dtype=torch.bfloat16 if setup.act_bytes == 2 else None,
                        offload=setup.offload)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        cfg = model_config(model)
        ids = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len))
        targets = torch.randint(0, cfg.vocab_size, (setup.batch * setup.seq_len,))

        def step():
            loss = sft_loss(m(ids).view(-1, cfg.vocab_size), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        tracker = _tracker(fsdp)(m, opt) if fsdp else _tracker(False)()
        if not fsdp:
            tracker.track_external(m, opt)
        with tracker:
            step()
        peaks = tracker.get_tracker_snapshot("peak")
        if os.environ.get("PYLLMOPS_PLAN_DEBUG"):
            print({str(d): {str(k): round(v / GiB, 3) for k, v in p.items()} for d, p in peaks.items()})
        return max(v["Total"] for v in peaks.values())


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyllmops plan")
    add_arguments(p)
    return p.parse_args(argv)


__all__ = ["estimate", "report", "advice", "model_config", "Setup", "PRESETS", "quantized_bytes", "parse_bytes",
           "measure", "build_model"]
