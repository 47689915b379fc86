"""NF4: kernels vs the reference (bit-exact where the format is defined bit for bit, float64 otherwise),
bitsandbytes byte-compatibility, NF4Linear, torch.library registration, bad inputs."""
import json

import pytest
import torch

import pyllmops
from pyllmops import reference as R
from pyllmops._ext import lib
from pyllmops.nn import NF4Linear
from pyllmops.ops import nf4 as nf4_ops
from pyllmops.ops._common import on_cuda, view
from conftest import EMULATED, GPU, assert_close, devices

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # pragma: no cover - bitsandbytes is in the test extra
    bnb = bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes not importable")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# awkward element counts: 1, odd, partial last blocks, several blocks, a 2-D and a 3-D tensor
SHAPES = [(1,), (2,), (17,), (63,), (4097,), (7, 5), (33, 129), (3, 17, 41)]


def _name(v):
    """Readable test ids: float16, 7x5."""
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "x".join(map(str, v))


def _weights(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(dtype).to(device)


# ---- quantize / dequantize vs the reference ------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_bit_exact_vs_reference(device, dtype, shape, blocksize):
    w = _weights(shape, dtype, device)
    packed, state = pyllmops.quantize_nf4(w, blocksize)
    ref_packed, ref_absmax = R.nf4.quantize_nf4(w.cpu(), blocksize)
    assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(state.absmax.cpu(), ref_absmax)
    assert state.shape == w.shape and state.dtype == dtype and state.blocksize == blocksize


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("blocksize", nf4_ops.BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_blocksize(device, blocksize, double_quant):
    w = _weights((5, 3001), torch.bfloat16, device)
    packed, state = pyllmops.quantize_nf4(w, blocksize, double_quant)
    ref_packed, _ = R.nf4.quantize_nf4(w.cpu(), blocksize)
    assert torch.equal(packed.cpu(), ref_packed)
    out = pyllmops.dequantize_nf4(packed, state)
    exact = R.nf4.dequantize_nf4(packed.cpu(), state.to("cpu"), torch.float32, out_dtype=torch.bfloat16)
    assert torch.equal(out.cpu(), exact)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bit_exact_and_accurate(device, dtype, out_dtype, shape, double_quant):
    w = _weights(shape, dtype, device, scale=0.05)
    packed, state = pyllmops.quantize_nf4(w, 64, double_quant)
    out = pyllmops.dequantize_nf4(packed, state, out_dtype)
    want_dtype = out_dtype or dtype
    assert out.shape == w.shape and out.dtype == want_dtype
    # the format fixes every value: code * absmax in fp32, rounded once
    exact = R.nf4.dequantize_nf4(packed.cpu(), state.to("cpu"), torch.float32, out_dtype=want_dtype)
    assert torch.equal(out.cpu(), exact)
    # and against float64 decoding, only the output rounding remains
    ref64 = R.nf4.dequantize_nf4(packed.cpu(), state.to("cpu"), torch.float64)
    tol = 1e-7 if want_dtype == torch.float32 else 4e-3
    assert_close(out.cpu(), ref64, tol, "dequantized")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_is_nf4_sized(device, double_quant):
    # NF4 of Gaussian weights keeps ~10% relative error (4 bits); a broken code or scale gives far more
    w = _weights((256, 512), torch.float32, device)
    packed, state = pyllmops.quantize_nf4(w, 64, double_quant)
    err = (pyllmops.dequantize_nf4(packed, state) - w).norm() / w.norm()
    assert 0.05 < err.item() < 0.12


@pytest.mark.parametrize("device", devices())
def test_nested_absmax(device):
    w = _weights((300, 257), torch.float16, device)
    packed, state = pyllmops.quantize_nf4(w, 64, double_quant=True)
    _, plain = pyllmops.quantize_nf4(w, 64)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert torch.equal(state.nested_code.cpu(), nf4_ops.dynamic_code())
    offset = plain.absmax.mean()
    assert torch.equal(state.nested_offset.cpu(), offset.cpu())
    rule = "bnb_cuda" if on_cuda(device) else "bnb_cpu"  # bitsandbytes' rule of the device (csrc/nf4/nf4.h)
    q, a2 = R.nf4.quantize_sorted_code((plain.absmax - offset).cpu(), nf4_ops.dynamic_code(), 256, rule)
    assert torch.equal(state.absmax.cpu(), q) and torch.equal(state.nested_absmax.cpu(), a2)
    decoded = R.nf4.block_scales(state.to("cpu"))
    assert_close(decoded, plain.absmax.cpu(), 5e-3, "decoded nested absmax")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_contiguous_inputs(device, double_quant):
    """Strided packed/absmax/x/bias are copied to contiguous temporaries that must outlive the kernel."""
    w = _weights((96, 128), torch.float32, device)
    packed, state = pyllmops.quantize_nf4(w, 64, double_quant)
    strided = (lambda t: torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0])
    packed_nc = strided(packed.view(-1)).view(-1, 1)
    state_nc = nf4_ops.replace(state, absmax=strided(state.absmax))
    assert not packed_nc.is_contiguous() and not state_nc.absmax.is_contiguous()
    want = pyllmops.dequantize_nf4(packed, state)
    for _ in range(3):  # freed temporaries would be reused by the next allocations
        assert torch.equal(pyllmops.dequantize_nf4(packed_nc, state_nc), want)
    x = _weights((4, 256), torch.float32, device)[:, ::2]
    bias = _weights((192,), torch.float32, device)[::2]
    assert torch.equal(pyllmops.nf4_linear(x, packed_nc, state_nc, bias),
                       pyllmops.nf4_linear(x.contiguous(), packed, state, bias.contiguous()))


def test_single_and_multi_thread_agree():
    w = _weights((64, 4096), torch.bfloat16, "cpu")
    x = _weights((8, 4096), torch.bfloat16, "cpu")
    results = []
    for n in (1, 2):
        lib().set_num_threads(n)
        try:
            packed, state = pyllmops.quantize_nf4(w, 64, True)
            results.append((packed, pyllmops.dequantize_nf4(packed, state), pyllmops.nf4_linear(x, packed, state)))
        finally:
            lib().set_num_threads(0)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- bitsandbytes compatibility -------------------------------------------------------------------
def test_dynamic_code_matches_bnb():
    if bnbF is None:
        pytest.skip("bitsandbytes not importable")
    assert torch.equal(nf4_ops.dynamic_code(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(nf4_ops.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES + [(256, 1024)], ids=_name)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024])
def test_bytes_equal_bnb(dtype, shape, blocksize):
    w = _weights(shape, dtype, "cpu")
    packed, state = pyllmops.quantize_nf4(w, blocksize)
    bp, bs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, bp)
    assert torch.equal(state.absmax, bs.absmax)
    bnb_out = bnbF.dequantize_4bit(bp, bs).reshape(shape)
    assert torch.equal(pyllmops.dequantize_nf4(packed, state), bnb_out)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("blocksize", nf4_ops.BLOCKSIZES)
def test_double_quant_bytes_equal_bnb(dtype, blocksize):
    """With double quant every byte equals bnb's on the CPU: the 4-bit codes, the offset, the nested absmax
    and the 8-bit codes of absmax (bnb's CPU rule: a 65536-point grid and a lookup table, csrc/nf4/nf4.h).
    The 257x129 fp32 tensor at blocksize 32 is issue 11's example (3 of 1037 codes differed)."""
    for shape in [(257, 129), (7, 5), (4097,), (300, 1024)]:
        w = _weights(shape, dtype, "cpu", scale=0.02)
        packed, state = pyllmops.quantize_nf4(w, blocksize, double_quant=True)
        bp, bs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert torch.equal(packed, bp), shape
        assert torch.equal(state.nested_offset, bs.offset), shape
        assert torch.equal(state.nested_absmax, bs.state2.absmax), shape
        assert torch.equal(state.absmax, bs.absmax), f"{(state.absmax != bs.absmax).sum()} codes differ, {shape}"
        assert torch.equal(state.nested_code, bs.state2.code)
        # bnb's nested state decodes identically through our kernel
        ours = pyllmops.dequantize_nf4(bp, pyllmops.NF4State.from_bnb_dict(bs.as_dict(packed=True)))
        assert torch.equal(ours, pyllmops.dequantize_nf4(packed, state))


def _rounding_edge_cases(code):
    """Scaled values where rounding rules disagree: each fp32 midpoint of the code and its neighbours,
    and the points either side of each boundary of bnb's CPU grid; one block per 255 values, led by 1.0 so
    the block's absmax is 1 and each value is its own scaled value."""
    mids = (code[:-1] + code[1:]) * 0.5
    vals = [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))]
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    lut = (grid.unsqueeze(-1) > mids).sum(-1)
    edges = (lut[1:] != lut[:-1]).nonzero().flatten()
    at = ((edges.float() + 1.0) / 32767.5 - 1.0).float()  # where the grid index steps to edge + 1
    for d in range(-3, 4):
        v = at
        for _ in range(abs(d)):
            v = torch.nextafter(v, torch.tensor(2.0 if d > 0 else -2.0))
        vals.append(v)
    flat = torch.cat(vals).clamp(-1, 1)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 255)).view(-1, 255)
    return torch.cat([torch.ones(flat.shape[0], 1), flat], dim=1).reshape(-1)


@pytest.mark.parametrize("device", devices())
def test_nested_rounding_rule_edge_cases(device):
    """The 8-bit quantizer follows bnb's rule of the device exactly where rules differ: values on fp32
    midpoints (CUDA: ties to the even index) and either side of the CPU grid's steps; an all-zero block is
    code 0 (both). On the CPU also against bitsandbytes itself."""
    code = nf4_ops.dynamic_code()
    x = torch.cat([_rounding_edge_cases(code), torch.zeros(256), torch.randn(1000)])
    q, absmax = torch.ops.pyllmops.nf4_quantize_sorted_code(x.to(device), code.to(device), 256)
    rule = "bnb_cuda" if on_cuda(device) else "bnb_cpu"
    want_q, want_absmax = R.nf4.quantize_sorted_code(x, code, 256, rule)
    assert torch.equal(absmax.cpu(), want_absmax)
    assert torch.equal(q.cpu(), want_q), f"{(q.cpu() != want_q).sum()} of {q.numel()} codes differ"
    other = R.nf4.quantize_sorted_code(x, code, 256, "bnb_cpu" if rule == "bnb_cuda" else "bnb_cuda")[0]
    assert not torch.equal(other, want_q), "the edge cases must tell the two rules apart"
    if bnbF is not None and not on_cuda(device):
        bq, babsmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, 256)
        assert torch.equal(bq, q) and torch.equal(babsmax, absmax)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_dict_round_trip(double_quant, dtype):
    w = _weights((33, 70), dtype, "cpu")
    bp, bs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    bnb_dict = bs.as_dict(packed=True)
    state = pyllmops.NF4State.from_bnb_dict(bnb_dict)
    ours = state.as_bnb_dict()
    assert ours.keys() == bnb_dict.keys()
    for k in bnb_dict:
        assert ours[k].dtype == bnb_dict[k].dtype and torch.equal(ours[k], bnb_dict[k]), k
    # ours -> bnb: bnb reads our dict and decodes our bytes like we do
    packed, own = pyllmops.quantize_nf4(w, 64, double_quant)
    back = bnb.functional.QuantState.from_dict(own.as_bnb_dict(), device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(packed, back).reshape(w.shape), pyllmops.dequantize_nf4(packed, own))
    # the packed=False form and prefixed keys (as in a Linear4bit state dict) read too
    plain = pyllmops.NF4State.from_bnb_dict(bs.as_dict(packed=False))
    prefixed = pyllmops.NF4State.from_bnb_dict({"weight." + k: v for k, v in bnb_dict.items()})
    for s in (plain, prefixed):
        assert torch.equal(pyllmops.dequantize_nf4(bp, s), pyllmops.dequantize_nf4(bp, state))


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_loads_bnb_linear4bit_state_dict(double_quant):
    lin = torch.nn.Linear(96, 40)
    bp, bs = bnbF.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4",
                                compress_statistics=double_quant)
    # exactly the keys Linear4bit._save_to_state_dict writes
    sd = {"weight": bp, "bias": lin.bias.detach()}
    sd.update({"weight." + k: v for k, v in bs.as_dict(packed=True).items()})
    layer = NF4Linear(96, 40, blocksize=32, double_quant=not double_quant)  # another blocksize and format
    layer.load_state_dict(sd)
    assert layer.quant_state.blocksize == 64 and layer.quant_state.nested == double_quant
    x = torch.randn(3, 96)
    # decoded from bnb's bytes and scales by the format's definition (bnb 0.50's CPU dequantize_4bit is
    # itself wrong when a row is not a multiple of the blocksize, as here: 96 = 1.5 blocks)
    w_bnb = R.nf4.dequantize_nf4(bp, pyllmops.NF4State.from_bnb_dict(bs.as_dict(packed=True)), torch.float64)
    assert_close(layer(x), torch.nn.functional.linear(x.double(), w_bnb, lin.bias.double()), 1e-5)
    # and our state dict has the same keys, dtypes and shapes as bnb's
    ours = layer.state_dict()
    assert ours.keys() == sd.keys()
    for k in sd:
        assert ours[k].dtype == sd[k].dtype and ours[k].shape == sd[k].shape, k


# ---- fused linear ---------------------------------------------------------------------------------
LINEAR_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("lead", [(1,), (3,), (8,), (2, 4), (9,), (5, 7)])  # both sides of the crossover
@pytest.mark.parametrize("in_out", [(256, 96), (100, 33), (33, 7), (4096, 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_forward(device, dtype, lead, in_out, double_quant):
    k, n = in_out
    w = _weights((n, k), dtype, device, scale=k ** -0.5)
    packed, state = pyllmops.quantize_nf4(w, 64, double_quant)
    x = _weights((*lead, k), dtype, device)
    bias = _weights((n,), dtype, device)
    for b in (None, bias):
        y = pyllmops.nf4_linear(x, packed, state, b)
        assert y.shape == (*lead, n) and y.dtype == dtype
        ref = R.nf4.nf4_linear(x.cpu(), packed.cpu(), state.to("cpu"), None if b is None else b.cpu())
        assert_close(y.cpu(), ref, LINEAR_TOL[dtype])


# The CUDA tensor-core skinny kernel (fp16 / bf16 x, 1..16 rows): shapes chosen for its paths. (k, n, blocksize,
# double_quant): 1152 = 9 segments of 128 k -> 2 split-k CTAs (5 and 4 segments: the unrolled step's tail), n = 67 ->
# two CTAs of 64 rows, the second with 3; 96 with blocksize 32 -> 32-k loads (3 of a segment's 4 live), 33 rows.
SKINNY_SHAPES = [(1152, 67, 128, True), (96, 33, 32, False)]


def _skinny_case(device, dtype, m, k, n, blocksize, double_quant, bias=True):
    w = _weights((n, k), torch.float32, device, scale=k ** -0.5)
    packed, state = pyllmops.quantize_nf4(w, blocksize, double_quant)
    x = _weights((m, k), dtype, device)
    b = _weights((n,), dtype, device) if bias else None
    y = pyllmops.nf4_linear(x, packed, state, b)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = R.nf4.nf4_linear(x.cpu(), packed.cpu(), state.to("cpu"), None if b is None else b.cpu())
    assert_close(y.cpu(), ref, LINEAR_TOL[dtype])
    return x, packed, state, y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("m", range(1, 17))
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}bs{s[2]}{'nested' if s[3] else ''}")
def test_skinny_every_row_count(device, dtype, m, shape):
    """Every row count of the fused kernel (1..16: one and two n8 tiles of tokens) against float64."""
    assert nf4_ops.fused_max_rows(dtype, on_cuda(device)) >= 8
    _skinny_case(device, dtype, m, *shape, bias=m % 2 == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("m", [3, 11])
def test_skinny_every_blocksize(device, blocksize, double_quant, m):
    """Blocksizes 64..4096 (64: 64-k loads; larger blocks span rows at k = 1024, 4096 spans 4 rows), plain
    and nested, 2 split-k CTAs; fp16 for one row count, bf16 for the other."""
    _skinny_case(device, torch.float16 if m == 3 else torch.bfloat16, m, 1024, 40, blocksize, double_quant)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_skinny_nan_in_x_reaches_its_row_only(device, dtype):
    """NaN in a row of x makes that row of y NaN (as the float64 reference does) and leaves the others exact;
    rows of x padded inside an n8 tile never reach y."""
    k, n, m = 640, 70, 5
    w = _weights((n, k), torch.float32, device, scale=k ** -0.5)
    packed, state = pyllmops.quantize_nf4(w, 64, True)
    x = _weights((m, k), dtype, device)
    x[2, 17] = float("nan")
    y = pyllmops.nf4_linear(x, packed, state).cpu()
    assert torch.isnan(y[2]).all()
    keep = [0, 1, 3, 4]
    ref = R.nf4.nf4_linear(x.cpu()[keep], packed.cpu(), state.to("cpu"))
    assert_close(y[keep], ref, LINEAR_TOL[dtype])


def test_skinny_code_planes_are_the_rounded_codebook():
    """The register codebook of the CUDA kernel (code_planes in nf4_cuda.cu: byte planes of the 16 codes in
    fp16 / bf16) is NF4_CODE rounded to each dtype; the kernel tests would fail too, this names the cause."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).resolve().parents[1] / "csrc/nf4/nf4_cuda.cu").read_text()
    body = src[src.index("CodePlanes code_planes()"):]
    body = body[:body.index("\n}\n")]
    words = [int(v, 16) for v in re.findall(r"0x([0-9a-f]{8})u", body)]
    assert len(words) == 16
    for dtype, want in zip((torch.float16, torch.bfloat16), (words[0:8], words[8:16])):
        bits = nf4_ops.nf4_code().to(dtype).view(torch.int16).int() & 0xFFFF
        planes = [sum(((int(bits[4 * j + e]) >> sh) & 0xFF) << (8 * e) for e in range(4)) for sh in (0, 8)
                  for j in range(4)]  # the low-byte plane (4 words), then the high-byte plane
        assert planes == want, (dtype, [hex(v) for v in planes])


@pytest.mark.cuda
def test_skinny_cuda_direct_call_checks():
    """The C++ layer re-checks what the CUDA kernel relies on: rows per dtype and the split-k workspace."""
    if not (EMULATED or GPU):
        pytest.skip("needs the CUDA kernels (a GPU or the emulated build)")
    dev = "cpu" if EMULATED else "cuda"
    k, n = 2048, 8
    packed, state = pyllmops.quantize_nf4(_weights((n, k), torch.float32, dev), 64)
    scales = nf4_ops._scale_views(*state.kernel_args()[:4])
    x = _weights((17, k), torch.bfloat16, dev)
    with pytest.raises(ValueError, match="x must have 1..16 rows on cuda"):
        lib().nf4_skinny_matmul(view(x), view(packed), *scales, 64, 256, None,
                                view(torch.empty(17, n, dtype=torch.bfloat16, device=dev)), None, 0)
    x = x[:4].contiguous()
    y = torch.empty(4, n, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="needs a float32 workspace"):
        lib().nf4_skinny_matmul(view(x), view(packed), *scales, 64, 256, None, view(y), None, 0)
    with pytest.raises(ValueError, match="needs a float32 workspace"):
        lib().nf4_skinny_matmul(view(x), view(packed), *scales, 64, 256, None, view(y),
                                view(torch.empty(1, 4, n, device=dev)), 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2,), (4, 3)])
def test_nf4_linear_backward(device, dtype, lead):  # the dispatcher path (autograd)
    k, n = 130, 48
    w = _weights((n, k), dtype, device, scale=k ** -0.5)
    packed, state = pyllmops.quantize_nf4(w, 64, True)
    x = _weights((*lead, k), dtype, device).requires_grad_()
    bias = _weights((n,), dtype, device).requires_grad_()
    dy = _weights((*lead, n), dtype, device)
    pyllmops.nf4_linear(x, packed, state, bias).backward(dy)
    x64 = x.detach().cpu().double().requires_grad_()
    b64 = bias.detach().cpu().double().requires_grad_()
    R.nf4.nf4_linear(x64, packed.cpu(), state.to("cpu"), b64).backward(dy.cpu().double())
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert_close(x.grad.cpu(), x64.grad, tol, "dx")
    assert_close(bias.grad.cpu(), b64.grad, tol, "dbias")


@pytest.mark.parametrize("rows", [9, 17, 35, 64])
@pytest.mark.parametrize("k", [4096, 1000, 33])
def test_cpu_fused_kernel_many_rows(rows, k):
    """The CPU fused kernel takes up to 64 rows (groups of 8, columns in chunks): direct calls above the
    crossover, against float64; 65 rows are refused."""
    n = 40
    w = _weights((n, k), torch.float32, "cpu", scale=k ** -0.5)
    packed, state = pyllmops.quantize_nf4(w, 64, True)
    x = _weights((rows, k), torch.float32, "cpu")
    bias = _weights((n,), torch.float32, "cpu")
    y = torch.full((rows, n), float("nan"))
    lib().nf4_skinny_matmul(view(x), view(packed), *nf4_ops._scale_views(*state.kernel_args()[:4]), 64, 256,
                            view(bias), view(y), None, 0)
    assert_close(y, R.nf4.nf4_linear(x, packed, state, bias), LINEAR_TOL[torch.float32])
    with pytest.raises(ValueError, match="x must have 1..64 rows on cpu, got 65"):
        lib().nf4_skinny_matmul(view(torch.randn(65, k)), view(packed), *nf4_ops._scale_views(*state.kernel_args()[:4]),
                                64, 256, None, view(torch.empty(65, n)), None, 0)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpu_simd_paths_agree_with_reference(isa, monkeypatch):
    """Each SIMD path (forced with PYLLMOPS_NF4_ISA; one the CPU lacks falls back to the best it has) is
    bit-exact on dequantize and accurate on the fused matmul, for every output dtype and odd shapes."""
    monkeypatch.setenv("PYLLMOPS_NF4_ISA", isa)
    for dtype in DTYPES:
        for shape in [(33, 129), (4097,), (64, 100)]:
            w = _weights(shape, dtype, "cpu", scale=0.05)
            packed, state = pyllmops.quantize_nf4(w, 32, True)
            out = pyllmops.dequantize_nf4(packed, state)
            assert torch.equal(out, R.nf4.dequantize_nf4(packed, state, torch.float32, out_dtype=dtype))
        w = _weights((48, 999), dtype, "cpu", scale=0.03)
        packed, state = pyllmops.quantize_nf4(w, 64)
        x = _weights((5, 999), dtype, "cpu")
        assert_close(pyllmops.nf4_linear(x, packed, state), R.nf4.nf4_linear(x, packed, state), LINEAR_TOL[dtype])
    monkeypatch.setenv("PYLLMOPS_NF4_ISA", "avx1024")
    with pytest.raises(ValueError, match="PYLLMOPS_NF4_ISA must be scalar, avx2 or avx512"):
        pyllmops.dequantize_nf4(packed, state)


# ---- NF4Linear ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_nf4linear_module(device):
    lin = torch.nn.Linear(192, 80).to(device)
    layer = NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    x = torch.randn(2, 5, 192, device=device, requires_grad=True)
    y = layer(x)
    w = R.nf4.dequantize_nf4(layer.weight.cpu(), layer.quant_state.to("cpu"), torch.float64).to(device)
    ref = torch.nn.functional.linear(x.detach().double(), w, lin.bias.detach().double())
    assert_close(y, ref, 2e-5)
    y.sum().backward()
    assert_close(x.grad, torch.ones(2, 5, 80, dtype=torch.float64, device=device) @ w, 2e-5, "dx")
    assert layer.bias.grad is not None and layer.weight.grad is None
    # state dict round trip into a fresh layer with another format; another shape is refused
    fresh = NF4Linear(192, 80, blocksize=128, double_quant=False, device=device)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    with pytest.raises(RuntimeError, match="shape \\(80, 192\\) does not match"):
        NF4Linear(16, 16).load_state_dict(layer.state_dict())
    # dtype casts leave the quant state alone; the forward follows x's dtype
    layer.half()
    assert layer.quant_state.nested_absmax.dtype == torch.float32
    assert layer(x.detach().half()).dtype == torch.float16
    assert "blocksize=64" in repr(layer)


def test_nf4linear_init_and_errors():
    layer = NF4Linear(64, 32, bias=False, blocksize=32)
    assert layer(torch.randn(3, 64)).shape == (3, 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(torch.nn.Conv1d(1, 1, 1))
    bad = layer.state_dict()
    del bad["weight.absmax"]
    with pytest.raises(RuntimeError, match="absmax"):
        NF4Linear(64, 32, bias=False).load_state_dict(bad)


# ---- torch.library: opcheck, fake tensors, torch.compile -----------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck(double_quant):
    w = torch.randn(48, 80)
    packed, state = pyllmops.quantize_nf4(w, 32, double_quant)
    a = state.kernel_args()
    torch.library.opcheck(torch.ops.pyllmops.nf4_quantize.default, (w, 64))
    torch.library.opcheck(torch.ops.pyllmops.nf4_quantize_sorted_code.default,
                          (torch.randn(1000), nf4_ops.dynamic_code(), 256))
    torch.library.opcheck(torch.ops.pyllmops.nf4_dequantize.default, (packed, *a, w.numel(), torch.bfloat16))
    for rows in (3, 20):  # fused and dequantize paths
        x = torch.randn(rows, 80, requires_grad=True)
        bias = torch.randn(48, requires_grad=True)
        torch.library.opcheck(torch.ops.pyllmops.nf4_linear.default, (x, packed, *a[:4], bias, a[4], a[5], 48))


def test_meta_tensors():
    w = torch.empty(100, 64, device="meta", dtype=torch.bfloat16)
    packed, absmax = torch.ops.pyllmops.nf4_quantize(w, 64)
    assert packed.shape == (3200, 1) and absmax.shape == (100,) and packed.device.type == "meta"


def test_torch_compile_nf4linear():
    layer = NF4Linear(64, 24)
    x = torch.randn(4, 64, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, eager)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- bad inputs: Python first, C++ re-checks --------------------------------------------------------
def test_bad_inputs_python():
    w = torch.randn(64, 64)
    packed, state = pyllmops.quantize_nf4(w)
    with pytest.raises(ValueError, match="w must have dtype"):
        pyllmops.quantize_nf4(torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        pyllmops.quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="blocksize must be one of .* got 48"):
        pyllmops.quantize_nf4(w, 48)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        pyllmops.quantize_nf4(w, 64.0)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        pyllmops.quantize_nf4(w, 64, 1)
    with pytest.raises(ValueError, match="must not be empty"):
        pyllmops.quantize_nf4(torch.empty(0))
    with pytest.raises(ValueError, match="packed has 100 bytes, expected 2048"):
        pyllmops.dequantize_nf4(packed[:100], state)
    with pytest.raises(ValueError, match="packed must have dtype"):
        pyllmops.dequantize_nf4(packed.float(), state)
    with pytest.raises(TypeError, match="state must be an NF4State"):
        pyllmops.dequantize_nf4(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="out_dtype"):
        pyllmops.dequantize_nf4(packed, state, torch.int8)
    with pytest.raises(ValueError, match="state.absmax has 3 entries, expected 64"):
        pyllmops.dequantize_nf4(packed, nf4_ops.replace(state, absmax=state.absmax[:3]))
    with pytest.raises(ValueError, match="x has 63 features .* expected in_features=64"):
        pyllmops.nf4_linear(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match="bias has 3 elements, expected out_features=64"):
        pyllmops.nf4_linear(torch.randn(2, 64), packed, state, torch.randn(3))
    with pytest.raises(ValueError, match="bias must have dtype in \\(float32\\), got bfloat16"):
        pyllmops.nf4_linear(torch.randn(2, 64), packed, state, torch.randn(64, dtype=torch.bfloat16))
    p1, s1 = pyllmops.quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="must be 2-D"):
        pyllmops.nf4_linear(torch.randn(2, 64), p1, s1)
    fp4 = dict(state.as_bnb_dict())
    blob = json.loads(bytes(fp4.pop("quant_state.bitsandbytes__nf4").tolist()))
    blob["quant_type"] = "fp4"
    fp4["quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp4 is not supported"):
        pyllmops.NF4State.from_bnb_dict(fp4)


def test_bad_inputs_cpp_layer():
    """_C checks every view itself: direct calls with bad arguments raise, never crash."""
    C = lib()
    w = torch.randn(100)
    packed = torch.empty(50, dtype=torch.uint8)
    absmax = torch.empty(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        C.nf4_quantize(view(w), 48, view(packed), view(absmax), 0)
    with pytest.raises(ValueError, match="packed has 10 elements, expected at least 50"):
        C.nf4_quantize(view(w), 64, view(packed[:10]), view(absmax), 0)
    with pytest.raises(ValueError, match="absmax must be float32, got float16"):
        C.nf4_quantize(view(w), 64, view(packed), view(absmax.half()), 0)
    with pytest.raises(ValueError, match="w must be contiguous"):
        C.nf4_quantize(view(torch.randn(10, 20).t()), 64, view(torch.empty(100, dtype=torch.uint8)),
                       view(torch.empty(4)), 0)
    out = torch.empty(100)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and nested_offset must be given together"):
        C.nf4_dequantize(view(packed), view(absmax), view(absmax), None, None, 64, 256, view(out), 0)
    with pytest.raises(ValueError, match="x must have 1..64 rows on cpu, got 65"):
        C.nf4_skinny_matmul(view(torch.randn(65, 10)), view(packed), view(absmax), None, None, None, 64, 256, None,
                            view(torch.empty(65, 10)), None, 0)
    with pytest.raises(TypeError):
        C.nf4_dequantize("not a view", view(absmax), None, None, None, 64, 256, view(out), 0)


# ---- the harness itself -----------------------------------------------------------------------------
def test_poison_is_active():
    from pyllmops.ops._common import empty

    assert torch.isnan(empty((4,), torch.float32, "cpu")).all()
    assert (empty((4,), torch.uint8, "cpu") == 0xA5).all()


def test_bench_nf4_writes_results(tmp_path):
    from pyllmops.bench import nf4 as bench_nf4
    from pyllmops.bench.harness import Bench

    bench = Bench("nf4", "cpu", quick=True, timer=lambda fn: (1.0, 0.9, 1.1))
    bench_nf4.run(bench)
    out = bench.write(tmp_path)
    data = json.loads((out / "nf4.json").read_text())
    assert data["meta"]["device"].startswith("cpu") and data["rows"]
    kinds = {(r["kernel"], r["provider"]) for r in data["rows"]}
    assert ("dequantize", "pyllmops") in kinds and ("linear", "pyllmops nf4_linear") in kinds
    assert "| dequantize |" in (out / "nf4.md").read_text()


# ---- issue 15: non-finite weights, strided metadata, corrupt bnb dicts, sizes -----------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_refuses_non_finite(device, bad, double_quant):
    w = _weights((12, 128), torch.bfloat16, device)
    w[3, 5] = bad
    w[7, 1] = bad
    with pytest.raises(ValueError, match=rf"w must be finite, but w\[3, 5\] is {bad} .*at index \[3, 5\]"):
        pyllmops.quantize_nf4(w, 64, double_quant)


def test_quantize_refuses_huge_statistics_for_double_quant():
    w = torch.full((4, 64), 3e38)
    w[0] = -3e38
    with pytest.raises(ValueError, match="double_quant needs the mean of the block absmax"):
        pyllmops.quantize_nf4(w, 64, double_quant=True)
    packed, state = pyllmops.quantize_nf4(w, 64)  # plain absmax is fine
    assert torch.equal(pyllmops.dequantize_nf4(packed, state), w)


def test_cpp_quantizers_refuse_non_finite():
    """Direct _C calls (no Python check) name the first non-finite element too."""
    C = lib()
    w = torch.randn(300)
    w[201], w[77] = float("inf"), float("nan")
    packed, absmax = torch.empty(150, dtype=torch.uint8), torch.empty(5)
    with pytest.raises(ValueError, match="w must be finite, but element 77 \\(flattened index\\) is nan"):
        C.nf4_quantize(view(w), 64, view(packed), view(absmax), 0)
    q = torch.empty(300, dtype=torch.uint8)
    with pytest.raises(ValueError, match="x must be finite, but element 77"):
        C.nf4_quantize_sorted_code(view(w), view(nf4_ops.dynamic_code()), 256, view(q), view(torch.empty(2)), 0)


@pytest.mark.parametrize("device", devices())
def test_strided_nested_metadata_is_accepted(device):
    w = _weights((40, 256), torch.float32, device)
    packed, state = pyllmops.quantize_nf4(w, 32, double_quant=True)
    strided = (lambda t: torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0])
    odd = nf4_ops.replace(state, nested_absmax=strided(state.nested_absmax), nested_code=strided(state.nested_code),
                          nested_offset=state.nested_offset.expand(3)[1])
    assert not odd.nested_absmax.is_contiguous() and not odd.nested_code.is_contiguous()
    want = pyllmops.dequantize_nf4(packed, state)
    assert torch.equal(pyllmops.dequantize_nf4(packed, odd), want)
    x = _weights((3, 256), torch.float32, device)
    assert torch.equal(pyllmops.nf4_linear(x, packed, odd), pyllmops.nf4_linear(x, packed, state))


def _bnb_like_dict(nested=True):
    w = torch.randn(33, 70)
    _, state = pyllmops.quantize_nf4(w, 64, nested)
    d = state.as_bnb_dict()
    key = "quant_state.bitsandbytes__nf4"
    return d, key, json.loads(bytes(d[key].tolist()))


def _with_meta(d, key, meta):
    return {**d, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def test_from_bnb_dict_corrupt_fields_raise_value_errors():
    d, key, meta = _bnb_like_dict()
    assert pyllmops.NF4State.from_bnb_dict(d).nested
    cases = [
        ({**d, key: torch.tensor([0xFF, 0xFE, 0x80], dtype=torch.uint8)}, "does not hold UTF-8 JSON"),
        ({**d, key: torch.tensor(list(b"{not json"), dtype=torch.uint8)}, "does not hold UTF-8 JSON"),
        ({**d, key: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}, "must hold a JSON object, got list"),
        ({**d, key: torch.ones(4)}, "must be a 1-D uint8 tensor"),
        ({**d, key: "blob"}, "must be a 1-D uint8 tensor .* got a str"),
        (_with_meta(d, key, {**meta, "dtype": "float64x"}), "dtype must be one of float32, float16, bfloat16"),
        (_with_meta(d, key, {**meta, "dtype": 3}), "dtype must be a dtype name"),
        (_with_meta(d, key, {**meta, "blocksize": "64"}), "blocksize must be an int, got '64'"),
        (_with_meta(d, key, {**meta, "blocksize": 48}), "blocksize must be one of"),
        (_with_meta(d, key, {**meta, "shape": [-1, 70]}), "shape must be a sequence of non-negative ints"),
        (_with_meta(d, key, {**meta, "shape": "33x70"}), "shape must be a sequence of non-negative ints"),
        (_with_meta(d, key, {**meta, "shape": [0, 70]}), "shape must describe 1..2\\*\\*62 elements"),
        (_with_meta(d, key, {**meta, "shape": [2 ** 40, 2 ** 40]}), "shape must describe 1..2\\*\\*62 elements"),
        (_with_meta(d, key, {**meta, "nested_offset": "abc"}), "nested_offset must be a finite number"),
        (_with_meta(d, key, {**meta, "nested_offset": float("nan")}), "nested_offset must be a finite number"),
        (_with_meta(d, key, {**meta, "nested_blocksize": None}), "nested_blocksize must be an int"),
        ({k: v for k, v in d.items() if k != "nested_quant_map"}, "needs .*nested_quant_map.* got only"),
        ({**d, "absmax": [1.0, 2.0]}, "absmax must be a torch.Tensor, got list"),
        ({**d, "nested_absmax": 3}, "nested_absmax must be a torch.Tensor"),
        ({**d, "quant_map": "nf4"}, "quant_map must be a torch.Tensor"),
        ({**d, "quant_map": torch.zeros(3)}, "quant_map is not the NF4 codebook"),
        ({**d, "absmax": d["absmax"][:3]}, "state.absmax has 3 entries, expected 37"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            pyllmops.NF4State.from_bnb_dict(bad)
    with pytest.raises(TypeError, match="expects a dict"):
        pyllmops.NF4State.from_bnb_dict([1, 2])


def test_state_sizes_checked():
    packed, state = pyllmops.quantize_nf4(torch.randn(64))
    for shape, msg in [((0,), "1..2\\*\\*62 elements"), ((2 ** 31, 2 ** 31, 4), "1..2\\*\\*62 elements"),
                       ((8, -8), "non-negative ints")]:
        with pytest.raises(ValueError, match=msg):
            pyllmops.dequantize_nf4(packed, nf4_ops.replace(state, shape=shape))
