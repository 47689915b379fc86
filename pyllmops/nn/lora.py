"""LoRA / QLoRA / QA-LoRA modules: LoRALinear, QALoRALinear, IntLinear, apply_lora, peft adapter files."""
import contextlib
import math

import torch
from torch import nn

from pyllmops.nn.nf4 import ByteStorage, NF4Linear
from pyllmops.ops.lora import (INT_BITS, INT_GROUP_SIZES, _check_scaling, int_linear, lora_linear, qalora_linear,
                               qlora_linear, quantize_int)

PEFT_PREFIX = "base_model.model."


def _check_rank_alpha(r, alpha, dropout, use_rslora=False):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a finite float, got {type(alpha).__name__} {alpha!r}")
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an int too large for a double
        finite = False
    if not finite:
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    _check_scaling(scaling, "scaling", f" (alpha={alpha!r} / {'sqrt(r)' if use_rslora else 'r'} with r={r})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def _init_adapter(module, r, in_cols, out_features, dtype, device):
    """peft's default init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros (so the adapted
    layer starts equal to the base)."""
    module.lora_A = nn.Parameter(torch.empty(r, in_cols, dtype=dtype, device=device))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
    module.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class _AdapterMixin:
    """adapter_state_dict / load_adapter_state_dict in peft's saved-adapter keys."""

    def adapter_state_dict(self, prefix=""):
        """{prefix + 'lora_A.weight': A, prefix + 'lora_B.weight': B} (peft's adapter_model keys)."""
        return {prefix + "lora_A.weight": self.lora_A.detach(), prefix + "lora_B.weight": self.lora_B.detach()}

    def check_adapter_state_dict(self, state_dict, prefix=""):
        """Raises (KeyError / ValueError naming the key) unless lora_A / lora_B are present with this layer's
        shapes; writes nothing."""
        for name in ("lora_A", "lora_B"):
            key = prefix + name + ".weight"
            if key not in state_dict:
                raise KeyError(f"adapter state dict has no {key!r}; keys: {sorted(state_dict)[:8]}")
            value, param = state_dict[key], getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{key} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(param.shape)} "
                                 f"(r={self.r}; a rank mismatch means the adapter was trained with another r)")

    def load_adapter_state_dict(self, state_dict, prefix=""):
        """Copies lora_A / lora_B from peft-format keys (shapes checked first, dtype and device converted)."""
        self.check_adapter_state_dict(state_dict, prefix)
        for name in ("lora_A", "lora_B"):
            with torch.no_grad():
                getattr(self, name).copy_(state_dict[prefix + name + ".weight"].to(getattr(self, name).dtype))


class LoRALinear(_AdapterMixin, nn.Module):
    """y = base(x) + scaling * (dropout(x).A^T).B^T on a frozen nn.Linear or NF4Linear (QLoRA).

    The base and the adapter run in one fused kernel (pyllmops.lora_linear / qlora_linear).
    Parameters: lora_A (r, in_features) Kaiming-uniform, lora_B (out_features, r) zeros, as peft;
    scaling = alpha / r, or alpha / sqrt(r) with use_rslora. Dropout applies to the adapter's input
    only. The wrapped layer is `base_layer` (peft's name); its parameters are frozen.

    Example:
        >>> layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
        >>> y = layer(torch.randn(4, 64)); y.sum().backward()   # grads in lora_A, lora_B
        >>> with layer.disable_adapter(): y0 = layer(x)          # the base model
    """

    def __init__(self, base, r=8, alpha=8, dropout=0.0, use_rslora=False):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"base must be an nn.Linear or pyllmops.nn.NF4Linear, got {type(base).__name__}")
        _check_rank_alpha(r, alpha, dropout, use_rslora)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if isinstance(base, NF4Linear):
            dtype, device = base.quant_state.dtype, base.weight.device
        else:
            dtype, device = base.weight.dtype, base.weight.device
        _init_adapter(self, r, self.in_features, self.out_features, dtype, device)
        self.merged = False
        self._disabled = False

    @property
    def quantized(self):
        return isinstance(self.base_layer, NF4Linear)

    def forward(self, x):
        if self._disabled or self.merged:
            return self.base_layer(x)
        dt = x.dtype
        a, b, bias = self.lora_A.to(dt), self.lora_B.to(dt), _cast(self.base_layer.bias, dt)
        if self.quantized:
            return qlora_linear(x, self.base_layer.weight, self.base_layer.quant_state, a, b, self.scaling, bias,
                                dropout=self.dropout, training=self.training)
        return lora_linear(x, self.base_layer.weight.to(dt), a, b, self.scaling, bias, dropout=self.dropout,
                           training=self.training)

    def delta_weight(self):
        """scaling * B.A in float32 (out_features, in_features)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self):
        """W += scaling * B.A (dense base only); forward then runs the base alone."""
        if self.quantized:
            raise TypeError("merge() needs a dense nn.Linear base; an NF4 base cannot absorb the adapter without "
                            "re-quantizing (use QALoRALinear for an exactly mergeable quantized adapter)")
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    def unmerge(self):
        """W -= scaling * B.A: undoes merge() (exactly in float32, up to rounding in 16-bit weights)."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    @contextlib.contextmanager
    def disable_adapter(self):
        """Runs the base layer alone inside the block (e.g. DPO's reference model)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        old, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = old
            if was_merged:
                self.merge()

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"


class IntLinear(ByteStorage, nn.Module):
    """y = x.W^T + bias with W in group-wise INT (quantize_int's format), decoded tile by tile in the
    kernel; no dense copy of W exists. Buffers: qweight (int32), scales, zeros (fp32); bias parameter.
    FSDP: to_byte_storage(("qweight", "scales", "zeros")) (ByteStorage, pyllmops.train.fsdp.prepare_storage)
    moves the three into one uint8 parameter that FSDP2 shards; the names and state dict stay."""

    def __init__(self, qweight, scales, zeros, bits, group_size, bias=None):
        super().__init__()
        if bits not in INT_BITS or group_size not in INT_GROUP_SIZES:
            raise ValueError(f"bits must be in {INT_BITS} and group_size in {INT_GROUP_SIZES}, got {bits}, "
                             f"{group_size}")
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, bits=4, group_size=128):
        q, s, z = quantize_int(linear.weight.detach(), bits, group_size)
        return cls(q, s, z, bits, group_size, linear.bias)

    def forward(self, x):
        return int_linear(x, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                          bias=_cast(self.bias, x.dtype))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QALoRALinear(_AdapterMixin, nn.Module):
    """QA-LoRA (arXiv 2309.14717): a frozen group-wise INT base and an adapter on group-pooled input.

    y = x.W^T + bias + scaling * (pool(dropout(x)).A^T).B^T, where W[n, k] = q * scales[n, g] +
    zeros[n, g] with g = k // group_size, and pooling is the MEAN over each quantization group:
    pool(x)[..., g] = (1 / group_size) * sum_{k in group g} x[..., k]. Parameters lora_A
    (r, in_features / group_size), lora_B (out_features, r).

    Merge (exact): the adapter's contribution to y[n] is
        scaling * sum_g (B.A)[n, g] * pool(x)[g] = sum_k x[k] * scaling * (B.A)[n, k // group_size] / group_size,
    i.e. a constant added to every weight of group (n, g), so it folds into the zero point:
        zeros'[n, g] = zeros[n, g] + scaling * (B.A)[n, g] / group_size      (computed in float64, stored fp32)
    with qweight and scales unchanged. merge() returns that IntLinear; its output equals this layer's
    (without dropout) up to float rounding.
    """

    def __init__(self, qweight, scales, zeros, bits, group_size, bias=None, r=8, alpha=8, dropout=0.0,
                 dtype=torch.float32):
        super().__init__()
        _check_rank_alpha(r, alpha, dropout)
        self.base_layer = IntLinear(qweight, scales, zeros, bits, group_size, bias)
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = self.base_layer.in_features, self.base_layer.out_features
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.scaling = alpha / r
        _init_adapter(self, r, self.in_features // group_size, self.out_features, dtype, scales.device)
        self._disabled = False

    @classmethod
    def from_linear(cls, linear, bits=4, group_size=64, r=8, alpha=8, dropout=0.0):
        """Quantizes linear.weight with quantize_int(bits, group_size) and adds a fresh adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if bits not in INT_BITS:
            raise ValueError(f"bits must be one of {list(INT_BITS)}, got {bits!r}")
        if group_size not in INT_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(INT_GROUP_SIZES)}, got {group_size!r}")
        if linear.in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {linear.in_features}")
        q, s, z = quantize_int(linear.weight.detach(), bits, group_size)
        return cls(q, s, z, bits, group_size, linear.bias, r, alpha, dropout, dtype=linear.weight.dtype)

    def forward(self, x):
        if self._disabled:
            return self.base_layer(x)
        dt, base = x.dtype, self.base_layer
        return qalora_linear(x, base.qweight, base.scales, base.zeros, self.lora_A.to(dt), self.lora_B.to(dt),
                             self.scaling, bits=self.bits, group_size=self.group_size, bias=_cast(base.bias, dt),
                             dropout=self.dropout, training=self.training)

    def merged_zeros(self):
        delta = self.scaling * (self.lora_B.detach().double() @ self.lora_A.detach().double()) / self.group_size
        return (self.base_layer.zeros.double() + delta).to(torch.float32)

    def merge(self):
        """-> IntLinear with zeros' = zeros + scaling * (B.A) / group_size (see the class docstring)."""
        base = self.base_layer
        return IntLinear(base.qweight.clone(), base.scales.clone(), self.merged_zeros(), self.bits, self.group_size,
                         base.bias)

    @contextlib.contextmanager
    def disable_adapter(self):
        old, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = old

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, bits={self.bits}, group_size={self.group_size}"


_ADAPTERS = (LoRALinear, QALoRALinear)


@contextlib.contextmanager
def disable_adapters(model):
    """Turns every adapter of `model` off inside the block: the frozen base model (e.g. DPO's
    reference model), as peft's model.disable_adapter()."""
    with contextlib.ExitStack() as stack:
        for mod in model.modules():
            if isinstance(mod, _ADAPTERS):
                stack.enter_context(mod.disable_adapter())
        yield model


def adapter_state_dict(model, prefix=PEFT_PREFIX):
    """Every adapter of `model` in peft's saved-adapter keys: '<prefix><path>.lora_A.weight' and
    '.lora_B.weight' (prefix 'base_model.model.' as in peft's adapter_model.safetensors)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _ADAPTERS):
            out.update(mod.adapter_state_dict(f"{prefix}{name}." if name else prefix))
    return out


def load_adapter_state_dict(model, state_dict, prefix=PEFT_PREFIX):
    """Loads peft-format adapter weights into the model's adapters. Keys may carry `prefix` or not,
    and peft's in-memory adapter name ('.default') is accepted. Every adapter must be found and every
    key used."""
    norm = {}
    for k, v in state_dict.items():
        key = k[len(prefix):] if k.startswith(prefix) else k
        norm[key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = v
    used, targets = set(), []
    for name, mod in model.named_modules():  # validate every adapter and key first: all or nothing
        if isinstance(mod, _ADAPTERS):
            p = f"{name}." if name else ""
            mod.check_adapter_state_dict(norm, p)
            targets.append((mod, p))
            used.update({p + "lora_A.weight", p + "lora_B.weight"})
    unexpected = sorted(set(norm) - used)
    if unexpected:
        raise KeyError(f"adapter state dict has keys that match no adapter of the model: {unexpected[:8]}")
    for mod, p in targets:
        mod.load_adapter_state_dict(norm, p)


def _int_bits(quantize):
    return {"int4": 4, "int3": 3, "int2": 2}.get(quantize)


def _is_linear(mod):
    """A layer apply_lora can adapt: nn.Linear (bitsandbytes' Linear4bit is one), NF4Linear, or IntLinear."""
    return isinstance(mod, (nn.Linear, NF4Linear, IntLinear))


def _output_layer_names(model):
    """Names of the model's output projection (lm_head), which peft's 'all-linear' leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def match_target_modules(model, target_modules):
    """[(name, module)] of the layers target_modules selects, by peft's rules: "all-linear" (every linear
    layer but the output layer), a str is a regular expression matched against the whole module name,
    a list/tuple matches a name exactly or as a dotted suffix ('q_proj' matches 'layers.0.attn.q_proj').
    A str without regex characters that fully matches no name is taken as a one-name list (where peft
    would find nothing and raise)."""
    import re

    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m) and n]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            skip = _output_layer_names(model)
            return [(n, m) for n, m in linears if n not in skip]
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        found = [(n, m) for n, m in linears if pattern.fullmatch(n)]
        if found or not re.fullmatch(r"[\w.]+", target_modules):
            return found
        target_modules = [target_modules]  # a bare name that matches no full name: as a one-name list
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be 'all-linear', a regex str or a list of module names, got "
                        f"{target_modules!r}")
    targets = tuple(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")
    return [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]


def _lora_base(name, mod, quantize, blocksize, double_quant):
    """The frozen base a LoRALinear wraps: a bitsandbytes Linear4bit becomes an NF4Linear on its own bytes."""
    from pyllmops.integrations import bnb as bnb_interop

    if bnb_interop.is_linear4bit(mod):
        if quantize not in (None, "nf4"):
            raise TypeError(f"{name}: quantize={quantize!r} needs a dense nn.Linear, got a bitsandbytes Linear4bit "
                            f"(already 4-bit: use quantize=None or 'nf4')")
        return bnb_interop.nf4linear_from_linear4bit(mod, name)
    if type(mod).__module__.startswith("bitsandbytes"):
        raise TypeError(f"{name}: {type(mod).__name__} is not supported (nn.Linear, NF4Linear or bitsandbytes "
                        f"Linear4bit nf4)")
    if quantize == "nf4" and isinstance(mod, nn.Linear):
        return NF4Linear.from_linear(mod, blocksize, double_quant)
    return mod


def apply_lora(model, r=8, alpha=8, target_modules=("q_proj", "v_proj"), quantize=None, group_size=64, dropout=0.0,
               use_rslora=False, blocksize=64, double_quant=True):
    r"""Replaces the model's targeted linear layers in place and freezes all but the adapters.

    target_modules (peft's rules): "all-linear" (every linear layer except the output layer), a str is a
    regular expression matched against the full module name, a list matches a module name exactly or as
    a dotted suffix. Targets may be nn.Linear, NF4Linear, or bitsandbytes Linear4bit (nf4; e.g. a model
    loaded with BitsAndBytesConfig(load_in_4bit=True)): their 4-bit bytes become the NF4 base as they are
    (no requantization). quantize: None (LoRA on the base as it is), "nf4" (QLoRA: an nn.Linear is
    quantized to an NF4Linear with blocksize / double_quant), or "int4" / "int3" / "int2" (QA-LoRA with
    group_size, nn.Linear only). Every target is checked and every replacement built before the model
    changes: on any error the model is left untouched. A targeted IntLinear (e.g. from
    pyllmops.models.from_pretrained(quantize="int4")) keeps its INT base and gets a QALoRALinear adapter.
    Returns the model.

    Example:
        >>> apply_lora(model, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], quantize="nf4")
        >>> apply_lora(model, r=16, alpha=32, target_modules="all-linear")
        >>> apply_lora(model, r=8, target_modules=r".*\.layers\.[01]\..*_proj")   # regex on full names
    """
    _check_rank_alpha(r, alpha, dropout)
    if quantize not in (None, "nf4", "int4", "int3", "int2"):
        raise ValueError(f"quantize must be None, 'nf4', 'int4', 'int3' or 'int2', got {quantize!r}")
    bits = _int_bits(quantize)
    if bits is not None and group_size not in INT_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(INT_GROUP_SIZES)}, got {group_size!r}")
    matches = match_target_modules(model, target_modules)
    if not matches:
        linears = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"no nn.Linear matches target_modules={target_modules!r}; linear layers (nn.Linear, "
                         f"NF4Linear, bitsandbytes Linear4bit): {linears[:10]}")
    # 1. validate every target (no quantization yet, nothing changed)
    for name, mod in matches:
        if isinstance(mod, _ADAPTERS):
            raise ValueError(f"{name} already has an adapter")
        if isinstance(mod, IntLinear):  # an INT base already: QA-LoRA on it, whatever quantize says
            continue
        if bits is not None:
            if not isinstance(mod, nn.Linear) or type(mod).__module__.startswith("bitsandbytes"):
                raise TypeError(f"{name}: quantize={quantize!r} needs a dense nn.Linear, got {type(mod).__name__}")
            if mod.in_features % group_size:
                raise ValueError(f"{name}: group_size {group_size} does not divide in_features {mod.in_features}")
        else:
            from pyllmops.integrations import bnb as bnb_interop

            if bnb_interop.is_linear4bit(mod):
                bnb_interop.nf4_from_linear4bit(mod, name)  # raises on fp4 / the CPU-only packed layout
            elif type(mod).__module__.startswith("bitsandbytes"):
                raise TypeError(f"{name}: {type(mod).__name__} is not supported (nn.Linear, NF4Linear or "
                                f"bitsandbytes Linear4bit nf4)")
    # 2. build every replacement (may still fail: still nothing changed)
    new_modules = []
    for name, mod in matches:
        if isinstance(mod, IntLinear):
            new = QALoRALinear(mod.qweight, mod.scales, mod.zeros, mod.bits, mod.group_size, mod.bias, r, alpha,
                               dropout)
        elif bits is not None:
            new = QALoRALinear.from_linear(mod, bits, group_size, r, alpha, dropout)
        else:
            new = LoRALinear(_lora_base(name, mod, quantize, blocksize, double_quant), r, alpha, dropout, use_rslora)
        new_modules.append((name, new))
    # 3. swap them in
    for name, new in new_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith("lora_A") or pname.endswith("lora_B"))
    model._pyllmops_lora_config = dict(r=r, alpha=alpha, dropout=float(dropout), use_rslora=bool(use_rslora),
                                       target_modules=sorted(n for n, _ in matches), quantize=quantize)
    return model
