"""NF4 (QLoRA 4-bit NormalFloat), byte-compatible with bitsandbytes.

Ops (torch.ops.pyllmops.*), in the order: schema + kernel, fake, autograd:
  nf4_quantize(w, blocksize) -> (packed uint8 [ceil(n/2), 1], absmax fp32 [n_blocks])
  nf4_quantize_sorted_code(x, code, blocksize) -> (q uint8, absmax fp32)   # nested absmax
  nf4_dequantize(packed, absmax, nested..., blocksize, nested_blocksize, numel, dtype) -> flat tensor
  nf4_linear(x, packed, absmax, nested..., bias, blocksize, nested_blocksize, out_features) -> y
Public API: quantize_nf4, dequantize_nf4, nf4_linear, NF4State.

Format, exactly as bitsandbytes' quantize_4bit(quant_type="nf4"): see csrc/nf4/nf4.h.
"""
import functools
import json
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from pyllmops._ext import lib
from pyllmops.ops._common import (FLOAT_DTYPES, check_bias, check_bool, check_int, check_linear_input, check_tensor,
                                  empty, on_cuda, opt_view, stream, view)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
MAX_SKINNY_ROWS = 8  # csrc/nf4/nf4.h kMaxSkinnyRows: the CUDA fused kernel's limit for float32 x
MAX_SKINNY_ROWS_CUDA = 16  # kMaxSkinnyRowsCuda: the CUDA tensor-core kernel's limit (float16 / bfloat16 x)
MAX_SKINNY_K_CUDA = 2 ** 25  # kMaxSkinnyK: its in_features limit

# The 16 NF4 values (QLoRA appendix E), fp32 as bitsandbytes stores them in `quant_map`.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf4_code(device="cpu"):
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_code(device="cpu"):
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), the nested code.

    For exponent i = 0..6 the 2**i fractions are midpoints of linspace(0.1, 1, 2**i + 1), scaled by
    10**(i - 6), with both signs; plus 0 and 1: 256 sorted values in [-0.993, 1].
    """
    return _dynamic_code_cpu().to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu():
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


MAX_NUMEL = 2 ** 62  # every element count, byte count and block index below fits int64 with room to spare


def _check_shape(name, shape):
    """A tensor shape: non-negative ints with at least one element and at most MAX_NUMEL in all."""
    if not isinstance(shape, (tuple, list, torch.Size)) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"{name} must be a sequence of non-negative ints, got {shape!r}")
    numel = math.prod(shape)
    if not 1 <= numel <= MAX_NUMEL:
        raise ValueError(f"{name} must describe 1..2**62 elements, got {tuple(shape)} ({numel} elements)")


@dataclass
class NF4State:
    """How to decode an NF4-packed tensor: the per-block scales and what the tensor was.

    absmax: fp32 [n_blocks] per-block max |w|; or, when nested (double quantization), uint8
        [n_blocks] 8-bit codes of absmax - nested_offset into nested_code, scaled per 256 blocks by
        nested_absmax (fp32 [ceil(n_blocks / 256)]). nested_offset is a 0-d fp32 tensor.
    shape, dtype: the original tensor's; blocksize: elements per block.

    as_bnb_dict() / from_bnb_dict() write and read bitsandbytes' QuantState.as_dict(packed=True).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_type: str = "nf4"

    @property
    def nested(self):
        return self.nested_absmax is not None

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def n_blocks(self):
        return -(-self.numel // self.blocksize)

    @property
    def device(self):
        return self.absmax.device

    def to(self, device):
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, absmax=move(self.absmax), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code), nested_offset=move(self.nested_offset))

    def kernel_args(self):
        """(absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize) for the ops."""
        return (self.absmax, self.nested_absmax, self.nested_code, self.nested_offset, self.blocksize,
                self.nested_blocksize)

    def validate(self, packed=None):
        """Raises ValueError if the state is inconsistent (with itself, or with `packed`)."""
        if self.quant_type != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {self.quant_type!r} (fp4 is not supported)")
        check_int("state.blocksize", self.blocksize, choices=BLOCKSIZES)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        _check_shape("state.shape", self.shape)
        check_tensor("state.absmax", self.absmax)
        dev = self.absmax.device
        want = torch.uint8 if self.nested else torch.float32
        check_tensor("state.absmax", self.absmax, dtypes=(want,), dim=1)
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(f"state.absmax has {self.absmax.numel()} entries, expected {self.n_blocks} "
                             f"(ceil({self.numel} / blocksize {self.blocksize}))")
        parts = (self.nested_absmax, self.nested_code, self.nested_offset)
        if any(p is None for p in parts) != all(p is None for p in parts):
            raise ValueError("state.nested_absmax, nested_code and nested_offset must be given together")
        if self.nested:
            check_int("state.nested_blocksize", self.nested_blocksize, choices=BLOCKSIZES)
            n2 = -(-self.n_blocks // self.nested_blocksize)
            check_tensor("state.nested_absmax", self.nested_absmax, dtypes=(torch.float32,), dim=1, device=dev)
            if self.nested_absmax.numel() != n2:
                raise ValueError(f"state.nested_absmax has {self.nested_absmax.numel()} entries, expected {n2}")
            check_tensor("state.nested_code", self.nested_code, dtypes=(torch.float32,), dim=1, device=dev)
            if self.nested_code.numel() != 256:
                raise ValueError(f"state.nested_code must have 256 entries, got {self.nested_code.numel()}")
            check_tensor("state.nested_offset", self.nested_offset, dtypes=(torch.float32,), device=dev)
            if self.nested_offset.numel() != 1:
                raise ValueError(f"state.nested_offset must have 1 element, got {self.nested_offset.numel()}")
        if packed is not None:
            check_tensor("packed", packed, dtypes=(torch.uint8,), device=dev)
            if packed.numel() != (self.numel + 1) // 2:
                raise ValueError(f"packed has {packed.numel()} bytes, expected {(self.numel + 1) // 2} for a "
                                 f"tensor of shape {tuple(self.shape)}")

    # ---- bitsandbytes interop -----------------------------------------------------------------
    def as_bnb_dict(self):
        """bitsandbytes' QuantState.as_dict(packed=True): tensors plus a JSON blob of the rest."""
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        out = {"absmax": self.absmax, "quant_map": nf4_code(self.device)}
        if self.nested:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.nested_offset.item())
        blob = json.dumps(meta).encode("utf-8")
        out["quant_state.bitsandbytes__" + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_dict(cls, d, device=None):
        """Reads QuantState.as_dict(packed=True) (or packed=False) output; keys may carry a prefix
        such as 'weight.' as in a Linear4bit state dict. A malformed field raises ValueError naming it."""
        if not hasattr(d, "items"):
            raise TypeError(f"from_bnb_dict expects a dict of bitsandbytes quant-state entries, got {type(d).__name__}")
        flat, blob_key = {}, None
        for k, v in d.items():
            if not isinstance(k, str):
                raise ValueError(f"quant state keys must be strings, got {k!r}")
            if "quant_state." in k:
                if blob_key is not None:
                    raise ValueError(f"two packed quant_state entries: {blob_key!r} and {k!r}")
                blob_key = k
            else:
                flat[k.split(".")[-1]] = v
        if blob_key is not None:
            flat.update(_read_bnb_blob(blob_key, d[blob_key]))
        missing = [k for k in ("absmax", "quant_type", "blocksize", "dtype", "shape") if k not in flat]
        if missing:
            raise ValueError(f"not a bitsandbytes 4-bit quant state: missing {missing}; got keys {sorted(d)}")
        if flat["quant_type"] != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {flat['quant_type']!r} (fp4 is not supported)")
        qmap = flat.get("quant_map")
        if qmap is not None:
            _bnb_tensor("quant_map", qmap)
            if qmap.numel() != 16 or not torch.equal(qmap.detach().float().cpu().reshape(-1), nf4_code()):
                raise ValueError("quant_map is not the NF4 codebook")
        dtype = _bnb_dtype("dtype", flat["dtype"])
        shape = flat["shape"]
        if isinstance(shape, torch.Tensor):  # packed=False keeps a torch.Size, some writers a tensor
            shape = shape.tolist()
        _check_shape("shape", shape)
        absmax = _bnb_tensor("absmax", flat["absmax"])
        device = device if device is not None else absmax.device
        nested_keys = ("nested_absmax", "nested_quant_map", "nested_offset")
        present = [k for k in nested_keys if k in flat]
        if present and len(present) != len(nested_keys):
            raise ValueError(f"a nested (double-quant) state needs {list(nested_keys)}, got only {present}")
        nested = bool(present)
        if nested:
            offset = flat["nested_offset"]
            if isinstance(offset, torch.Tensor) and offset.numel() == 1:
                offset = offset.item()
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"nested_offset must be a finite number, got {offset!r}")
            nested_dtype = flat.get("nested_dtype", "float32")
            if _bnb_dtype("nested_dtype", nested_dtype) != torch.float32:
                raise ValueError(f"nested_dtype must be float32, got {nested_dtype!r}")
        state = cls(
            absmax=absmax.to(device),
            shape=torch.Size(shape),
            dtype=dtype,
            blocksize=_bnb_int("blocksize", flat["blocksize"]),
            nested_absmax=_bnb_tensor("nested_absmax", flat["nested_absmax"]).to(device, torch.float32)
            if nested else None,
            nested_code=_bnb_tensor("nested_quant_map", flat["nested_quant_map"]).to(device, torch.float32)
            if nested else None,
            nested_offset=torch.tensor(float(offset), dtype=torch.float32, device=device) if nested else None,
            nested_blocksize=_bnb_int("nested_blocksize", flat.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
        state.validate()
        return state


def _read_bnb_blob(key, blob):
    """The JSON blob of QuantState.as_dict(packed=True): uint8 bytes of a UTF-8 JSON object."""
    qtype = key.rsplit("bitsandbytes__", 1)[-1]
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        desc = (f"{blob.dtype} tensor of shape {tuple(blob.shape)}" if isinstance(blob, torch.Tensor)
                else type(blob).__name__)
        raise ValueError(f"{key} must be a 1-D uint8 tensor (UTF-8 JSON bytes), got a {desc}")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{key} does not hold UTF-8 JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("quant_type", qtype) != qtype:
        raise ValueError(f"quant_state key says {qtype!r} but its JSON says {meta['quant_type']!r}")
    return {"quant_type": qtype, **meta}


def _bnb_tensor(name, v):
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    return v


def _bnb_int(name, v):
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return v


def _bnb_dtype(name, v):
    if isinstance(v, torch.dtype):
        return v
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a dtype name such as 'bfloat16', got {v!r}")
    dtype = getattr(torch, v.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of float32, float16, bfloat16, got {v!r}")
    return dtype


# ================================ torch.library ops ================================
def _n_blocks(n, blocksize):
    return -(-n // blocksize)


@torch.library.custom_op("pyllmops::nf4_quantize", mutates_args=(), device_types=("cpu", "cuda"))
def _nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = w.contiguous().view(-1)
    n = flat.numel()
    packed = empty(((n + 1) // 2, 1), torch.uint8, w.device)
    absmax = empty((_n_blocks(n, blocksize),), torch.float32, w.device)
    lib().nf4_quantize(view(flat), blocksize, view(packed), view(absmax), stream(w))
    return packed, absmax


@_nf4_quantize.register_fake
def _(w, blocksize):
    n = w.numel()
    return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((_n_blocks(n, blocksize),),
                                                                         dtype=torch.float32)


@torch.library.custom_op("pyllmops::nf4_quantize_sorted_code", mutates_args=(), device_types=("cpu", "cuda"))
def _nf4_quantize_sorted_code(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    flat = x.contiguous().view(-1)
    q = empty(flat.shape, torch.uint8, x.device)
    absmax = empty((_n_blocks(flat.numel(), blocksize),), torch.float32, x.device)
    lib().nf4_quantize_sorted_code(view(flat), view(code.contiguous()), blocksize, view(q), view(absmax), stream(x))
    return q, absmax


@_nf4_quantize_sorted_code.register_fake
def _(x, code, blocksize):
    return (x.new_empty((x.numel(),), dtype=torch.uint8),
            x.new_empty((_n_blocks(x.numel(), blocksize),), dtype=torch.float32))


def _contiguous(t):
    return None if t is None else t.contiguous()


def _scale_views(absmax, nested_absmax, nested_code, nested_offset):
    """Views of the scale tensors; strided ones (valid in an NF4State) become contiguous temporaries that the
    views keep alive until the kernel returns."""
    return (view(absmax.contiguous()), opt_view(_contiguous(nested_absmax)), opt_view(_contiguous(nested_code)),
            opt_view(_contiguous(nested_offset)))


def _nf4_dequantize_impl(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor], blocksize: int,
                    nested_blocksize: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    out = empty((numel,), dtype, packed.device)
    lib().nf4_dequantize(view(packed.contiguous()), *_scale_views(absmax, nested_absmax, nested_code, nested_offset),
                         blocksize, nested_blocksize, view(out), stream(packed))
    return out


_nf4_dequantize = torch.library.custom_op("pyllmops::nf4_dequantize", mutates_args=(),
                                          device_types=("cpu", "cuda"))(_nf4_dequantize_impl)


@_nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


# Rows of x up to which nf4_linear runs the fused kernel; above, it dequantizes W to x's dtype once and
# calls torch's matmul (compute-bound there, the dequantize amortized over the rows). CPU values measured
# side by side (docs/nf4.md "Fused or dequantize + matmul"): float32 at 1024x4096, one core, fused vs
# dequantize+matmul: M=16 4.8 vs 5.6 ms, M=32 9.3 vs 6.9 ms; bfloat16 matmuls run on the CPU's bf16
# units, which moves the crossover down to 8. CUDA (a prediction, no GPU measurement yet): float16 /
# bfloat16 fuse up to the tensor-core kernel's limit of 16 rows, because the fused kernel reads 0.53 byte
# per weight where dequantize + matmul moves 4.5 (write and re-read 2-byte W), and its decode cost does not
# grow with the rows (docs/nf4.md); float32 fuses up to the SIMT kernel's 8 rows.
FUSED_MAX_ROWS_CPU = {torch.float32: 16, torch.float16: 16, torch.bfloat16: 8}
FUSED_MAX_ROWS_CUDA = {torch.float32: MAX_SKINNY_ROWS, torch.float16: MAX_SKINNY_ROWS_CUDA,
                       torch.bfloat16: MAX_SKINNY_ROWS_CUDA}


def fused_max_rows(dtype, cuda):
    """The crossover: nf4_linear fuses up to this many rows of x (of `dtype`, on CUDA or the CPU)."""
    return (FUSED_MAX_ROWS_CUDA if cuda else FUSED_MAX_ROWS_CPU)[dtype]


def _skinny_applies(x2, packed):
    """Few rows (the crossover above); on CUDA also in_features % 32 == 0 and 16-byte alignment."""
    m, k = x2.shape
    cuda = on_cuda(x2)
    if not 1 <= m <= fused_max_rows(x2.dtype, cuda):
        return False
    if cuda:
        return (k % 32 == 0 and x2.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0
                and (x2.dtype == torch.float32 or k <= MAX_SKINNY_K_CUDA))
    return True


def _skinny_workspace(x2, out_features):
    """The CUDA tensor-core kernel's split-k partial sums: ceil(k / 512) x m x n fp32 bounds what its plan
    (csrc/nf4/nf4_cuda.cu plan_skinny) uses; none for one split (k <= 512), the CPU or float32 x."""
    m, k = x2.shape
    if not on_cuda(x2) or x2.dtype == torch.float32 or k <= 512:
        return None
    return empty((-(-k // 512), m, out_features), torch.float32, x2.device)


def _nf4_linear_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
                out_features: int) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    if _skinny_applies(x2, packed):
        y = empty((x2.shape[0], out_features), x.dtype, x.device)
        lib().nf4_skinny_matmul(view(x2), view(packed.contiguous()),
                                *_scale_views(absmax, nested_absmax, nested_code, nested_offset), blocksize,
                                nested_blocksize, opt_view(_contiguous(bias)), view(y),
                                opt_view(_skinny_workspace(x2, out_features)), stream(x))
    else:
        # Many rows: the matmul is compute-bound and the dequantized weight (read once from L2 /
        # memory per GEMM) is amortized over the rows, as in bitsandbytes.
        w = _nf4_dequantize_impl(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                            nested_blocksize, out_features * k, x.dtype).view(out_features, k)
        y = torch.nn.functional.linear(x2, w, bias)
    return y.view(*x.shape[:-1], out_features)


_nf4_linear = torch.library.custom_op("pyllmops::nf4_linear", mutates_args=(),
                                      device_types=("cpu", "cuda"))(_nf4_linear_impl)


def _eager(*tensors):
    """Whether a call may skip the torch.library dispatcher (~50 us a call, as much as the kernel of a
    1024x4096 decode matmul on one core) and run the op's body directly: plain cpu/cuda tensors, no
    autograd needed, not being traced by torch.compile. The body is the registered op's own function."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.device.type not in ("cpu", "cuda") or (grad and t.requires_grad):
            return False
    return True


@_nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, bias, blocksize, nested_blocksize, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _nf4_linear_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, nested_offset, bias, blocksize, nested_blocksize, n = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, nested_offset)
    ctx.meta = (blocksize, nested_blocksize, n, x.shape[-1], bias is not None)


def _nf4_linear_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    blocksize, nested_blocksize, n, k, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.pyllmops.nf4_dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                              nested_blocksize, n * k, grad.dtype).view(n, k)
        grad_x = grad @ w
    if has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, n).sum(0)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None


_nf4_linear.register_autograd(_nf4_linear_backward, setup_context=_nf4_linear_setup)


# ================================ public API ================================
def quantize_nf4(w, blocksize=64, double_quant=False):
    """Quantizes w to NF4, byte for byte as bitsandbytes' quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant).

    Args:
        w: float32/float16/bfloat16 tensor of any shape and element count, on cpu or cuda.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        double_quant: also quantize absmax to 8 bits (bnb's compress_statistics): 0.37 bit per
            weight less at blocksize 64.

    Returns:
        (packed, state): packed is uint8 of shape (ceil(numel / 2), 1), two codes per byte, the
        first element in the high nibble; state is an NF4State.

    Example:
        >>> w = torch.randn(4096, 4096, dtype=torch.bfloat16)
        >>> packed, state = pyllmops.quantize_nf4(w, blocksize=64, double_quant=True)
        >>> w_hat = pyllmops.dequantize_nf4(packed, state)  # bfloat16, shape (4096, 4096)
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, nonempty=True)
    check_int("blocksize", blocksize, choices=BLOCKSIZES)
    check_bool("double_quant", double_quant)
    _check_finite("w", w)
    packed, absmax = torch.ops.pyllmops.nf4_quantize(w, blocksize)
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        _check_nested_finite(absmax, offset)
        code = dynamic_code(w.device)
        qabsmax, absmax2 = torch.ops.pyllmops.nf4_quantize_sorted_code(absmax - offset, code, NESTED_BLOCKSIZE)
        state = replace(state, absmax=qabsmax, nested_absmax=absmax2, nested_code=code, nested_offset=offset)
    return packed, state


def _check_nested_finite(absmax, offset):
    """double_quant centres the block absmax on their mean: both must stay finite in float32."""
    if not torch.isfinite(offset) or not torch.isfinite(absmax - offset).all():
        raise ValueError(f"w: double_quant needs the mean of the block absmax ({offset.item()}) and the "
                         "centred absmax to be finite in float32; the weights are too large "
                         f"(max |w| = {absmax.max().item()}); use double_quant=False")


def _check_finite(name, t):
    """Quantizers refuse NaN and +-inf (a NaN would be encoded as a number, an inf poisons the scales)."""
    if t.device.type == "meta":  # no values: the op's fake implementation gives the shapes
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name} must be finite, but {name}[{', '.join(map(str, first))}] is {t[first].item()} "
                         f"(the first non-finite element, at index {list(first)}); NF4 cannot encode NaN or inf")


def dequantize_nf4(packed, state, out_dtype=None):
    """Decodes NF4 back to a dense tensor of state.shape, as bitsandbytes' dequantize_4bit.

    Args:
        packed: uint8 tensor of ceil(numel / 2) bytes (any shape; bnb stores (n, 1)).
        state: the NF4State returned by quantize_nf4 (or read with NF4State.from_bnb_dict).
        out_dtype: float32/float16/bfloat16; default state.dtype (the original dtype).

    Each value is code[q] * absmax computed in float32 and rounded once to out_dtype.
    """
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be an NF4State, got {type(state).__name__}")
    state.validate(packed)
    out_dtype = state.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    args = (packed, *state.kernel_args(), state.numel, out_dtype)
    out = _nf4_dequantize_impl(*args) if _eager(packed) else torch.ops.pyllmops.nf4_dequantize(*args)
    return out.view(state.shape)


def check_linear_weight(packed, state):
    """An NF4 linear weight (packed, state) of shape (out_features, in_features) -> that shape."""
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be an NF4State, got {type(state).__name__}")
    state.validate(packed)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    return tuple(state.shape)


def nf4_linear(x, packed, state, bias=None):
    """y = x @ W.T + bias with W (out_features, in_features) stored in NF4; differentiable in x and bias.

    With few rows of x (decode; up to fused_max_rows(x.dtype, on_cuda): on CUDA 16 for float16 / bfloat16
    (tensor cores) and 8 for float32, on the CPU 16 / 8 for float32 / bfloat16, a measured crossover) a fused
    kernel decodes W in registers and reads it once;
    with more rows W is dequantized to x's dtype and multiplied with torch's matmul. On CUDA the fused
    kernel also needs in_features % 32 == 0 (otherwise the dequantize path runs). Without autograd and
    outside torch.compile the call skips the torch.library dispatcher (same function, less overhead).

    Args:
        x: float32/float16/bfloat16 (..., in_features).
        packed, state: from quantize_nf4 of a 2-D weight (out_features, in_features).
        bias: optional (out_features,) with x's dtype.
    """
    out_features, in_features = check_linear_weight(packed, state)
    check_linear_input(x, in_features, device=state.device)
    check_bias(bias, x, out_features)
    args = (x, packed, *state.kernel_args()[:4], bias, state.blocksize, state.nested_blocksize, out_features)
    return _nf4_linear_impl(*args) if _eager(x, bias) else torch.ops.pyllmops.nf4_linear(*args)
