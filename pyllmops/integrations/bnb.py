"""bitsandbytes interop: a Linear4bit's NF4 bytes used as they are, and NF4Linear <-> Linear4bit both ways.

pyllmops' NF4 is bitsandbytes' format byte for byte (docs/nf4.md): the packed weight of a
`bnb.nn.Linear4bit` (quant_type "nf4") and its QuantState (`as_dict(packed=True)`) are an NF4Linear's
`weight` buffer and `quant_state` (NF4State.from_bnb_dict). Nothing is requantized or copied.

    from pyllmops.integrations.bnb import linear4bit_from_nf4linear, nf4linear_from_linear4bit

    nf4 = NF4Linear.from_linear(torch.nn.Linear(64, 32), blocksize=64, double_quant=True)
    bnb_layer = linear4bit_from_nf4linear(nf4)      # bnb.nn.Linear4bit, through Params4bit.from_prequantized
    back = nf4linear_from_linear4bit(bnb_layer)     # NF4Linear on the same bytes

The first path is the one transformers uses to load 4-bit checkpoints (Params4bit.from_prequantized with
the `weight.*` quant-state tensors); a plain `Linear4bit.load_state_dict` cannot load 4-bit state dicts.

bitsandbytes >= 0.49 on some CPUs (AVX512-BF16) rewrites a Linear4bit's bytes into a CPU-only layout on
the first no-grad forward in eval mode (`quant_state.packing_format_for_cpu`: nibbles regrouped in blocks
of 32 rows, absmax transposed to bfloat16, double quantization dropped). That layout is not NF4, and its
inverse in bitsandbytes requantizes absmax (lossy), so it is refused here (ValueError naming the layer);
`patch` and `apply_lora` turn the rewrite off on the layers they take over (support_avx512bf16_for_cpu).
"""
import torch
from torch import nn

from pyllmops.nn.nf4 import NF4Linear
from pyllmops.ops.nf4 import NF4State


def is_linear4bit(module):
    """True for a bitsandbytes Linear4bit (without importing bitsandbytes when it is not loaded)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def nf4_from_linear4bit(layer, name="layer"):
    """(packed uint8 (ceil(n / 2), 1), NF4State) of a bnb Linear4bit: its own bytes, no copy.

    Raises ValueError for fp4, for a layer not quantized yet (still on the meta device or not moved to
    a device), and for bitsandbytes' CPU-only packed layout (module docstring)."""
    w = layer.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or not getattr(w, "bnb_quantized", True):
        raise ValueError(f"{name}: the Linear4bit is not quantized yet (bitsandbytes quantizes when the layer is "
                         f"moved to a device); move it first")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError(f"{name}: bitsandbytes rewrote this Linear4bit into its CPU-only packed layout "
                         f"(quant_state.packing_format_for_cpu=True: bfloat16 absmax, regrouped nibbles), which is "
                         f"not NF4 and cannot be converted back without requantizing. Call pyllmops.patch / "
                         f"apply_lora before the first no-grad eval forward, or set "
                         f"layer.support_avx512bf16_for_cpu = False before it")
    if qs.quant_type != "nf4":
        raise ValueError(f"{name}: quant_type must be 'nf4', got {qs.quant_type!r} (fp4 is not supported)")
    packed = w.data if w.dtype == torch.uint8 else w.data.view(torch.uint8)
    state = NF4State.from_bnb_dict(qs.as_dict(packed=True), device=packed.device)
    state.validate(packed)
    return packed, state


def nf4linear_from_linear4bit(layer, name="layer"):
    """An NF4Linear on a bnb Linear4bit's bytes (shared, not copied; the small statistics are copied into the
    layer's `weight_stats`); bias shared too."""
    packed, state = nf4_from_linear4bit(layer, name)
    out = NF4Linear.__new__(NF4Linear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = layer.in_features, layer.out_features
    out._set_quantized(packed.reshape(-1, 1), state)
    if layer.bias is not None:
        out.bias = layer.bias
    else:
        out.register_parameter("bias", None)
    return out


def linear4bit_from_nf4linear(layer, compute_dtype=None):
    """A bitsandbytes Linear4bit holding an NF4Linear's bytes, built through Params4bit.from_prequantized
    (the path transformers loads 4-bit checkpoints with). compute_dtype: default the quant state's dtype."""
    import bitsandbytes as bnb

    if not isinstance(layer, NF4Linear):
        raise TypeError(f"layer must be a pyllmops.nn.NF4Linear, got {type(layer).__name__}")
    state = layer.quant_state
    device = layer.weight.device
    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=compute_dtype or state.dtype, compress_statistics=state.nested,
                            quant_type="nf4", device="meta")
    out.weight = bnb.nn.Params4bit.from_prequantized(data=layer.weight, quantized_stats=state.as_bnb_dict(),
                                                     requires_grad=False, device=device, module=out)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return out
