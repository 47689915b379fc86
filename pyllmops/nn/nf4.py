"""NF4Linear: a frozen 4-bit (NF4) linear layer, state-dict compatible with bitsandbytes' Linear4bit."""
import math

import torch
from torch import nn

from pyllmops.ops.nf4 import NF4State, dequantize_nf4, nf4_linear, quantize_nf4


class NF4Linear(nn.Module):
    """y = x @ W.T + bias with W stored in NF4 (QLoRA). W is frozen; x and bias get gradients.

    State dict keys are bitsandbytes Linear4bit's: `weight` (uint8 packed, shape (ceil(n/2), 1)),
    `bias`, and `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`,
    `weight.nested_quant_map`], `weight.quant_state.bitsandbytes__nf4`; a Linear4bit (nf4)
    checkpoint loads into it, and its state dict loads into Linear4bit.

    Forward runs in x's dtype; with <= 8 rows of x (decode) a fused kernel reads W once.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(4096, 4096), blocksize=64, double_quant=True)
        >>> y = layer(torch.randn(2, 7, 4096))
    """

    def __init__(self, in_features, out_features, bias=True, *, blocksize=64, double_quant=True, dtype=None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Initialized like nn.Linear, then quantized, so the layer is usable before loading weights.
        w = torch.empty(out_features, in_features, dtype=dtype or torch.float32, device=device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        packed, state = quantize_nf4(w, blocksize, double_quant)
        self.register_buffer("weight", packed)
        self.quant_state = state
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, dtype=w.dtype, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear, blocksize=64, double_quant=True):
        """Quantizes an nn.Linear's weight; the bias is copied (keeping its requires_grad)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        layer.register_buffer("weight", packed)
        layer.quant_state = state
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    def forward(self, x):
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return nf4_linear(x, self.weight, self.quant_state, bias)

    def dequantized_weight(self, dtype=None):
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def extra_repr(self):
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={s.blocksize}, double_quant={s.nested}, dtype={s.dtype}")

    # The quant state's tensors follow the module across devices but never change dtype
    # (module.half() must not touch fp32 absmax).
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=torch.uint8, device=self.quant_state.device))
        if probe.device != self.quant_state.device:
            self.quant_state = self.quant_state.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
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
            self.quant_state = state
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
