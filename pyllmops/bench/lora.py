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


def _case(bench, kernel, label, m, k, n, r, weight, providers):
    """Times the base matmul (the baseline) and each (name, layer) provider: forward under no_grad,
    then forward + backward with x and the adapter requiring grad."""
    dev, dtype = weight.device, weight.dtype
    x = torch.randn(m, k, device=dev, dtype=dtype)
    xg = x.clone().requires_grad_()
    gy = torch.randn(m, n, device=dev, dtype=dtype)
    with torch.no_grad():
        bench.measure(kernel, "torch base matmul (no adapter)", "fwd", label,
                      lambda: torch.nn.functional.linear(x, weight), flops=_flops(m, k, n, 0, False), baseline=True)
        for name, layer in providers:
            bench.measure(kernel, name, "fwd", label, lambda: layer(x), flops=_flops(m, k, n, r, False))
    bench.measure(kernel, "torch base matmul (no adapter)", "fwd+bwd", label,
                  lambda: torch.nn.functional.linear(xg, weight).backward(gy), flops=_flops(m, k, n, 0, True),
                  baseline=True)
    for name, layer in providers:
        bench.measure(kernel, name, "fwd+bwd", label, _fwd_bwd(layer, xg, gy), flops=_flops(m, k, n, r, True))
    return x


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
            providers = [("pyllmops fused", ours)] + ([("peft (unfused)", theirs)] if theirs is not None else [])
            for m in tokens:
                _case(bench, "lora", f"{k}x{n} r{r} m{m}", m, k, n, r, lin.weight.detach(), providers)
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
            # built on the host and moved: bitsandbytes quantizes the loaded dense weight in .to()
            l4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
            l4.load_state_dict({k_: v.cpu() for k_, v in lin.state_dict().items()})
            l4 = l4.to(dev)
            peft_bnb = _peft_layer(peft, l4, r, 2 * r)
        except Exception:
            peft_bnb = None
    providers = [("pyllmops fused NF4", qlora)] + ([("peft + bitsandbytes", peft_bnb)] if peft_bnb is not None else [])
    for m in tokens:
        label = f"{k}x{n} r{r} m{m}"
        x = _case(bench, "qlora", label, m, k, n, r, lin.weight.detach(), providers)
        with torch.no_grad():
            bench.measure("int4 inference", "pyllmops QLoRA (NF4 + adapter)", "fwd", label, lambda: qlora(x),
                          flops=_flops(m, k, n, r, False), baseline=True)
            bench.measure("int4 inference", "pyllmops QA-LoRA merged IntLinear", "fwd", label, lambda: merged(x),
                          flops=_flops(m, k, n, 0, False))


def _overheads(bench):
    """overhead_pct = 100 * (median / baseline median - 1) = 100 * (1 / vs_baseline - 1)."""
    bench._finish()  # the harness fills vs_baseline
    for row in bench.rows:
        vs = row.get("vs_baseline")
        row["overhead_pct"] = None if not vs else 100 * (1 / vs - 1)
        if row["overhead_pct"] is not None and not row.get("baseline"):
            print(f"{row['kernel']:>15} {row['mode']:>8} {row['x']:>24} {row['provider']:>36}: "
                  f"{row['overhead_pct']:+7.1f}% over the baseline")
