"""What every op family shares: tensor views for _C, streams, output allocation, argument checks.

Arguments are checked here, before any kernel runs, with messages that name the argument, the
value received and what was expected. _C checks again what its kernels rely on.
"""
import contextlib
import functools
import math
import os

import torch

from pyllmops._ext import build_info, dtype_codes, lib

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DEVICES = ("cpu", "cuda")

# Tests poison every output before the kernel runs (NaN for floats, 0xA5 bytes for integers), so an
# element a kernel fails to write cannot pass. Off by default: it costs a fill per output.
_poison = os.environ.get("PYLLMOPS_POISON", "0") == "1"


@contextlib.contextmanager
def poison_outputs(enabled=True):
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


@torch.compiler.assume_constant_result  # a property of the build: torch.compile bakes it in, no graph break
def emulated():
    """True in a PYLLMOPS_CUDA=emu build: CPU tensors run the CUDA kernels on the emulator
    (docs/emulator.md), so every device decision below treats them as CUDA tensors."""
    return _emulated()


@functools.lru_cache(maxsize=None)
def _emulated():
    return bool(build_info().get("emulated", False))


def on_cuda(device):
    """Whether tensors on `device` (a torch.device, a device string, or a tensor) run the CUDA kernels: CUDA
    devices, and the CPU in an emulated build."""
    if isinstance(device, torch.Tensor):  # without building a torch.device: ~0.5 us, several times per op call
        return device.is_cuda or (emulated() and device.device.type == "cpu")
    device = torch.device(device)
    return device.type == "cuda" or _emulated_cpu(device)


def _emulated_cpu(device):
    """A CPU device whose tensors take the CUDA path (emulated builds only)."""
    return emulated() and device.type == "cpu"


def empty(shape, dtype, device):
    """Allocates a kernel output (poisoned when poison_outputs() is on)."""
    if emulated() and torch.device(device).type == "cpu":
        return _maybe_poison(_guarded_empty(torch.empty(shape, dtype=dtype, device="meta")))
    return _maybe_poison(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t, dtype=None):
    """Allocates a kernel output with t's shape and strides (torch.empty_like's memory format
    preservation), poisoned as `empty` does. For kernels that take strides: a transposed input
    gets an output of the same layout, with no copy."""
    if emulated() and t.device.type == "cpu":
        return _maybe_poison(_guarded_empty(torch.empty_like(t, dtype=dtype, device="meta")))
    return _maybe_poison(torch.empty_like(t, dtype=dtype))


def _guarded_empty(meta):
    """A CPU tensor laid out as `meta` whose storage ends against an inaccessible page (emulated builds):
    a kernel that writes or reads past its end faults, and the launch reports it."""
    n = meta.numel()
    if n == 0:
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
    span = 1 + sum((size - 1) * stride for size, stride in zip(meta.shape, meta.stride()))
    buf = lib().emu_guarded_buffer(span * meta.element_size())
    flat = torch.frombuffer(buf, dtype=torch.uint8).view(meta.dtype)
    return flat.as_strided(meta.shape, meta.stride())


def _maybe_poison(out):
    if _poison:
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0xA5)
    return out


def view(t):
    """The tuple _C takes for a tensor: (data_ptr, dtype code, shape, strides, device index, t).

    The last element is the tensor itself: _C ignores it, but holding it in the argument keeps a
    temporary (view(x.contiguous()) of a non-contiguous x) alive until the kernel has returned;
    a bare data pointer would let it be freed, and its memory reused, first."""
    codes = dtype_codes()
    if t.dtype not in codes:
        raise ValueError(f"tensor of dtype {t.dtype} cannot be passed to a kernel")
    if t.is_cuda:
        index = t.device.index
    else:
        index = 0 if emulated() and t.device.type == "cpu" else -1  # emulated: CPU tensors take the CUDA path
    return (t.data_ptr(), codes[t.dtype], tuple(t.shape), tuple(t.stride()), index, t)


def opt_view(t):
    return None if t is None else view(t)


def stream(t):
    """Handle of the current CUDA stream of t's device (0 for CPU tensors, emulated or not)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


# ---- CUDA error words ------------------------------------------------------------------------
# Metadata that lives on the GPU (paged block tables and seq_lens, varlen cu_seqlens) cannot be checked on
# the host without a synchronization (which also breaks CUDA-graph capture), so the CUDA kernels check it
# themselves: they never touch memory outside the tensors, write NaN where the affected results would have
# gone, and raise bits in their family's int32 error word on that device. check_kernel_errors() reads them.
_error_words = {}     # (family, device index) -> int32 tensor
_error_families = {}  # family -> (number of int32 entries, describe(list of ints) -> message)


def register_error_word(family, size, describe):
    """Declares `family`'s error word: `size` int32 entries, entry 0 the error bits (0: no error);
    describe(entries) turns a word with bits set into a message."""
    _error_families[family] = (size, describe)


def error_word(family, device):
    """The int32 error word of `family` on a CUDA device (allocated zeroed on first use, so make the first
    call outside CUDA-graph capture); None on the CPU, whose kernels raise before running instead."""
    if not on_cuda(device):
        return None
    idx, dev = _error_word_device(device)
    w = _error_words.get((family, idx))
    if w is None:
        w = _error_words[(family, idx)] = torch.zeros(_error_families[family][0], dtype=torch.int32, device=dev)
    return w


def _error_word_device(device):
    """(index, device) of the error words of a device that runs the CUDA kernels."""
    if device.type == "cpu":  # emulated build
        return -1, torch.device("cpu")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return idx, torch.device("cuda", idx)


def check_kernel_errors(device=None):
    """Synchronizes, then raises RuntimeError if a CUDA kernel on `device` met metadata it could not honour
    since the last check (paged attention / reshape_and_cache: out-of-range block tables, seq_lens, slots;
    flash_attention_varlen: cu_seqlens longer than max_seqlen or malformed), and clears the words. The
    affected outputs hold NaN. No-op on the CPU, whose kernels raise ValueError before running instead."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if not on_cuda(device):
        return
    idx, _ = _error_word_device(device)
    messages = []
    for (family, i), w in list(_error_words.items()):
        if i != idx:
            continue
        entries = w.tolist()
        if entries[0]:
            w.zero_()
            messages.append(_error_families[family][1](entries))
    if messages:
        raise RuntimeError(f"pyllmops CUDA kernels on {device}: " + "; and ".join(messages))


# ---- argument checks -------------------------------------------------------------------------
def check_tensor(name, t, *, dtypes=None, dim=None, min_dim=None, device=None, nonempty=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_layout(name, t)
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({expected}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    if t.device.type not in KERNEL_DEVICES and t.device.type != "meta":
        raise ValueError(f"{name} is on {t.device}; pyllmops kernels run on cpu and cuda")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the other inputs)")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_layout(name, t):
    """A dense (strided) tensor: sparse, mkldnn and quantized tensors have no data pointer and strides a
    kernel could use, and torch's dispatcher would otherwise answer with its own text."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {str(t.layout).replace('torch.', '')}; "
                        f"convert it first (e.g. {name}.to_dense())")
    if t.is_quantized:
        raise TypeError(f"{name} must be a dense float or integer tensor, got a quantized tensor of dtype "
                        f"{str(t.dtype).replace('torch.', '')}; use {name}.dequantize() first")


def check_int(name, value, *, choices=None, min_value=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_linear_input(x, in_features, device=None):
    """x of a linear layer: float (..., in_features)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1, device=device)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, expected in_features={in_features}")


def check_bias(bias, x, out_features):
    """An optional bias of a linear layer: (out_features,) with x's dtype and device."""
    if bias is None:
        return
    check_tensor("bias", bias, dtypes=(x.dtype,), dim=1, device=x.device)
    if bias.shape[0] != out_features:
        raise ValueError(f"bias has {bias.shape[0]} elements, expected out_features={out_features}")


def softmax_scale_or_default(softmax_scale, head_dim):
    """The attention softmax scale: 1 / sqrt(head_dim) when None, else a positive finite float."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) the scale can be a SymFloat.
    if not (0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    return float(softmax_scale)


def plain_eager(x):
    """Plain eager execution on real tensors: no torch.compile tracing, no TorchDispatchMode (fake tensors, op
    recorders, flop counters) and no meta tensors, all of which must see the registered ops (their fake
    implementations). Then an op family may call its kernels' bodies through a torch.autograd.Function of its
    own instead of the registered op, whose Python autograd wrapper and redispatch cost ~0.1 ms a call."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    return not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode() and x.device.type != "meta"
