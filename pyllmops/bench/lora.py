"""LoRA benchmarks: forward and forward+backward of an adapted linear layer against the base matmul
alone (the baseline) and peft's unfused LoRA layer; QLoRA against peft + bitsandbytes; merged INT4
(QA-LoRA) inference against QLoRA. Each row's `overhead_pct` is its time over the base matmul's,
minus 100%: what the adapter costs.

FLOPs counted: forward 2*m*k*n (base) + 2*m*r*(k + n) (adapter); forward+backward adds dx
(2*m*k*n + 2*m*r*(k + n)), dA (2*m*r*k) and dB (2*m*r*n). The frozen W gets no gradient.
"""
import torch
from torch import nn

import pyllmops


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
    model = peft.get_peft_model(_One(linear), cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(std=0.01)
    return model


def _fwd_bwd(layer, x, gy):
    def run():
        y = layer(x)
        y.backward(gy)
    return run


def _cases(bench):
    if bench.device.type == "cuda":
        shapes = [(4096, 4096), (4096, 14336)]
        ranks = [8, 16, 64]
        tokens = [1, 16, 512, 8192] if bench.quick else [1, 16, 128, 512, 2048, 8192]
        dtype = torch.bfloat16
    else:
        shapes = [(1024, 1024)] if bench.quick else [(1024, 1024), (1024, 3584)]
        ranks = [8] if bench.quick else [8, 64]
        tokens = [1, 64] if bench.quick else [1, 64, 256]
        dtype = torch.float32
    return shapes, ranks, tokens, dtype


def run(bench):
    dev = bench.device
    peft, bnb = _peft(), _bnb()
    shapes, ranks, tokens, dtype = _cases(bench)
    for (k, n) in shapes:
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
        for r in ranks:
            ours = pyllmops.nn.LoRALinear(nn.Linear(k, n, bias=False, device=dev, dtype=dtype), r=r, alpha=2 * r)
            ours.base_layer.weight.data.copy_(lin.weight.data)
            with torch.no_grad():
                ours.lora_B.normal_(std=0.01)
            theirs = _peft_layer(peft, nn.Linear(k, n, bias=False, device=dev, dtype=dtype), r, 2 * r) if peft else None
            for m in tokens:
                label = f"{k}x{n} r{r} m{m}"
                x = torch.randn(m, k, device=dev, dtype=dtype)
                xg = x.clone().requires_grad_()
                gy = torch.randn(m, n, device=dev, dtype=dtype)
                with torch.no_grad():
                    bench.measure("lora", "torch base matmul (no adapter)", "fwd", label,
                                  lambda: torch.nn.functional.linear(x, lin.weight), flops=_flops(m, k, n, 0, False),
                                  baseline=True)
                    bench.measure("lora", "pyllmops fused", "fwd", label, lambda: ours(x),
                                  flops=_flops(m, k, n, r, False))
                    if theirs is not None:
                        bench.measure("lora", "peft (unfused)", "fwd", label, lambda: theirs(x),
                                      flops=_flops(m, k, n, r, False))
                wg = lin.weight.detach()
                bench.measure("lora", "torch base matmul (no adapter)", "fwd+bwd", label,
                              lambda: torch.nn.functional.linear(xg, wg).backward(gy),
                              flops=_flops(m, k, n, 0, True), baseline=True)
                bench.measure("lora", "pyllmops fused", "fwd+bwd", label, _fwd_bwd(ours, xg, gy),
                              flops=_flops(m, k, n, r, True))
                if theirs is not None:
                    bench.measure("lora", "peft (unfused)", "fwd+bwd", label, _fwd_bwd(theirs, xg, gy),
                                  flops=_flops(m, k, n, r, True))
        _quantized(bench, lin, k, n, tokens, dtype, peft, bnb)
    _overheads(bench)


def _quantized(bench, lin, k, n, tokens, dtype, peft, bnb):
    """QLoRA (r 16) vs peft + bitsandbytes; merged QA-LoRA INT4 inference vs QLoRA inference."""
    dev, r = bench.device, 16
    qlora = pyllmops.nn.LoRALinear(pyllmops.nn.NF4Linear.from_linear(lin, 64, True), r=r, alpha=2 * r)
    qalora = pyllmops.nn.QALoRALinear.from_linear(lin, bits=4, group_size=64, r=r, alpha=2 * r)
    with torch.no_grad():
        qlora.lora_B.normal_(std=0.01)
        qalora.lora_B.normal_(std=0.01)
    merged = qalora.merge()
    peft_bnb = None
    if peft is not None and bnb is not None:
        try:
            l4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", device=dev)
            l4.load_state_dict(lin.state_dict())
            l4 = l4.to(dev)
            peft_bnb = _peft_layer(peft, l4, r, 2 * r)
        except Exception:
            peft_bnb = None
    for m in tokens:
        label = f"{k}x{n} r{r} m{m}"
        x = torch.randn(m, k, device=dev, dtype=dtype)
        xg = x.clone().requires_grad_()
        gy = torch.randn(m, n, device=dev, dtype=dtype)
        with torch.no_grad():
            bench.measure("qlora", "torch base matmul (dense, no adapter)", "fwd", label,
                          lambda: torch.nn.functional.linear(x, lin.weight), flops=_flops(m, k, n, 0, False),
                          baseline=True)
            bench.measure("qlora", "pyllmops fused NF4", "fwd", label, lambda: qlora(x), flops=_flops(m, k, n, r, False))
            if peft_bnb is not None:
                bench.measure("qlora", "peft + bitsandbytes", "fwd", label, lambda: peft_bnb(x),
                              flops=_flops(m, k, n, r, False))
            bench.measure("int4 inference", "pyllmops QLoRA (NF4 + adapter)", "fwd", label, lambda: qlora(x),
                          flops=_flops(m, k, n, r, False), baseline=True)
            bench.measure("int4 inference", "pyllmops QA-LoRA merged IntLinear", "fwd", label, lambda: merged(x),
                          flops=_flops(m, k, n, 0, False))
        bench.measure("qlora", "torch base matmul (dense, no adapter)", "fwd+bwd", label,
                      lambda: torch.nn.functional.linear(xg, lin.weight.detach()).backward(gy),
                      flops=_flops(m, k, n, 0, True), baseline=True)
        bench.measure("qlora", "pyllmops fused NF4", "fwd+bwd", label, _fwd_bwd(qlora, xg, gy),
                      flops=_flops(m, k, n, r, True))
        if peft_bnb is not None:
            bench.measure("qlora", "peft + bitsandbytes", "fwd+bwd", label, _fwd_bwd(peft_bnb, xg, gy),
                          flops=_flops(m, k, n, r, True))


def _overheads(bench):
    """overhead_pct = 100 * (median / baseline median - 1), per row with a baseline in its case."""
    for row in bench.rows:
        if "median_ms" not in row:
            continue
        base = [b for b in bench.rows if b.get("baseline") and "median_ms" in b and
                (b["kernel"], b["mode"], b["x"]) == (row["kernel"], row["mode"], row["x"])]
        row["overhead_pct"] = 100 * (row["median_ms"] / base[0]["median_ms"] - 1) if base else None
    for row in bench.rows:
        if row.get("overhead_pct") is not None and not row.get("baseline"):
            print(f"{row['kernel']:>15} {row['mode']:>8} {row['x']:>24} {row['provider']:>36}: "
                  f"{row['overhead_pct']:+7.1f}% over the baseline")
