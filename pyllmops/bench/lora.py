"""LoRA benchmarks: our LoRA / QLoRA / QA-LoRA layers against peft's, side by side in one run, plus one
QLoRA SFT step of a small decoder against transformers + peft + bitsandbytes (pyllmops/bench/model.py).

Per case (kernel, shape, rank, rows m) and mode (fwd under no_grad; fwd+bwd with x, A and B requiring
grad), the baseline row is the peer we must match, so each of our rows' "vs baseline" is our speedup
over it (> 1 is faster):
  lora:   peft's LoRA layer on an nn.Linear                    vs pyllmops.nn.LoRALinear (dense base)
  qlora:  peft's LoRA layer on bitsandbytes' Linear4bit (NF4,    vs LoRALinear(NF4Linear), same format
          blocksize 64, double quant)
  qalora: peft's LoRA layer on an INT4 layer that dequantizes    vs pyllmops.nn.QALoRALinear (INT4, groups
          in torch and calls matmul each time (peft runs QA-LoRA     of 64; A on group-pooled x)
          only on GPTQ layers; this is their torch-kernel pattern,
          without bitsandbytes' or GPTQ's CPU kernels, not installed)
A third row per case, "torch matmul (no adapter)", is the base product alone: what the adapter costs.

FLOPs counted: forward 2*m*k*n (base) + 2*m*r*(k + n) (adapter); forward+backward adds dx
(2*m*k*n + 2*m*r*(k + n)), dA (2*m*r*k) and dB (2*m*r*n). The frozen W gets no gradient.
"""
import torch
from torch import nn

import pyllmops
from pyllmops.bench import model as bench_model

GROUP = 64  # QA-LoRA group size and NF4 blocksize


def _peft():
    try:
        import peft

        return peft
    except Exception:
        return None


def _bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:
        return None


def _flops(m, k, n, r, backward):
    fwd = 2 * m * k * n + 2 * m * r * (k + n)
    return fwd + (2 * m * k * n + 2 * m * r * (k + n) + 2 * m * r * (k + n) if backward else 0)


class _One(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_layer(peft, linear, r, alpha):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    return peft.get_peft_model(_One(linear), cfg)


def _same_adapter(ours, theirs):
    """Nonzero B (a trained adapter) and the same A, B in both layers."""
    with torch.no_grad():
        ours.lora_B.normal_(std=0.01)
        if theirs is not None:
            layer = theirs.base_model.model.proj
            layer.lora_A["default"].weight.copy_(ours.lora_A)
            layer.lora_B["default"].weight.copy_(ours.lora_B)


def _bnb_linear(bnb, lin, dtype, dev):
    # built on the host and moved: bitsandbytes quantizes the loaded dense weight in .to()
    l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                           compress_statistics=True, quant_type="nf4")
    l4.load_state_dict({k_: v.cpu() for k_, v in lin.state_dict().items()})
    return l4.to(dev)


class _TorchInt4Linear(nn.Linear):
    """The peer's INT4 base: what peft's QA-LoRA runs on (a GPTQ QuantLinear) does without a custom
    kernel: unpack the codes, scale and shift in torch, then a dense matmul, every call. An nn.Linear
    subclass so peft wraps it; its `weight` (the dequantized W) is what peft reads for shape, dtype
    and device, the forward does not use it."""

    def __init__(self, qweight, scales, zeros, dtype):
        n, groups = scales.shape
        super().__init__(groups * GROUP, n, bias=False, device=scales.device, dtype=dtype)
        self.weight.requires_grad_(False)
        with torch.no_grad():
            self.weight.copy_(pyllmops.dequantize_int(qweight, scales, zeros, 4, GROUP, dtype))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("shifts", torch.arange(8, device=scales.device, dtype=torch.int32) * 4)

    def forward(self, x):
        n = self.qweight.shape[0]
        q = (self.qweight.unsqueeze(-1) >> self.shifts) & 15
        w = q.view(n, -1, GROUP).to(self.scales.dtype) * self.scales.unsqueeze(-1) + self.zeros.unsqueeze(-1)
        return torch.nn.functional.linear(x, w.view(n, -1).to(x.dtype))


def _cases(bench):
    """(shapes as (in_features, out_features), ranks, rows, dtype)."""
    if bench.device.type == "cuda":
        shapes = [(4096, 4096)] if bench.quick else [(4096, 4096), (14336, 4096)]
        ranks = [16] if bench.quick else [8, 16, 64]
        tokens = [1, 64, 4096] if bench.quick else [1, 16, 64, 512, 4096]
        return shapes, ranks, tokens, torch.bfloat16
    shapes = [(1024, 1024)] if bench.quick else [(1024, 1024), (4096, 1024)]
    ranks = [8] if bench.quick else [8, 64]
    tokens = [1, 64] if bench.quick else [1, 64, 512, 2048]
    return shapes, ranks, tokens, torch.float32


def _layers(kind, lin, r, peft, bnb, dtype, dev):
    """-> (ours, theirs or None, theirs' name)."""
    k, n = lin.in_features, lin.out_features
    if kind == "lora":
        ours = pyllmops.nn.LoRALinear(nn.Linear(k, n, bias=False, device=dev, dtype=dtype), r=r, alpha=2 * r)
        ours.base_layer.weight.data.copy_(lin.weight.data)
        theirs = _peft_layer(peft, lin, r, 2 * r) if peft else None
        name = "peft LoRA (nn.Linear base)"
    elif kind == "qlora":
        ours = pyllmops.nn.LoRALinear(pyllmops.nn.NF4Linear.from_linear(lin, GROUP, True), r=r, alpha=2 * r)
        theirs = _peft_layer(peft, _bnb_linear(bnb, lin, dtype, dev), r, 2 * r) if peft and bnb else None
        name = "peft + bitsandbytes NF4"
    else:
        ours = pyllmops.nn.QALoRALinear.from_linear(lin, bits=4, group_size=GROUP, r=r, alpha=2 * r)
        b = ours.base_layer
        theirs = _peft_layer(peft, _TorchInt4Linear(b.qweight, b.scales, b.zeros, dtype), r, 2 * r) if peft else None
        name = "peft LoRA on torch INT4 dequantize + matmul (GPTQ torch-kernel pattern)"
    for p in ours.parameters():
        p.requires_grad_(p is ours.lora_A or p is ours.lora_B)
    if kind != "qalora":
        _same_adapter(ours, theirs)
    else:
        with torch.no_grad():
            ours.lora_B.normal_(std=0.01)
    return ours, theirs, name


def _case(bench, kind, label, m, lin, r, ours, theirs, theirs_name):
    dev, dtype = lin.weight.device, lin.weight.dtype
    k, n = lin.in_features, lin.out_features
    w = lin.weight.detach()
    x = torch.randn(m, k, device=dev, dtype=dtype)
    xg = x.clone().requires_grad_()
    gy = torch.randn(m, n, device=dev, dtype=dtype)
    entries = {"fwd": [], "fwd+bwd": []}
    for name, layer, is_base in [(theirs_name, theirs, True), ("pyllmops", ours, theirs is None)]:
        if layer is not None:
            entries["fwd"].append(dict(provider=name, fn=lambda layer=layer: layer(x), baseline=is_base,
                                       flops=_flops(m, k, n, r, False)))
            entries["fwd+bwd"].append(dict(provider=name, fn=lambda layer=layer: layer(xg).backward(gy),
                                           baseline=is_base, flops=_flops(m, k, n, r, True)))
    matmul = "torch matmul (no adapter)"
    entries["fwd"].append(dict(provider=matmul, fn=lambda: torch.nn.functional.linear(x, w),
                               flops=_flops(m, k, n, 0, False)))
    entries["fwd+bwd"].append(dict(provider=matmul, fn=lambda: torch.nn.functional.linear(xg, w).backward(gy),
                                   flops=_flops(m, k, n, 0, True)))
    with torch.no_grad():
        bench.measure_together(kind, "fwd", label, entries["fwd"])
    bench.measure_together(kind, "fwd+bwd", label, entries["fwd+bwd"])


def run(bench):
    dev = bench.device
    peft, bnb = _peft(), _bnb()
    shapes, ranks, tokens, dtype = _cases(bench)
    for kind in ("lora", "qlora", "qalora"):
        for (k, n) in shapes:
            lin = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
            for p in lin.parameters():
                p.requires_grad_(False)
            for r in ranks:
                ours, theirs, theirs_name = _layers(kind, lin, r, peft, bnb, dtype, dev)
                for m in tokens:
                    _case(bench, kind, f"{k}x{n} r{r} m{m}", m, lin, r, ours, theirs, theirs_name)
    bench_model.run(bench)
    summary(bench)


def summary(bench):
    """One line per kernel and mode: our speedup over the peer, worst and median over the cases."""
    bench._finish()
    groups = {}
    for row in bench.rows:
        if row.get("provider") == "pyllmops" and row.get("vs_baseline"):
            groups.setdefault((row["kernel"], row["mode"]), []).append(row["vs_baseline"])
    lines = []
    for (kernel, mode), ratios in groups.items():
        ratios.sort()
        lines.append(f"{kernel} {mode}: pyllmops vs peer speedup (>1 is faster) worst {ratios[0]:.2f}x, median "
                     f"{ratios[len(ratios) // 2]:.2f}x over {len(ratios)} cases")
    bench.meta["summary"] = lines
    print("\n".join(lines))
