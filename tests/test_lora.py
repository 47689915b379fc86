"""LoRA / QLoRA / QA-LoRA: kernels vs float64 references (outputs and gradients), INT quantization
exactness, the QA-LoRA merge, modules, peft / bitsandbytes interop, opcheck and bad inputs."""
import math

import pytest
import torch
from torch import nn

import pyllmops
from pyllmops.nn import (IntLinear, LoRALinear, NF4Linear, QALoRALinear, adapter_state_dict, disable_adapters,
                         load_adapter_state_dict)
from pyllmops.reference import lora as R

from conftest import CUDA, CUDA_MARKS, GPU_ONLY_MARKS, assert_close, devices, rel_err

# Bounds a few times above the worst the CPU kernels showed (outputs and gradients, 60 seeds of the
# smallest cases, where a 3-element gradient has no averaging): fp32 8.8e-7, fp16 4.1e-4, bf16 3.4e-3.
TOL = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Both implementations of every op (ops/lora.py kernel_path): the fused kernel (decode shapes on CUDA)
# and the workspace path (dequantize + library GEMM; training shapes, and always on the CPU).
PATHS = ["fused", "workspace"]


def _adapter(r, a_cols, out_features, dtype, device):
    a = (torch.randn(r, a_cols, device=device) / math.sqrt(a_cols)).to(dtype).requires_grad_()
    b = (torch.randn(out_features, r, device=device) / math.sqrt(r)).to(dtype).requires_grad_()
    return a, b


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check_fwd_bwd(fn, ref_fn, x, params, dtype, what, keep_x_storage=False):
    """fn(x, *params) vs ref_fn(x64, *params64): output and gradients of x and every param. keep_x_storage:
    x itself (its storage and offset, e.g. a misaligned view) becomes the leaf, not a clone.

    Gradient errors are relative to the larger of the reference's norm and the norm of the same gradient
    computed on |x|, |params| and |dy| (each entry then sums the magnitudes of the terms the real one adds
    up): floating-point error scales with those terms, so a gradient that cancels to a small vector by
    chance (dA of a rank-1 adapter over 6 pooled groups: 6 entries) does not fail bf16's bound by luck."""
    xs = x.detach().requires_grad_() if keep_x_storage else _leaf(x)
    ps = [_leaf(p) for p in params]
    y = fn(xs, *ps)
    x64 = _leaf(x.double())
    p64 = [_leaf(p.double()) for p in params]
    ref = ref_fn(x64, *p64)
    assert y.dtype == dtype
    assert_close(y, ref, TOL[dtype], f"{what} y")
    gy = torch.randn_like(ref).to(dtype)  # the reference gets the same (rounded) output gradient
    y.backward(gy)
    ref.backward(gy.double())
    xa, pa = _leaf(x.double().abs()), [_leaf(p.double().abs()) for p in params]
    ref_fn(xa, *pa).backward(gy.double().abs())

    def close(out, want, magnitude, name):
        assert out.shape == want.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(want.shape)}"
        o64, w64 = out.double(), want.double()
        num = float("inf") if torch.isnan(o64).any() or torch.isnan(w64).any() else (o64 - w64).norm().item()
        den = max(w64.norm().item(), magnitude.double().norm().item())
        err = num / den if den > 0 else num
        assert err <= TOL[dtype], f"{name}: error {err:.3e} (relative to the terms' magnitude) > {TOL[dtype]:.1e}"

    close(xs.grad, x64.grad, xa.grad, f"{what} dx")
    for i, (p, q, qa) in enumerate(zip(ps, p64, pa)):
        assert p.grad is not None and p.grad.dtype == p.dtype
        close(p.grad, q.grad, qa.grad, f"{what} grad of param {i}")
    return y


# ---- dense LoRA ----------------------------------------------------------------------------------
LORA_CASES = [  # (in_features, out_features, leading dims, r)
    (6, 42, (5,), 1),
    (123, 431, (2, 3), 8),
    (431, 6, (1,), 64),
    (42, 123, (17,), 8),
    (40, 24, (3, 50), 8),  # 150 rows: more than one 64-row tile of the CUDA kernel (grid.y > 1)
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f,lead,r", LORA_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_lora_linear(device, dtype, in_f, out_f, lead, r, with_bias, path, monkeypatch):
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    w = (torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)).to(dtype)
    a, b = _adapter(r, in_f, out_f, dtype, device)
    params = [a, b] + ([torch.randn(out_f, device=device).to(dtype)] if with_bias else [])
    s = 1.7

    def fn(x, a, b, *bias):
        return pyllmops.lora_linear(x, w, a, b, s, *bias)

    def ref(x, a, b, *bias):
        return R.lora_linear(x, w, a, b, s, *bias)

    y = _check_fwd_bwd(fn, ref, x, params, dtype, "lora")
    assert y.shape == (*lead, out_f)
    # the adapter matters: the base alone is far from y
    base = R.lora_linear(x, w, a, b, 0.0)
    assert rel_err(y, base) > 10 * TOL[dtype]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_lora_dropout_mask(device, dtype, path, monkeypatch):
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    """Dropout multiplies the adapter's input only; the op with an explicit mask vs the reference."""
    x = torch.randn(4, 9, 70, device=device).to(dtype)
    w = (torch.randn(33, 70, device=device) / 8).to(dtype)
    a, b = _adapter(8, 70, 33, dtype, device)
    mask = ((torch.rand(4, 9, 70, device=device) >= 0.3).float() / 0.7).to(dtype)

    def fn(x, a, b):
        return torch.ops.pyllmops.lora_fwd(x, w, None, a, b, 2.0, mask)[0]

    def ref(x, a, b):
        return R.lora_linear(x, w, a, b, 2.0, None, mask)

    _check_fwd_bwd(fn, ref, x, [a, b], dtype, "lora+dropout")


def test_lora_dropout_public():
    x = torch.randn(6, 40)
    w = torch.randn(20, 40) / 6
    a, b = _adapter(4, 40, 20, torch.float32, "cpu")
    y_plain = pyllmops.lora_linear(x, w, a, b, 1.0)
    assert torch.equal(pyllmops.lora_linear(x, w, a, b, 1.0, dropout=0.5, training=False), y_plain)
    assert rel_err(pyllmops.lora_linear(x, w, a, b, 1.0, dropout=0.5), y_plain) > 1e-3
    # with B = 0 the adapter vanishes: dropout never touches the base path
    zero_b = torch.zeros_like(b)
    assert_close(pyllmops.lora_linear(x, w, a, zero_b, 1.0, dropout=0.5), R.lora_linear(x, w, a, zero_b, 0.0), 2e-6)


# ---- QLoRA (NF4 base) ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f,lead,r", [(6, 42, (5,), 1), (123, 431, (2, 3), 8), (431, 6, (3,), 64),
                                              (40, 24, (3, 50), 8)])  # 150 rows: > one 64-row CUDA tile
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_qlora_linear(device, dtype, in_f, out_f, lead, r, double_quant, path, monkeypatch):
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    wf = torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)
    packed, state = pyllmops.quantize_nf4(wf.to(dtype), 64, double_quant)
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    a, b = _adapter(r, in_f, out_f, dtype, device)
    bias = torch.randn(out_f, device=device).to(dtype)

    def fn(x, a, b, bias):
        return pyllmops.qlora_linear(x, packed, state, a, b, 0.9, bias)

    def ref(x, a, b, bias):
        return R.qlora_linear(x, packed, state, a, b, 0.9, bias)

    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, "qlora")


def test_qlora_vs_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(42, 128) / 11
    try:
        pb, sb = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        w_bnb = F.dequantize_4bit(pb, sb).double()
    except Exception as e:  # pragma: no cover - bnb without a CPU backend
        pytest.skip(f"bitsandbytes 4-bit is unavailable on CPU here: {e}")
    state = pyllmops.NF4State.from_bnb_dict(sb.as_dict(packed=True))
    x = torch.randn(2, 5, 128)
    a, b = _adapter(8, 128, 42, torch.float32, "cpu")
    y = pyllmops.qlora_linear(x, pb, state, a, b, 2.0)
    assert_close(y, R.lora_linear(x, w_bnb, a, b, 2.0), TOL[torch.float32], "qlora vs bnb-dequantized W")


# ---- INT quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int_exact(device, bits, group_size, dtype):
    w = torch.randn(13, group_size * 3, device=device).to(dtype)
    w[0, :group_size] = 0.25  # a constant group: scale 1, every code 0, decodes exactly
    q, s, z = pyllmops.quantize_int(w, bits, group_size)
    rq, rs, rz = R.quantize_int(w, bits, group_size)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    assert torch.equal(q, R.pack_int(rq, bits))
    assert torch.equal(R.unpack_int(q, bits, w.shape[1]), rq)
    for out_dtype in DTYPES:
        d = pyllmops.dequantize_int(q, s, z, bits, group_size, out_dtype)
        assert torch.equal(d, R.dequantize_int(q, s, z, bits, group_size, torch.float32).to(out_dtype))
    d = pyllmops.dequantize_int(q, s, z, bits, group_size)
    assert torch.equal(d[0, :group_size], torch.full((group_size,), 0.25, device=device))
    # min-max rounding: error at most half a step (plus fp32 rounding of the decode)
    step = s.repeat_interleave(group_size, dim=1)
    assert ((d - w.float()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_f,groups", [(4, 0), (0, 3), (0, 0), (5, 1)])
def test_dequantize_int_empty_dims(device, out_f, groups):
    """An empty dimension is a valid (empty) weight: a zero-element tensor is contiguous whatever its strides
    (torch gives a (4, 0) tensor strides (1, 1)), and CUDA returns before launching a 0-sized grid. (5, 1):
    the same call with elements, so the poisoned output shows every element is written."""
    bits, group_size = 4, 64
    in_f = groups * group_size
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (out_f, pyllmops.ops.lora.words_per_row(in_f, bits)),
                            dtype=torch.int32, device=device)
    scales = torch.rand(out_f, groups, device=device) + 0.5
    zeros = torch.randn(out_f, groups, device=device)
    for out_dtype in DTYPES:
        d = pyllmops.dequantize_int(qweight, scales, zeros, bits, group_size, out_dtype)
        assert d.shape == (out_f, in_f) and d.dtype == out_dtype and d.device == qweight.device
        want = R.dequantize_int(qweight, scales, zeros, bits, group_size, torch.float32).to(out_dtype)
        assert torch.equal(d, want)


# ---- QA-LoRA ------------------------------------------------------------------------------------
QALORA_CASES = [(192, 42, (5,), 32, 1), (192, 123, (2, 3), 64, 8), (384, 6, (4,), 128, 64), (256, 431, (3,), 64, 8),
                (64, 20, (3, 50), 32, 4)]  # the last: 150 rows, more than one 64-row CUDA tile; the first: r = 1 over
# 6 pooled groups (with 3, dA has 3 elements and its norm is sometimes small enough to fail bf16's bound by chance)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_f,out_f,lead,group_size,r", QALORA_CASES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("path", PATHS)
def test_qalora_linear(device, dtype, in_f, out_f, lead, group_size, r, bits, path, monkeypatch):
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    w = torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)
    q, s, z = pyllmops.quantize_int(w, bits, group_size)
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    a, b = _adapter(r, in_f // group_size, out_f, dtype, device)
    bias = torch.randn(out_f, device=device).to(dtype)

    def fn(x, a, b, bias):
        return pyllmops.qalora_linear(x, q, s, z, a, b, 1.3, bits=bits, group_size=group_size, bias=bias)

    def ref(x, a, b, bias):
        return R.qalora_linear(x, q, s, z, a, b, 1.3, bits, group_size, bias)

    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, "qalora")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", PATHS)
def test_qalora_dropout_mask(device, path, monkeypatch):
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    x = torch.randn(7, 128, device=device)
    q, s, z = pyllmops.quantize_int(torch.randn(20, 128, device=device) / 11, 4, 32)
    a, b = _adapter(8, 4, 20, torch.float32, device)
    mask = (torch.rand(7, 128, device=device) >= 0.2).float() / 0.8

    def fn(x, a, b):
        return torch.ops.pyllmops.qalora_fwd(x, q, s, z, 4, 32, None, a, b, 2.0, mask)[0]

    def ref(x, a, b):
        return R.qalora_linear(x, q, s, z, a, b, 2.0, 4, 32, None, mask)

    _check_fwd_bwd(fn, ref, x, [a, b], torch.float32, "qalora+dropout")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qalora_merge_exact(device, bits):
    lin = nn.Linear(192, 45, device=device)
    layer = QALoRALinear.from_linear(lin, bits=bits, group_size=64, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained adapter (B = 0 would make the merge trivially exact)
    x = torch.randn(3, 11, 192, device=device)
    y = layer(x)
    merged = layer.merge()
    assert isinstance(merged, IntLinear)
    assert not any(n.startswith("lora") for n, _ in merged.named_parameters())
    assert {n for n, _ in merged.named_buffers()} == {"qweight", "scales", "zeros"}
    ym = merged(x)
    assert_close(ym, y, 2e-6, "merged IntLinear vs adapted layer")
    # and both against the float64 formula
    base = layer.base_layer
    ref = R.qalora_linear(x, base.qweight, base.scales, base.zeros, layer.lora_A, layer.lora_B, layer.scaling, bits,
                          64, base.bias)
    assert_close(ym, ref, 2e-6, "merged vs reference")
    assert rel_err(y, base(x)) > 1e-3  # the adapter was not a no-op
    with layer.disable_adapter():
        assert torch.equal(layer(x), base(x))


# ---- modules ------------------------------------------------------------------------------------
def test_lora_module_init_merge_disable():
    base = nn.Linear(40, 24)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) on fan_in 40
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(2, 3, 40)
    assert_close(layer(x), base(x), 2e-6, "fresh adapter = base")
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    w0 = base.weight.detach().clone()
    with layer.disable_adapter():
        assert_close(layer(x), nn.functional.linear(x, w0, base.bias), 2e-6, "disabled")
    layer.merge()
    assert_close(layer(x), y, 2e-6, "merged")
    with layer.disable_adapter():
        assert_close(layer(x), nn.functional.linear(x, w0, base.bias), 2e-6, "disabled while merged")
    assert_close(layer(x), y, 2e-6, "merged after disable")
    layer.unmerge()
    assert_close(base.weight, w0, 1e-6, "unmerge restores W")
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert base.weight.grad is None and not base.weight.requires_grad
    assert LoRALinear(nn.Linear(16, 8), r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_lora_module_nf4_base():
    lin = nn.Linear(64, 24)
    nf4 = NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    layer = LoRALinear(nf4, r=8, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    ref = R.qlora_linear(x, nf4.weight, nf4.quant_state, layer.lora_A, layer.lora_B, 1.0, nf4.bias)
    assert_close(layer(x), ref, TOL[torch.float32], "LoRALinear(NF4Linear)")
    with pytest.raises(TypeError, match="dense"):
        layer.merge()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.v_proj = nn.Linear(64, 32)
        self.mlp = nn.Linear(32, 64)

    def forward(self, x):
        return self.mlp(torch.relu(self.v_proj(self.q_proj(x))))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


@pytest.mark.parametrize("quantize", [None, "nf4", "int4", "int3", "int2"])
def test_apply_lora(quantize):
    model = _Model()
    apply_lora = pyllmops.apply_lora
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], quantize=quantize, group_size=32)
    kind = QALoRALinear if quantize and quantize.startswith("int") else LoRALinear
    assert isinstance(model.layers[0].q_proj, kind) and isinstance(model.layers[1].v_proj, kind)
    assert isinstance(model.layers[0].mlp, nn.Linear)
    if quantize == "nf4":
        assert isinstance(model.layers[0].q_proj.base_layer, NF4Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.lora_{ab}" for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"}
    for mod in model.modules():
        if isinstance(mod, kind):
            with torch.no_grad():
                mod.lora_B.normal_(std=0.1)
    model(torch.randn(2, 5, 64)).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # adapter state dict round trip into a fresh, identically converted model
    sd = adapter_state_dict(model)
    assert set(sd) == {f"base_model.model.layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1)
                       for m in ("q_proj", "v_proj") for ab in "AB"}
    other = _Model()
    apply_lora(other, r=4, alpha=8, target_modules=["q_proj", "v_proj"], quantize=quantize, group_size=32)
    load_adapter_state_dict(other, sd)
    for k, v in adapter_state_dict(other).items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize("quantize", [None, "nf4", "int4"])
def test_module_state_dict_round_trip(quantize):
    """A converted model's full state dict (base weights, NF4 / INT buffers, adapters) loads into a
    freshly converted model and reproduces its output exactly."""
    model = _Model()
    pyllmops.apply_lora(model, r=4, alpha=4, target_modules="q_proj", quantize=quantize, group_size=32)
    for mod in model.modules():
        if isinstance(mod, (LoRALinear, QALoRALinear)):
            with torch.no_grad():
                mod.lora_B.normal_()
    other = _Model()
    pyllmops.apply_lora(other, r=4, alpha=4, target_modules="q_proj", quantize=quantize, group_size=32)
    x = torch.randn(3, 64)
    assert not torch.equal(other(x), model(x))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))


def test_adapter_state_dict_errors():
    model = _Model()
    pyllmops.apply_lora(model, r=4, alpha=8, target_modules=["q_proj"])
    sd = adapter_state_dict(model)
    other = _Model()
    pyllmops.apply_lora(other, r=8, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank mismatch"):
        load_adapter_state_dict(other, sd)
    with pytest.raises(KeyError, match="match no adapter"):
        load_adapter_state_dict(model, {**sd, "base_model.model.layers.0.mlp.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(KeyError, match="lora_B"):
        load_adapter_state_dict(model, {k: v for k, v in sd.items() if "layers.1.q_proj.lora_B" not in k})


# ---- peft ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_against_peft(use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    ours = _Model()
    theirs = _Model()
    theirs.load_state_dict(ours.state_dict())
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          use_rslora=use_rslora)
    theirs = peft.get_peft_model(theirs, cfg)
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(std=0.2)
    pyllmops.apply_lora(ours, r=8, alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    # peft's saved adapter loads into ours
    load_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(3, 7, 64)
    y_ours, y_theirs = ours(x), theirs(x)
    assert_close(y_ours, y_theirs, TOL[torch.float32], "ours vs peft")
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, theirs_grads[n + ".weight"], 1e-5, f"grad {n}")
    # ours loads into peft
    with torch.no_grad():
        for mod in ours.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_A.normal_(std=0.1)
    peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert_close(ours(x), theirs(x), TOL[torch.float32], "ours -> peft")
    with theirs.disable_adapter():
        y_base = theirs(x)
    with disable_adapters(ours):
        assert_close(ours(x), y_base, TOL[torch.float32], "adapters off")
    assert rel_err(ours(x), y_base) > 1e-3  # and back on


def _layer_case(kind, w, dtype, r, group):
    """(ours, reference, A, B) for a lora / qlora (NF4, blocksize 64, nested) / qalora (4-bit, `group`) layer
    on the float32 weight w, scaling 1.5; both called as f(x, a, b, bias)."""
    out_f, in_f = w.shape
    dev = w.device
    if kind == "qalora":
        q, s, z = pyllmops.quantize_int(w, 4, group)
        a, b = _adapter(r, in_f // group, out_f, dtype, dev)
        fn = lambda x, a, b, bias: pyllmops.qalora_linear(x, q, s, z, a, b, 1.5, bits=4, group_size=group,  # noqa: E731
                                                          bias=bias)
        ref = lambda x, a, b, bias: R.qalora_linear(x, q, s, z, a, b, 1.5, 4, group, bias)  # noqa: E731
    elif kind == "qlora":
        packed, st = pyllmops.quantize_nf4(w.to(dtype), 64, True)
        a, b = _adapter(r, in_f, out_f, dtype, dev)
        fn = lambda x, a, b, bias: pyllmops.qlora_linear(x, packed, st, a, b, 1.5, bias)  # noqa: E731
        ref = lambda x, a, b, bias: R.qlora_linear(x, packed, st, a, b, 1.5, bias)  # noqa: E731
    else:
        wd = w.to(dtype)
        a, b = _adapter(r, in_f, out_f, dtype, dev)
        fn = lambda x, a, b, bias: pyllmops.lora_linear(x, wd, a, b, 1.5, bias)  # noqa: E731
        ref = lambda x, a, b, bias: R.lora_linear(x, wd, a, b, 1.5, bias)  # noqa: E731
    return fn, ref, a, b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "qlora", "qalora"])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
def test_tensor_core_kernel_cuda(monkeypatch, dtype, kind, dev, tensor_cores):
    """The fused kernel's mma.sync main loop (the default for fp16 / bf16) and its SIMT loop
    (PYLLMOPS_LORA_TENSOR_CORES=0) against the references; 135 rows, forced onto the fused path."""
    monkeypatch.setenv("PYLLMOPS_LORA_TENSOR_CORES", tensor_cores)
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")
    in_f, out_f, r = 192, 131, 24
    x = torch.randn(3, 45, in_f, device=dev).to(dtype)
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    fn, ref, a, b = _layer_case(kind, w, dtype, r, 64)
    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, f"{kind} tensor cores")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "qlora", "qalora"])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("aligned", [True, False])
def test_decode_kernel_staging_cuda(dtype, kind, dev, aligned, monkeypatch):
    """The decode kernel's two ways of filling shared memory (lora_cuda_mma.cu): 16-byte cp.async copies of
    x, A and W / its 4-bit codes (a 16-byte aligned x, in_features % 32 == 0, no dropout), and the scalar
    staging that a misaligned x (a view one element into its storage) falls back to. Decode shape (5 rows:
    the fused path by default), a partial column tile (72 outputs) and r = 40 (the last rank tile of the
    second warp column skipped). Both against the references, forward and backward."""
    in_f, out_f, r, m = 256, 72, 40, 5
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")  # QLoRA's automatic decode forward takes ops.nf4's kernel
    store = torch.randn(m * in_f + 8, device=dev).to(dtype)
    x = store[:m * in_f].view(m, in_f) if aligned else store[1:1 + m * in_f].view(m, in_f)
    assert (x.data_ptr() % 16 == 0) == aligned
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    fn, ref, a, b = _layer_case(kind, w, dtype, r, 32)
    from pyllmops.ops import lora as L
    assert L.kernel_path(kind, m, x.device, r) == "fused"
    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, f"{kind} decode staging (aligned={aligned})", keep_x_storage=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_qlora_decode_skinny_base_cuda(dtype, dev, monkeypatch):
    """The automatic CUDA QLoRA forward up to 16 rows: the base product in ops.nf4's skinny tensor-core kernel,
    the adapter as two small GEMMs (ops/lora.py _skinny_base); 17 rows go back to the fused LoRA kernel.
    Forward and backward against float64 on both sides of that limit."""
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    in_f, out_f, r = 512, 72, 8
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    packed, st = pyllmops.quantize_nf4(w.to(dtype), 64, True)
    bias = torch.randn(out_f, device=dev).to(dtype)
    for m in (1, 16, 17):
        x = torch.randn(m, in_f, device=dev).to(dtype)
        assert L._skinny_base("nf4", x, False) == (m <= 16)
        a, b = _adapter(r, in_f, out_f, dtype, dev)
        _check_fwd_bwd(lambda x, a, b, bias: pyllmops.qlora_linear(x, packed, st, a, b, 1.5, bias),
                       lambda x, a, b, bias: R.qlora_linear(x, packed, st, a, b, 1.5, bias),
                       x, [a, b, bias], dtype, f"qlora skinny base m={m}")


# ---- the tensor-core decode kernel at ranks 65-256: the down pass and the chunked epilogue ----------
def _spy_paths(monkeypatch):
    """Records which implementation each forward / input-gradient took: ('fused', transposed, r, slices of the
    down pass) or ('workspace', transposed). Split-K's slice count: _force_split."""
    from pyllmops.ops import lora as L

    calls = []
    real_fused, real_workspace = L._fused, L._workspace

    def fused(kind, inp, w, transposed, bias, lora_a, *rest):
        r = lora_a.shape[0]
        slices = L.down_splits(inp.shape[0], r, inp.shape[1]) if r > L.MAX_RANK_CUDA else 0
        calls.append(("fused", transposed, r, slices))
        return real_fused(kind, inp, w, transposed, bias, lora_a, *rest)

    def workspace(kind, inp, w, transposed, *rest):
        calls.append(("workspace", transposed))
        return real_workspace(kind, inp, w, transposed, *rest)

    monkeypatch.setattr(L, "_fused", fused)
    monkeypatch.setattr(L, "_workspace", workspace)
    return calls


LARGE_RANK_CASES = [  # (kind, r, dtype, in_features): every rank for every base, fp16 and bf16 in turn
    (kind, r, (torch.float16, torch.bfloat16)[(i + j) % 2], in_f)
    for i, kind in enumerate(["lora", "qlora", "qalora"])
    for j, (r, in_f) in enumerate([(65, 128), (96, 160), (128, 128), (200, 96), (256, 128)])
]


@pytest.mark.parametrize("kind,r,dtype,in_f", LARGE_RANK_CASES,
                         ids=[f"{k}-r{r}-{str(d)[6:]}" for k, r, d, _ in LARGE_RANK_CASES])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_decode_kernel_large_rank_cuda(kind, r, dtype, in_f, dev, monkeypatch):
    """Ranks 65-256 (multiples of 64 and not, nor of 16: 65, 200) run in the tensor-core decode kernel, forward
    and input gradient, for the dense, NF4 and INT bases: t = x.A^T (dy.B) in the down pass's partial sums over
    several reduction slices, the epilogue walking the ranks in chunks of 64. 5 rows (the automatic decode path;
    forced only so QLoRA's forward does not take ops.nf4's skinny kernel), 72 outputs (two column tiles, the
    second partial), bias. Against float64, outputs poisoned; the spy proves the fused kernel ran (the SIMT
    kernel and the C++ checks refuse ranks above 64 without the down pass) and never the workspace path."""
    from pyllmops.ops import lora as L

    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")
    out_f, m = 72, 5
    assert L.kernel_path(kind, m, CUDA, r, dtype) == "fused"
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    fn, ref, a, b = _layer_case(kind, w, dtype, r, 32)
    x = torch.randn(m, in_f, device=dev).to(dtype)
    calls = _spy_paths(monkeypatch)
    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, f"{kind} r={r}")
    assert [c[:3] for c in calls] == [("fused", False, r), ("fused", True, r)]
    assert all(c[3] > 1 for c in calls)  # the down pass split the reduction


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_decode_kernel_large_rank_tiles_slices_cuda(dev, monkeypatch):
    """r = 256 over 70 rows (two row tiles, forced onto the fused path) and 160 input features (5 steps in 4
    slices of 2: the last slice is empty and must write zeros), with a dropout mask (scalar staging of the
    down pass; the backward's mask on the adapter term); and a misaligned x (scalar staging) at decode rows."""
    from pyllmops.ops import lora as L

    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")
    dtype, in_f, out_f, r = torch.bfloat16, 160, 72, 256
    assert L.down_splits(70, r, in_f) == 4
    w = (torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)).to(dtype)
    a, b = _adapter(r, in_f, out_f, dtype, dev)
    x = torch.randn(70, in_f, device=dev).to(dtype)
    mask = ((torch.rand(70, in_f, device=dev) >= 0.3).float() / 0.7).to(dtype)
    calls = _spy_paths(monkeypatch)
    _check_fwd_bwd(lambda x, a, b: torch.ops.pyllmops.lora_fwd(x, w, None, a, b, 2.0, mask)[0],
                   lambda x, a, b: R.lora_linear(x, w, a, b, 2.0, None, mask), x, [a, b], dtype, "lora r=256 dropout")
    assert [c[:3] for c in calls] == [("fused", False, r), ("fused", True, r)]
    store = torch.randn(3 * in_f + 8, device=dev).to(dtype)
    xm = store[1:1 + 3 * in_f].view(3, in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    _check_fwd_bwd(lambda x, a, b, bias: pyllmops.lora_linear(x, w, a, b, 1.5, bias),
                   lambda x, a, b, bias: R.lora_linear(x, w, a, b, 1.5, bias), xm, [a, b, bias], dtype,
                   "lora r=256 misaligned x", keep_x_storage=True)
    assert [c[0] for c in calls] == ["fused"] * 4


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_decode_kernel_large_rank_empty_cuda(dev, monkeypatch):
    """r = 128 with no rows (nothing launched) and with in_features 0 (the down pass has no steps and writes
    zeros: y is the bias, dB is zero)."""
    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    bf, r = torch.bfloat16, 128
    b = torch.randn(32, r, device=dev).to(bf).requires_grad_()
    bias = torch.randn(32, device=dev).to(bf)
    w = torch.randn(32, 64, device=dev).to(bf)
    a = torch.randn(r, 64, device=dev).to(bf)
    assert pyllmops.lora_linear(torch.randn(0, 64, device=dev).to(bf), w, a, b, 2.0, bias).shape == (0, 32)
    x = torch.randn(5, 0, device=dev).to(bf).requires_grad_()
    a0 = torch.randn(r, 0, device=dev).to(bf).requires_grad_()
    y = pyllmops.lora_linear(x, torch.randn(32, 0, device=dev).to(bf), a0, b, 2.0, bias)
    assert torch.equal(y, bias.expand(5, 32))
    y.float().sum().backward()
    assert x.grad.shape == (5, 0) and a0.grad.shape == (r, 0) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_large_rank_path_selection_cuda(dev, monkeypatch):
    """Ranks 65-256 take the fused path on CUDA only on the tensor-core kernel (fp16 / bf16); fp32 and
    PYLLMOPS_LORA_TENSOR_CORES=0 (the SIMT kernel, t in registers) and ranks above 256 take the workspace path,
    which still gives the right answer."""
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    assert L.kernel_path("dense", 1, CUDA, 256, torch.bfloat16) == "fused"
    assert L.kernel_path("dense", 1, CUDA, 257, torch.bfloat16) == "workspace"
    assert L.kernel_path("dense", 1, CUDA, 65, torch.float32) == "workspace"
    assert L.kernel_path("dense", 1, CUDA, 64, torch.float32) == "fused"
    assert not L._fits_32bit(33_000_000, 1, 66) and L._fits_32bit(33_000_000, 1, 64)
    monkeypatch.setenv("PYLLMOPS_LORA_TENSOR_CORES", "0")
    assert L.kernel_path("dense", 1, CUDA, 65, torch.bfloat16) == "workspace"
    w = (torch.randn(40, 64, device=dev) / 8).to(torch.bfloat16)
    x = torch.randn(3, 64, device=dev).to(torch.bfloat16)
    a, b = _adapter(96, 64, 40, torch.bfloat16, dev)
    calls = _spy_paths(monkeypatch)
    monkeypatch.setattr(L, "plain_eager", lambda x: False)  # the registered op, whose path the spy sees
    _check_fwd_bwd(lambda x, a, b: pyllmops.lora_linear(x, w, a, b, 1.5),
                   lambda x, a, b: R.lora_linear(x, w, a, b, 1.5), x, [a, b], torch.bfloat16, "SIMT r=96")
    assert [c[0] for c in calls] == ["workspace", "workspace"]


@pytest.mark.parametrize("dev", [pytest.param("cuda", id="gpu", marks=GPU_ONLY_MARKS)])
@pytest.mark.parametrize("r", [16, 256])
def test_decode_graph_capture(dev, r, monkeypatch):
    """The decode path (r = 256: down pass, split grid and finishing pass; r = 16: split grid and finishing pass;
    t_part and o_part from torch's allocator) captures into a CUDA graph and replays with new inputs (a real GPU
    only: the emulator has no graphs)."""
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    dtype, in_f, out_f = torch.bfloat16, 256, 192
    assert L.split_k(3, out_f, in_f, 2) == 2
    w = (torch.randn(out_f, in_f, device=dev) / 16).to(dtype)
    a, b = _adapter(r, in_f, out_f, dtype, dev)
    a, b = a.detach(), b.detach()
    x = torch.randn(3, in_f, device=dev).to(dtype)
    for _ in range(2):  # warm-up before capture
        pyllmops.lora_linear(x, w, a, b, 1.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pyllmops.lora_linear(x, w, a, b, 1.5)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, R.lora_linear(x.double(), w.double(), a.double(), b.double(), 1.5), TOL[dtype], "graph replay")


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_large_rank_rechecked_in_cpp_cuda(dev):
    """_C refuses ranks above 64 on the SIMT kernel, ranks above 256, and ranks above 64 without the down
    pass's workspace, before any launch."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    bf = torch.bfloat16
    x, w = torch.randn(4, 64, device=dev).to(bf), torch.randn(24, 64, device=dev).to(bf)
    out = torch.empty(4, 24, device=dev).to(bf)

    def call(r, t_part, tensor_cores):
        a, b = torch.randn(r, 64, device=dev).to(bf), torch.randn(24, r, device=dev).to(bf)
        t = torch.empty(4, r, device=dev)
        lib().lora_fused_dense(view(x), None, None, view(w), False, None, view(a), view(b), 1.0, view(out), view(t),
                               None if t_part is None else view(t_part), None, tensor_cores, 0)

    with pytest.raises(ValueError, match="SIMT kernel supports rank r <= 64, got 65"):
        call(65, torch.empty(2, 4, 65, device=dev), False)
    with pytest.raises(ValueError, match="tensor-core kernel supports rank r <= 256, got 257"):
        call(257, torch.empty(2, 4, 257, device=dev), True)
    with pytest.raises(ValueError, match="needs a t_part workspace"):
        call(65, None, True)
    with pytest.raises(ValueError, match="t_part has shape"):
        call(65, torch.empty(2, 4, 64, device=dev), True)


# ---- split-K of the tensor-core decode kernel: slices of the reduction, the finishing pass ----------------
def _force_split(monkeypatch, splits):
    """Makes ops/lora.py choose `splits` reduction slices (None: its own choice) and records every choice."""
    from pyllmops.ops import lora as L

    chosen, real = [], L.split_k

    def split_k(m, n_cols, n_red, weight_bytes):
        chosen.append(real(m, n_cols, n_red, weight_bytes) if splits is None else splits)
        return chosen[-1]

    monkeypatch.setattr(L, "split_k", split_k)
    return chosen


# (kind, r, rows, slices): every base, rank, row count and slice count at least once (a Latin square); 160
# input features are 5 steps of 32: 2 slices of 3 + 2 steps, 3 of 2 + 2 + 1, 4 of 2 + 2 + 1 + 0 (an empty
# slice); the input gradient reduces over 72 outputs (3 steps: 4 slices leave one empty there too).
SPLIT_CASES = [(kind, r, m, ((i + j) % 4) + 1)
               for i, kind in enumerate(["lora", "qlora", "qalora"])
               for j, (r, m) in enumerate([(8, (1, 5, 63)[i]), (64, (5, 63, 1)[i]), (128, (63, 1, 5)[i]),
                                           (256, (1, 5, 63)[i])])]


@pytest.mark.parametrize("kind,r,m,splits", SPLIT_CASES, ids=[f"{k}-r{r}-m{m}-s{s}" for k, r, m, s in SPLIT_CASES])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_split_k_cuda(kind, r, m, splits, dev, monkeypatch):
    """The tensor-core decode kernel split 1-4 ways along the reduction (the split grid's fp32 partial sums,
    added in slice order by the finishing pass, which applies bias and the adapter term once): dense, NF4 and
    INT4 (QA-LoRA pooling, group 32) bases, ranks 8 and 64 (t's partials from column tile 0's slices) and 128,
    256 (t from the down pass), 1, 5 and 63 rows, forward (cp.async staging) and input gradient (scalar
    staging; dA, dB, dbias through t). Against float64 with poisoned outputs; the spy proves both calls took the
    fused kernel with the forced slice count."""
    dtype = (torch.float16, torch.bfloat16)[(r + m) % 2]
    in_f, out_f = 160, 72
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")  # QLoRA's automatic decode forward takes ops.nf4's kernel
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    fn, ref, a, b = _layer_case(kind, w, dtype, r, 32)
    x = torch.randn(m, in_f, device=dev).to(dtype)
    calls, chosen = _spy_paths(monkeypatch), _force_split(monkeypatch, splits)
    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, f"{kind} r={r} m={m} split {splits}")
    assert [c[:3] for c in calls] == [("fused", False, r), ("fused", True, r)]
    assert chosen == [splits, splits]


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_code_ring_cuda(kind, splits, dev, monkeypatch):
    """The ring of 4-bit code stages (NF4, INT4; issued 3 steps ahead, slot = step % 4) over slices long enough to
    wrap it: 640 features = 20 steps, in one slice or in 7 + 7 + 6; 2 rows, forward (the ring) and input gradient,
    against float64."""
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")
    dtype, in_f, out_f, r, m = torch.bfloat16, 640, 40, 8, 2
    w = torch.randn(out_f, in_f, device=dev) / math.sqrt(in_f)
    bias = torch.randn(out_f, device=dev).to(dtype)
    fn, ref, a, b = _layer_case(kind, w, dtype, r, 64)
    x = torch.randn(m, in_f, device=dev).to(dtype)
    chosen = _force_split(monkeypatch, splits)
    _check_fwd_bwd(fn, ref, x, [a, b, bias], dtype, f"{kind} code ring, split {splits}")
    assert chosen == [splits, splits]


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_split_k_chosen_and_deterministic_cuda(dev, monkeypatch):
    """At a decode shape the op splits on its own (1 row, 1024 features: 8 slices of 4 steps for the two column
    tiles), with a dropout mask (the forward's masked t in column tile 0's slices, the backward's mask on the
    adapter term in the finishing pass); two calls are bitwise equal (the slices are added in a fixed order)."""
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    dtype, in_f, out_f, r, m = torch.bfloat16, 1024, 96, 16, 1
    assert L.split_k(m, out_f, in_f, 2) == 8
    w = (torch.randn(out_f, in_f, device=dev) / 32).to(dtype)
    a, b = _adapter(r, in_f, out_f, dtype, dev)
    bias = torch.randn(out_f, device=dev).to(dtype)
    x = torch.randn(m, in_f, device=dev).to(dtype)
    mask = ((torch.rand(m, in_f, device=dev) >= 0.25).float() / 0.75).to(dtype)
    calls, chosen = _spy_paths(monkeypatch), _force_split(monkeypatch, None)
    _check_fwd_bwd(lambda x, a, b, bias: torch.ops.pyllmops.lora_fwd(x, w, bias, a, b, 2.0, mask)[0],
                   lambda x, a, b, bias: R.lora_linear(x, w, a, b, 2.0, bias, mask), x, [a, b, bias], dtype,
                   "lora split-K dropout")
    assert [c[:2] for c in calls] == [("fused", False), ("fused", True)]
    assert chosen[0] == 8 and chosen[1] == L.split_k(m, in_f, out_f, 2) == 1  # dx reduces over 96: 3 steps
    ops = torch.ops.pyllmops
    y1, t1 = ops.lora_fwd(x, w, bias, a.detach(), b.detach(), 2.0, mask)
    y2, t2 = ops.lora_fwd(x, w, bias, a.detach(), b.detach(), 2.0, mask)
    assert torch.equal(y1, y2) and torch.equal(t1, t2)
    dy = torch.randn(3, out_f, device=dev).to(dtype)
    _force_split(monkeypatch, 3)
    d1 = ops.lora_bwd_dx(dy, w, a.detach(), b.detach(), 2.0, None)
    d2 = ops.lora_bwd_dx(dy, w, a.detach(), b.detach(), 2.0, None)
    assert all(torch.equal(p, q) for p, q in zip(d1, d2))


@pytest.mark.parametrize("dev", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_split_k_rechecked_in_cpp_cuda(dev):
    """_C refuses a split-K workspace the kernel cannot use: on the SIMT kernel, without the down pass's t_part
    (which split-K needs at every rank), or of the wrong shape, before any launch."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    bf = torch.bfloat16
    x, w = torch.randn(4, 64, device=dev).to(bf), torch.randn(24, 64, device=dev).to(bf)
    a, b = torch.randn(8, 64, device=dev).to(bf), torch.randn(24, 8, device=dev).to(bf)
    out, t = torch.empty(4, 24, device=dev).to(bf), torch.empty(4, 8, device=dev)

    def call(o_part, t_part, tensor_cores=True):
        lib().lora_fused_dense(view(x), None, None, view(w), False, None, view(a), view(b), 1.0, view(out), view(t),
                               None if t_part is None else view(t_part), view(o_part), tensor_cores, 0)

    with pytest.raises(ValueError, match="is for the CUDA tensor-core LoRA kernel"):
        call(torch.empty(2, 4, 24, device=dev), torch.empty(2, 4, 8, device=dev), tensor_cores=False)
    with pytest.raises(ValueError, match="needs a t_part workspace of 1 to 65535 slices .* with split-K, got 0"):
        call(torch.empty(2, 4, 24, device=dev), None)
    with pytest.raises(ValueError, match="o_part has shape"):
        call(torch.empty(2, 3, 24, device=dev), torch.empty(2, 4, 8, device=dev))


def test_split_k_choice():
    """ops/lora.py split_k: about 512 CTAs (column tiles x row tiles x slices), slices of at least 4 steps, fp32
    partial sums at most W's bytes; 1 where the grid is already full or the reduction short."""
    from pyllmops.ops import lora as L

    assert L.split_k(1, 4096, 4096, 0.5 + 4 / 64) == 8        # NF4 4096^2 decode: 64 tiles x 8 = 512 CTAs
    assert L.split_k(16, 4096, 4096, 0.5 + 4 / 64) == 8
    assert L.split_k(1, 14336, 4096, 0.5 + 4 / 64) == 2       # 224 tiles x 2 = 448 CTAs
    assert L.split_k(1, 4096, 14336, 0.5 + 4 / 64) == 8       # the down projection: 56 steps a slice
    assert L.split_k(63, 4096, 256, 0.5 + 4 / 64) == 1        # partials would exceed W's bytes
    assert L.split_k(1, 64, 96, 2) == 1                       # 3 steps: too short to split
    assert L.split_k(64, 32768, 4096, 2) == 1                 # 512 tiles: the grid is full
    assert L.split_k(0, 64, 4096, 2) == 1 and L.split_k(5, 0, 4096, 2) == 1


# ---- opcheck ------------------------------------------------------------------------------------
def _opcheck_cases(device):
    dt = torch.float32
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    w = torch.randn(24, 64, device=device) / 8
    a, b = _adapter(4, 64, 24, dt, device)
    bias = torch.randn(24, device=device, requires_grad=True)
    mask = (torch.rand(2, 3, 64, device=device) > 0.5).float() * 2
    dy = torch.randn(2, 3, 24, device=device)
    packed, st = pyllmops.quantize_nf4(w, 64, True)
    nf4 = (packed, *st.kernel_args())
    q, s, z = pyllmops.quantize_int(w, 4, 32)
    aq, bq = _adapter(4, 2, 24, dt, device)
    ops = torch.ops.pyllmops
    return [
        (ops.lora_fwd, (x, w, bias, a, b, 1.5, None)),
        (ops.lora_fwd, (x, w, None, a, b, 1.5, mask)),
        (ops.lora_bwd_dx, (dy, w, a.detach(), b.detach(), 1.5, mask)),
        (ops.qlora_fwd, (x, *nf4, 24, bias, a, b, 0.5, None)),
        (ops.qlora_bwd_dx, (dy, *nf4, 64, a.detach(), b.detach(), 0.5, None)),
        (ops.qalora_fwd, (x, q, s, z, 4, 32, bias, aq, bq, 2.0, mask)),
        (ops.qalora_bwd_dx, (dy, q, s, z, 4, 32, aq.detach(), bq.detach(), 2.0, None)),
        (ops.int_quantize, (w, 3, 32)),
        (ops.int_dequantize, (q, s, z, 4, 32, torch.bfloat16)),
    ]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(4, 64)
    w = torch.randn(24, 64)
    a, b = torch.randn(8, 64), torch.randn(24, 8)
    with pytest.raises(ValueError, match=r"lora_a has shape \(8, 63\), expected \(r, 64\)"):
        pyllmops.lora_linear(x, w, torch.randn(8, 63), b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b has shape \(24, 4\), expected \(out_features=24, r=8\)"):
        pyllmops.lora_linear(x, w, a, torch.randn(24, 4), 1.0)
    with pytest.raises(ValueError, match="x has 63 features"):
        pyllmops.lora_linear(torch.randn(4, 63), w, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a must have dtype"):
        pyllmops.lora_linear(x, w, a.half(), b, 1.0)
    with pytest.raises(TypeError, match="scaling must be a finite float"):
        pyllmops.lora_linear(x, w, a, b, "2")
    with pytest.raises(ValueError, match="dropout must be a float in"):
        pyllmops.lora_linear(x, w, a, b, 1.0, dropout=1.0)
    with pytest.raises(ValueError, match="bias has 23 elements"):
        pyllmops.lora_linear(x, w, a, b, 1.0, torch.randn(23))
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        pyllmops.quantize_int(torch.randn(8, 96), 4, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 3, 4\], got 8"):
        pyllmops.quantize_int(torch.randn(8, 64), 8, 32)
    with pytest.raises(ValueError, match=r"group_size must be one of \[32, 64, 128\], got 16"):
        pyllmops.quantize_int(torch.randn(8, 64), 4, 16)
    q, s, z = pyllmops.quantize_int(torch.randn(24, 64), 4, 32)
    with pytest.raises(ValueError, match=r"lora_a has shape \(8, 64\), expected \(r, 2\)"):
        pyllmops.qalora_linear(x, q, s, z, a, b, 1.0, bits=4, group_size=32)
    with pytest.raises(ValueError, match="qweight has shape"):
        pyllmops.qalora_linear(x, q, s, z, torch.randn(8, 2), b, 1.0, bits=3, group_size=32)
    with pytest.raises(TypeError, match="state must be an NF4State"):
        pyllmops.qlora_linear(x, q, None, a, b, 1.0)
    with pytest.raises(ValueError, match="does not divide in_features"):
        QALoRALinear.from_linear(nn.Linear(96, 8), bits=4, group_size=64)
    with pytest.raises(ValueError, match="bits must be one of"):
        QALoRALinear.from_linear(nn.Linear(64, 8), bits=5, group_size=64)
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRALinear(nn.Linear(8, 8), r=0)
    with pytest.raises(TypeError, match="base must be"):
        LoRALinear(nn.Conv1d(8, 8, 1))
    with pytest.raises(ValueError, match="quantize must be"):
        pyllmops.apply_lora(_Model(), quantize="int8")
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        pyllmops.apply_lora(_Model(), target_modules=["k_proj"])


def test_binding_rechecks():
    """_C re-checks what its kernels rely on and raises (never reads out of bounds)."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import on_cuda, view

    x = torch.randn(4, 64)
    w = torch.randn(24, 64)
    out = torch.empty(4, 24)
    t = torch.empty(4, 8)
    a, b = torch.randn(8, 64), torch.randn(24, 8)
    args = lambda **kw: [view(kw.get("x", x)), None, None, view(kw.get("w", w)), False, None,  # noqa: E731
                         view(kw.get("a", a)), view(kw.get("b", b)), 1.0, view(kw.get("out", out)),
                         view(kw.get("t", t)), kw.get("t_part"), kw.get("o_part"), False, 0]
    lib().lora_fused_dense(*args())
    with pytest.raises(ValueError, match="weight has shape"):
        lib().lora_fused_dense(*args(w=torch.randn(24, 32)))
    with pytest.raises(ValueError, match="lora_b has shape"):
        lib().lora_fused_dense(*args(b=torch.randn(24, 7)))
    with pytest.raises(ValueError, match="t has shape"):
        lib().lora_fused_dense(*args(t=torch.empty(4, 7)))
    with pytest.raises(ValueError, match="must be contiguous"):
        lib().lora_fused_dense(*args(x=torch.randn(64, 4).t()))
    with pytest.raises(ValueError, match="t must be float32"):
        lib().lora_fused_dense(*args(t=torch.empty(4, 8, dtype=torch.float64)))
    with pytest.raises(ValueError, match="t_part has shape"):
        lib().lora_fused_dense(*args(t_part=view(torch.empty(2, 4, 7))))
    with pytest.raises(ValueError, match="o_part has shape"):
        lib().lora_fused_dense(*args(o_part=view(torch.empty(2, 4, 23))))
    if not on_cuda(x):  # the CPU kernel refuses a split-K workspace rather than ignore it
        with pytest.raises(ValueError, match="o_part .* is for the CUDA tensor-core LoRA kernel"):
            lib().lora_fused_dense(*args(o_part=view(torch.empty(2, 4, 24))))
    q, s, z = pyllmops.quantize_int(w, 4, 32)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        lib().int_dequantize(view(q), view(s), view(z), 5, 32, view(torch.empty(24, 64)), 0)
    with pytest.raises(ValueError, match="qweight has shape"):
        lib().int_dequantize(view(q[:, :4].contiguous()), view(s), view(z), 4, 32, view(torch.empty(24, 64)), 0)


# ---- the two paths: crossover, eager entry vs the registered ops --------------------------------------
def test_kernel_path_crossover(monkeypatch):
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    assert L.kernel_path("nf4", 1, torch.device("cpu")) == ("fused" if pyllmops.build_info().get("emulated")
                                                            else "workspace")
    assert L.kernel_path("int", L.CROSSOVER_CUDA - 1, CUDA) == "fused"
    assert L.kernel_path("int", L.CROSSOVER_CUDA, CUDA) == "workspace"
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fast")
    with pytest.raises(ValueError, match="PYLLMOPS_LORA_PATH must be one of"):
        L.kernel_path("dense", 4, "cpu")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["lora", "qlora", "qalora"])
def test_across_crossover(device, kind, monkeypatch):
    """The automatic choice on both sides of the CUDA crossover (63 and 64 rows), against float64."""
    from pyllmops.ops import lora as L

    monkeypatch.delenv("PYLLMOPS_LORA_PATH", raising=False)
    wf = torch.randn(40, 128, device=device) / 11
    a_cols = 4 if kind == "qalora" else 128
    for rows in (L.CROSSOVER_CUDA - 1, L.CROSSOVER_CUDA):
        x = torch.randn(rows, 128, device=device)
        a, b = _adapter(8, a_cols, 40, torch.float32, device)
        if kind == "lora":
            fn, ref = (lambda x, a, b: pyllmops.lora_linear(x, wf, a, b, 1.5)), \
                (lambda x, a, b: R.lora_linear(x, wf, a, b, 1.5))
        elif kind == "qlora":
            packed, state = pyllmops.quantize_nf4(wf, 64, True)
            fn, ref = (lambda x, a, b: pyllmops.qlora_linear(x, packed, state, a, b, 1.5)), \
                (lambda x, a, b: R.qlora_linear(x, packed, state, a, b, 1.5))
        else:
            q, s, z = pyllmops.quantize_int(wf, 4, 32)
            fn, ref = (lambda x, a, b: pyllmops.qalora_linear(x, q, s, z, a, b, 1.5, bits=4, group_size=32)), \
                (lambda x, a, b: R.qalora_linear(x, q, s, z, a, b, 1.5, 4, 32))
        _check_fwd_bwd(fn, ref, x, [a, b], torch.float32, f"{kind} rows={rows}")


@pytest.mark.parametrize("path", PATHS)
def test_eager_entry_matches_registered_ops(path, monkeypatch):
    """The public functions call an autograd.Function in eager mode and the registered ops under
    torch.compile; both give the same output and gradients."""
    from pyllmops.ops import lora as L

    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    x = torch.randn(3, 5, 96)
    q, s, z = pyllmops.quantize_int(torch.randn(24, 96) / 10, 3, 32)
    a, b = _adapter(4, 3, 24, torch.float32, "cpu")
    bias = torch.randn(24)
    outs = []
    for eager in (True, False):
        monkeypatch.setattr(L, "plain_eager", lambda x, eager=eager: eager)
        xs, as_, bs, bis = _leaf(x), _leaf(a), _leaf(b), _leaf(bias)
        y = pyllmops.qalora_linear(xs, q, s, z, as_, bs, 0.7, bits=3, group_size=32, bias=bis)
        y.backward(torch.ones_like(y))
        outs.append([y, xs.grad, as_.grad, bs.grad, bis.grad])
    for u, v in zip(*outs):
        assert_close(u, v, 1e-6, "eager vs registered")


# ---- issue 15: bad scalings, non-finite weights, empty in_features ---------------------------------------
def test_scaling_must_fit_float32():
    """1e39 passed a Python isfinite check, overflowed to inf in the kernels' float32, and inf * (B = 0)
    made the whole output NaN. Now it is refused, in Python and again in C++."""
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    a, b = torch.randn(8, 64), torch.zeros(32, 8)
    for bad in (1e39, -1e39, float("inf"), float("nan"), 10 ** 400):
        with pytest.raises(ValueError, match=r"scaling must be a finite float whose float32 cast is finite"):
            pyllmops.lora_linear(x, w, a, b, bad)
    # FLT_MAX itself, and the largest double that still rounds to it, are fine: B = 0 gives the base layer
    for ok in (3.4028234663852886e38, 3.4028235677973362e38):
        assert_close(pyllmops.lora_linear(x, w, a, b, ok), x.double() @ w.double().T, 1e-6, "huge scaling")
    packed, state = pyllmops.quantize_nf4(w, 64)
    with pytest.raises(ValueError, match="scaling must be"):
        pyllmops.qlora_linear(x, packed, state, a, b, 1e39)
    q, s, z = pyllmops.quantize_int(w, 4, 32)
    with pytest.raises(ValueError, match="scaling must be"):
        pyllmops.qalora_linear(x, q, s, z, torch.randn(8, 2), b, 1e39, bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"scaling must be .* \(alpha=1e\+40 / r with r=8\), got 1.25e\+39"):
        LoRALinear(nn.Linear(64, 32), r=8, alpha=1e40)
    with pytest.raises(ValueError, match=r"scaling must be .* \(alpha=1e\+39 / sqrt\(r\) with r=4\), got 5e\+38"):
        LoRALinear(nn.Linear(64, 32), r=4, alpha=1e39, use_rslora=True)
    with pytest.raises(ValueError, match=r"scaling must be .* \(alpha=1e\+39 / r with r=1\)"):
        QALoRALinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32, r=1, alpha=1e39)
    with pytest.raises(ValueError, match=r"alpha must be a finite float, got inf"):
        LoRALinear(nn.Linear(64, 32), r=8, alpha=float("inf"))
    # what reaches the kernels is scaling: alpha 1e39 with r = 64 is a finite float32 1.5625e37
    layer = LoRALinear(nn.Linear(64, 32), r=64, alpha=1e39)
    assert torch.isfinite(layer(torch.randn(3, 64))).all()


def test_scaling_rechecked_in_cpp():
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    x, w, a, b = torch.randn(4, 64), torch.randn(24, 64), torch.randn(8, 64), torch.zeros(24, 8)
    out, t = torch.empty(4, 24), torch.empty(4, 8)
    with pytest.raises(ValueError, match="scaling must be finite after its cast to float32"):
        lib().lora_fused_dense(view(x), None, None, view(w), False, None, view(a), view(b), 1e39, view(out),
                               view(t), None, None, False, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_int_refuses_non_finite(bad):
    w = torch.randn(6, 64)
    w[2, 37] = bad
    w[4, 1] = bad
    with pytest.raises(ValueError, match=r"w must be finite to be quantized, got (nan|inf|-inf) at index \(2, 37\) "
                                         r"\(the first of 2 non-finite elements\)"):
        pyllmops.quantize_int(w, 4, 32)
    with pytest.raises(ValueError, match="dtype"):
        pyllmops.quantize_int(w.long(), 4, 32)


def test_quantize_int_rechecked_in_cpp():
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    w = torch.randn(6, 64)
    w[3, 5] = float("nan")
    q, s, z = torch.zeros(6, 8, dtype=torch.int32), torch.zeros(6, 2), torch.zeros(6, 2)
    with pytest.raises(ValueError, match=r"w must be finite to be quantized, got nan at index \(3, 5\)"):
        lib().int_quantize(view(w), 4, 32, view(q), view(s), view(z), 0)
    assert not q.any() and not s.any()  # refused before anything was written


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", devices())
def test_zero_in_features(device, path, monkeypatch):
    """in_features 0 failed inside a reshape; the result is the bias (no features contribute)."""
    monkeypatch.setenv("PYLLMOPS_LORA_PATH", path)
    x = torch.randn(5, 0, device=device, requires_grad=True)
    w = torch.randn(32, 0, device=device)
    a = torch.randn(8, 0, device=device, requires_grad=True)
    b = torch.randn(32, 8, device=device, requires_grad=True)
    bias = torch.randn(32, device=device)
    y = pyllmops.lora_linear(x, w, a, b, 2.0, bias)
    assert torch.equal(y, bias.expand(5, 32))
    y.sum().backward()
    assert x.grad.shape == (5, 0) and a.grad.shape == (8, 0)
    assert torch.equal(b.grad, torch.zeros_like(b))
    q, s, z = (torch.zeros(32, 0, dtype=torch.int32, device=device), torch.ones(32, 0, device=device),
               torch.zeros(32, 0, device=device))
    y = pyllmops.qalora_linear(x.detach(), q, s, z, torch.randn(8, 0, device=device), b.detach(), 2.0, bits=4,
                               group_size=32)
    assert torch.equal(y, torch.zeros(5, 32, device=device))


# ---- the shared benchmark harness ---------------------------------------------------------------------
def test_harness_ratios_ceilings_noise(tmp_path):
    import json

    from pyllmops.bench.harness import Bench

    times = iter([(2.0, 1.9, 2.1), (1.0, 0.5, 0.9), (1.0, 0.98, 1.02)])
    bench = Bench("demo", "cpu", timer=lambda fn: next(times), progress=False)
    bench._ceilings = {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul": "fake"}
    peer = bench.measure("k", "peer", "fwd", "x1", lambda: None, bytes=1e7, flops=1e9, baseline=True)
    ours = bench.measure("k", "ours", "fwd", "x1", lambda: None, bytes=1e7, flops=1e9)
    fast = bench.measure("k", "cached", "fwd", "x1", lambda: None, bytes=1e8)
    # ideal times: memory 1e7 / 1e10 = 1 ms, compute 1e9 / 1e12 = 1 ms: bound by the larger (tie: memory)
    assert peer["bound"] in ("memory", "compute") and peer["pct_of_ceiling"] == pytest.approx(50.0)
    assert ours["pct_of_ceiling"] == pytest.approx(100.0) and not peer["noisy"]
    assert ours["noisy"]  # p80 / p20 = 1.8 > 1.5
    assert fast["above_ceiling"] and fast["pct_of_ceiling"] is None  # 10 ms of copying in 1 ms: cached
    out = bench.write(tmp_path)
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["vs_baseline"] for r in rows] == [pytest.approx(1.0), pytest.approx(2.0), pytest.approx(2.0)]
    md = (out / "demo.md").read_text()
    assert "> 1 is faster" in md and "| 2.00x | noisy |" in md and ">ceil" in md
    assert all(r["pct_of_ceiling"] is None or r["pct_of_ceiling"] <= 100 for r in rows)


def test_harness_ceilings_ignore_the_rows_timer():
    """A family that times its providers itself hands the harness a timer returning the case's time (bench
    attention does); the ceilings are measured on the device all the same (they once came out as 130 GB/s and
    4 TFLOP/s on the 2-core CPU: the 256 MB copy and the 2048^3 matmul 'took' a case's time)."""
    from pyllmops.bench.harness import Bench

    def rows_timer(fn):
        raise AssertionError("the ceilings went through the rows' timer")

    c = Bench("demo", "cpu", quick=True, timer=rows_timer, progress=False).ceilings()
    assert 0 < c["copy_gbps"] < 1e4 and 0 < c["matmul_tflops"] < 1e3


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("r", [128, 256])
def test_large_rank_decode_shapes(device, r, monkeypatch):
    """fp32 ranks above the SIMT CUDA kernel's 64 run at decode shapes too (the workspace path takes them)."""
    from pyllmops.ops import lora as L

    monkeypatch.setenv("PYLLMOPS_LORA_PATH", "fused")
    assert L.kernel_path("nf4", 3, CUDA, r) == "workspace" and L.kernel_path("nf4", 3, CUDA, 64) == "fused"
    wf = torch.randn(40, 96, device=device) / 10
    packed, state = pyllmops.quantize_nf4(wf, 64)
    x = torch.randn(3, 96, device=device)
    a, b = _adapter(r, 96, 40, torch.float32, device)
    _check_fwd_bwd(lambda x, a, b: pyllmops.qlora_linear(x, packed, state, a, b, 0.5),
                   lambda x, a, b: R.qlora_linear(x, packed, state, a, b, 0.5), x, [a, b], torch.float32,
                   f"qlora r={r}")


def test_harness_measure_together_alternates():
    from pyllmops.bench.harness import Bench

    order = []
    bench = Bench("demo", "cpu", quick=True, progress=False)
    bench._ceilings = {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul": "fake"}
    rows = bench.measure_together("k", "fwd", "x", [
        dict(provider="peer", fn=lambda: order.append("peer"), baseline=True),
        dict(provider="ours", fn=lambda: order.append("ours")),
        dict(provider="broken", fn=lambda: 1 / 0)])
    assert [r["provider"] for r in rows] == ["peer", "ours"] and "error" in bench.rows[0]
    timed = order[4:]  # after two warm-up calls each
    # rounds alternate, each starting one provider later, and end on a whole cycle: each position equally often
    assert timed[:6] == ["peer", "ours", "ours", "peer", "peer", "ours"] and len(timed) >= 10
    firsts = timed[0::2]
    assert len(timed) % 4 == 0 and firsts.count("peer") == firsts.count("ours")
    bench._finish()
    assert rows[0]["vs_baseline"] == 1.0 and rows[1]["vs_baseline"] > 0
