"""pyllmops.patch(model): one call that puts pyllmops' kernels under an existing transformers / peft /
bitsandbytes model, on the model's own parameters (nothing is copied, converted or requantized).

    model = AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    model = pyllmops.patch(model)        # then train with TRL / your loop as before

What it does:
- every transformers model inside switches to the attention implementation "pyllmops"
  (pyllmops.integrations.transformers);
- every peft LoRA layer on an nn.Linear base runs pyllmops.lora_linear (base + adapter in one fused op)
  on the layer's own weight, lora_A, lora_B and scaling; on a bitsandbytes Linear4bit (nf4) base it runs
  pyllmops.qlora_linear on bitsandbytes' 4-bit bytes as they are (byte-compatible NF4, docs/nf4.md);
- a bitsandbytes Linear4bit outside peft runs pyllmops.nf4_linear on its bytes.

Patched layers keep their class and parameters: peft's save_pretrained, PeftModel.from_pretrained,
merge_and_unload, disable_adapter and set_adapter keep working (a layer whose adapters are disabled or
merged runs its base layer; one with several active adapters, DoRA, a LoRA bias, mixed-batch
adapter_names or another variant runs peft's own forward). Under torch.autocast the fused ops run in the
autocast dtype, as the layers they replace do. bitsandbytes' CPU-only packed layout (see
pyllmops.integrations.bnb) is refused with a ValueError naming the layer, and patched layers turn that
rewrite off. unpatch(model) restores the original forwards (the attention implementation stays).
"""
import types

import torch

from pyllmops.integrations import bnb as bnb_interop
from pyllmops.ops.lora import lora_linear, qlora_linear
from pyllmops.ops.nf4 import nf4_linear

_MARK = "_pyllmops_patched"


def _compute_dtype(x):
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _nf4_of(layer):
    """(packed, NF4State) of a bnb Linear4bit, cached per (bytes, quant state) so each call does not
    re-read bitsandbytes' QuantState (merge_and_unload or .to() replace them: the cache follows)."""
    w = layer.weight
    key = (w.data.data_ptr(), id(w.quant_state), w.data.device)
    cached = getattr(layer, "_pyllmops_nf4", None)
    if cached is None or cached[0] != key:
        cached = (key, bnb_interop.nf4_from_linear4bit(layer))
        layer._pyllmops_nf4 = cached
    return cached[1]


def _bias(layer, dtype):
    b = getattr(layer, "bias", None)
    return None if b is None else b.to(dtype)


def _linear4bit_forward(self, x):
    """A bnb Linear4bit (nf4) on pyllmops.nf4_linear; output in x's dtype, as bitsandbytes'."""
    packed, state = _nf4_of(self)
    dt = _compute_dtype(x)
    y = nf4_linear(x.to(dt), packed, state, _bias(self, dt))
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def _single_adapter(self, kwargs):
    """The one active vanilla-LoRA adapter this layer can run fused, or None (then peft's forward runs)."""
    if kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged:
        return None
    active = [a for a in self.active_adapters if a in self.lora_A.keys()]
    if len(active) != 1:
        return None
    a = active[0]
    if a in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(a, False):
        return None
    if getattr(self, "use_dora", {}).get(a, False) or getattr(self, "fan_in_fan_out", False):
        return None
    drop = self.lora_dropout[a]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    if not isinstance(drop, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    return a, p


def _lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear / lora.Linear4bit forward on pyllmops' fused ops (same parameters)."""
    pick = _single_adapter(self, kwargs) if not args else None
    if pick is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, p = pick
    base = self.get_base_layer()
    dt = _compute_dtype(x)
    a, b = self.lora_A[name].weight.to(dt), self.lora_B[name].weight.to(dt)
    scaling = float(self.scaling[name])
    xin = x.to(dt)
    if bnb_interop.is_linear4bit(base):
        packed, state = _nf4_of(base)
        y = qlora_linear(xin, packed, state, a, b, scaling, _bias(base, dt), dropout=p, training=self.training)
    else:
        y = lora_linear(xin, base.weight.to(dt), a, b, scaling, _bias(base, dt), dropout=p, training=self.training)
    # peft returns the base layer's dtype (autocast: the autocast dtype; else the input's for nn.Linear)
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def _lora_layer_types():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return ()
    types_ = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb
        if hasattr(lora_bnb, "Linear4bit"):
            types_.append(lora_bnb.Linear4bit)
    except ImportError:
        pass
    return tuple(types_)


def _transformers_models(model):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _set_forward(module, fn):
    module.forward = types.MethodType(fn, module)
    setattr(module, _MARK, True)
    if bnb_interop.is_linear4bit(module):
        module.support_avx512bf16_for_cpu = False  # keep the bytes NF4 (module docstring)


def patch(model):
    """Runs `model` (a transformers model; plain, peft-wrapped, or loaded in bitsandbytes 4-bit) on
    pyllmops' kernels in place and returns it (module docstring). Every layer is checked before any is
    changed: a bitsandbytes layer in an unusable layout raises ValueError and leaves the model as it was."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lora_types = _lora_layer_types()
    plan = []
    for name, mod in model.named_modules():
        if getattr(mod, _MARK, False):
            continue
        if lora_types and isinstance(mod, lora_types):
            base = mod.get_base_layer()
            if bnb_interop.is_linear4bit(base):
                bnb_interop.nf4_from_linear4bit(base, name + ".base_layer")
            elif not isinstance(base, torch.nn.Linear) or type(base).__module__.startswith("bitsandbytes"):
                continue  # e.g. 8-bit bases: peft's own forward
            plan.append((mod, _lora_forward))
        elif bnb_interop.is_linear4bit(mod) and not (lora_types and name.endswith(".base_layer")):
            bnb_interop.nf4_from_linear4bit(mod, name)
            plan.append((mod, _linear4bit_forward))
    hf = _transformers_models(model)
    if hf:
        import pyllmops.integrations.transformers as hf_integration

        for m in hf:
            if m.config._attn_implementation != hf_integration.NAME:
                m.set_attn_implementation(hf_integration.NAME)
    for mod, fn in plan:
        _set_forward(mod, fn)
        if lora_types and isinstance(mod, lora_types) and bnb_interop.is_linear4bit(mod.get_base_layer()):
            mod.get_base_layer().support_avx512bf16_for_cpu = False
    return model


def unpatch(model):
    """Restores the forwards patch() replaced (the attention implementation is left as it is)."""
    for mod in model.modules():
        if getattr(mod, _MARK, False):
            del mod.forward
            delattr(mod, _MARK)
    return model
