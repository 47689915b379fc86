"""NF4Linear: a frozen 4-bit (NF4) linear layer, state-dict compatible with bitsandbytes' Linear4bit.

Storage (what FSDP2 shards): every frozen quantized tensor of a layer lives in uint8 nn.Parameters
with requires_grad=False. FSDP2 (torch.distributed.fsdp.fully_shard) shards parameters, not buffers,
along dim 0; it all-gathers mixed-dtype groups byte-wise; and its mixed-precision cast skips
non-floating parameters. So a uint8 parameter is sharded, gathered for the forward and backward and
freed after, exactly, in every precision policy. The fp32 statistics are stored as their bytes for the
same reason: a float32 absmax parameter would be cast to bf16 by MixedPrecisionPolicy(param_dtype=bf16).
See docs/train.md ("FSDP").
"""
import math

import torch
from torch import nn

from pyllmops.ops._common import check_int
from pyllmops.ops.nf4 import NF4State, dequantize_nf4, nf4_linear, quantize_nf4


def _full(t):
    """The whole tensor behind t: t itself, or all ranks' shards of an FSDP2 DTensor (a collective:
    every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def as_bytes(tensors):
    """Concatenates tensors' bytes into one flat uint8 tensor (each part contiguous, native endianness)."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def from_bytes(data, offset, dtype, shape):
    """(tensor of `dtype` and `shape` read at byte `offset` of flat uint8 `data`, offset after it).
    A view when the bytes are aligned for dtype, else a copy."""
    size = math.prod(shape) * dtype.itemsize
    part = data[offset:offset + size]
    if not torch.compiler.is_compiling() and part.storage_offset() % dtype.itemsize:
        part = part.clone()
    return part.view(dtype).reshape(shape), offset + size


class ByteStorage:
    """Mixin for a module whose frozen tensors should shard under FSDP2: to_byte_storage(names) moves
    the named buffers into one uint8 nn.Parameter `byte_storage` (requires_grad=False), and the names
    keep working as attributes (views of it; the whole tensor under FSDP, see _full). state_dict /
    load_state_dict keep the original keys, dtypes and shapes."""

    def to_byte_storage(self, names):
        if self.__dict__.get("_byte_layout"):
            return self
        tensors = [self._buffers.pop(n) for n in names]
        self._byte_layout = [(n, t.dtype, tuple(t.shape)) for n, t in zip(names, tensors)]
        self.byte_storage = nn.Parameter(as_bytes(tensors), requires_grad=False)
        return self

    def _byte_views(self):
        data, off, out = _full(self._parameters["byte_storage"]), 0, {}
        for name, dtype, shape in self._byte_layout:
            out[name], off = from_bytes(data, off, dtype, shape)
        return out

    def __getattr__(self, name):
        layout = self.__dict__.get("_byte_layout")
        if layout and any(name == n for n, _, _ in layout):
            return self._byte_views()[name]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(self, "_byte_layout", None):
            destination.pop(prefix + "byte_storage", None)
            for name, t in self._byte_views().items():
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        layout = getattr(self, "_byte_layout", None)
        if layout:
            keys = [prefix + n for n, _, _ in layout]
            missing = [k for k in keys if k not in state_dict]
            if missing:
                missing_keys.extend(missing)
            else:
                state_dict = dict(state_dict)
                parts = [state_dict.pop(k) for k in keys]
                bad = [f"{k}: {tuple(p.shape)} {p.dtype}, expected {s} {d}"
                       for k, p, (_, d, s) in zip(keys, parts, layout) if tuple(p.shape) != s or p.dtype != d]
                if bad:
                    error_msgs.append("size or dtype mismatch: " + "; ".join(bad))
                    return
                state_dict[prefix + "byte_storage"] = as_bytes(parts)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _stats_bytes(state):
    """NF4State's tensors as bytes: nested: [nested_code fp32 x256][nested_offset fp32][nested_absmax fp32
    x n2][absmax uint8 codes x n_blocks]; plain: [absmax fp32 x n_blocks]. fp32 parts first: aligned."""
    if state.nested:
        return as_bytes([state.nested_code, state.nested_offset.reshape(1), state.nested_absmax, state.absmax])
    return as_bytes([state.absmax])


class NF4Linear(nn.Module):
    """y = x @ W.T + bias with W stored in NF4 (QLoRA). W is frozen; x and bias get gradients.

    State dict keys are bitsandbytes Linear4bit's: `weight` (uint8 packed, shape (ceil(n/2), 1)),
    `bias`, and `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`,
    `weight.nested_quant_map`], `weight.quant_state.bitsandbytes__nf4`; a Linear4bit (nf4)
    checkpoint loads into it, and its state dict loads into Linear4bit.

    Parameters (both uint8, requires_grad=False, sharded by FSDP2; see the module docstring):
    `weight` the packed codes, `weight_stats` the statistics' bytes. `quant_state` is the NF4State
    read from them. Forward runs in x's dtype; with <= 8 rows of x (decode) a fused kernel reads W once.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(4096, 4096), blocksize=64, double_quant=True)
        >>> y = layer(torch.randn(2, 7, 4096))
    """

    def __init__(self, in_features, out_features, bias=True, *, blocksize=64, double_quant=True, dtype=None,
                 device=None):
        super().__init__()
        check_int("in_features", in_features, min_value=1)
        check_int("out_features", out_features, min_value=1)
        self.in_features, self.out_features = in_features, out_features
        # Initialized like nn.Linear, then quantized, so the layer is usable before loading weights.
        w = torch.empty(out_features, in_features, dtype=dtype or torch.float32, device=device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self._set_quantized(*quantize_nf4(w, blocksize, double_quant))
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, dtype=w.dtype, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _set_quantized(self, packed, state):
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_stats = nn.Parameter(_stats_bytes(state), requires_grad=False)
        self._meta = (torch.Size(state.shape), state.dtype, state.blocksize, state.nested, state.nested_blocksize,
                      state.n_blocks)

    @classmethod
    def from_linear(cls, linear, blocksize=64, double_quant=True):
        """Quantizes an nn.Linear's weight; the bias is copied (keeping its requires_grad)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._set_quantized(*quantize_nf4(linear.weight.detach(), blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    @property
    def quant_state(self):
        """The NF4State, its tensors views of `weight_stats` (under FSDP outside forward: gathered, a
        collective every rank must join)."""
        shape, dtype, blocksize, nested, nested_blocksize, n_blocks = self._meta
        data = _full(self.weight_stats)
        if not nested:
            absmax, _ = from_bytes(data, 0, torch.float32, (n_blocks,))
            return NF4State(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize)
        n2 = -(-n_blocks // nested_blocksize)
        code, off = from_bytes(data, 0, torch.float32, (256,))
        offset, off = from_bytes(data, off, torch.float32, ())
        nested_absmax, off = from_bytes(data, off, torch.float32, (n2,))
        absmax, _ = from_bytes(data, off, torch.uint8, (n_blocks,))
        return NF4State(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                        nested_code=code, nested_offset=offset, nested_blocksize=nested_blocksize)

    def forward(self, x):
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return nf4_linear(x, self.weight, self.quant_state, bias)

    def dequantized_weight(self, dtype=None):
        return dequantize_nf4(_full(self.weight), self.quant_state, dtype)

    def extra_repr(self):
        shape, dtype, blocksize, nested, _, _ = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={blocksize}, double_quant={nested}, dtype={dtype}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_stats")
        if not keep_vars:
            destination[prefix + "weight"] = _full(destination[prefix + "weight"])
        for k, v in self.quant_state.as_bnb_dict().items():
            destination[prefix + "weight." + k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qprefix = prefix + "weight."
        quant = {k[len(qprefix):]: v for k, v in state_dict.items() if k.startswith(qprefix)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(qprefix)}
        if prefix + "weight" in rest:
            if not quant:
                error_msgs.append(f"{prefix}weight: found a packed weight but no quant state "
                                  f"({qprefix}absmax, {qprefix}quant_state.bitsandbytes__nf4, ...)")
                return
            try:
                state = NF4State.from_bnb_dict(quant, device=self.weight.device)
                state.validate(rest[prefix + "weight"])
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
                return
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: checkpoint shape {tuple(state.shape)} does not match the layer's "
                                  f"(out_features, in_features) = {(self.out_features, self.in_features)}")
                return
            # The blocksize and nesting are the checkpoint's; the packed size depends on the shape only.
            self._set_quantized(self.weight.detach(), state)
            rest[prefix + "weight_stats"] = self.weight_stats.detach()
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
