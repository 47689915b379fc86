"""Drop-in modules built on pyllmops' ops."""
from pyllmops.nn.nf4 import NF4Linear
from pyllmops.nn import functional  # noqa: F401
from pyllmops.nn.attention import MultiHeadAttention
from pyllmops.nn.rotary import RotaryEmbedding, apply_rotary
from pyllmops.nn.lora import (IntLinear, LoRALinear, QALoRALinear, adapter_state_dict, disable_adapters,
                              load_adapter_state_dict)

__all__ = ["NF4Linear", "MultiHeadAttention", "RotaryEmbedding", "apply_rotary", "functional",
           "LoRALinear", "QALoRALinear", "IntLinear", "adapter_state_dict", "load_adapter_state_dict",
           "disable_adapters"]
