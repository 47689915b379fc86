"""pyllmops: fast, exact kernels for fine-tuning, aligning and serving LLMs.

Functional API (this module), modules (pyllmops.nn), references (pyllmops.reference).
"""
__version__ = "0.1.0"

from pyllmops import ops  # noqa: F401  (registers torch.ops.pyllmops.*)
from pyllmops import nn  # noqa: F401
from pyllmops._ext import build_info
from pyllmops.ops.nf4 import NF4State, dequantize_nf4, nf4_linear, quantize_nf4
from pyllmops.ops.attention import flash_attention, flash_attention_varlen
from pyllmops.ops.paged import OutOfBlocksError, PagedKVCache, paged_attention, reshape_and_cache
from pyllmops.ops._common import check_kernel_errors
from pyllmops.ops.lora import (dequantize_int, int_linear, lora_linear, qalora_linear, qlora_linear,
                               quantize_int)
from pyllmops.nn.lora import apply_lora

__all__ = ["NF4State", "quantize_nf4", "dequantize_nf4", "nf4_linear", "build_info", "__version__",
           "flash_attention", "flash_attention_varlen",
           "PagedKVCache", "OutOfBlocksError", "paged_attention", "reshape_and_cache", "check_kernel_errors",
           "lora_linear", "qlora_linear", "qalora_linear", "int_linear", "quantize_int", "dequantize_int",
           "apply_lora", "patch", "save_adapter", "load_adapter",
           "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

_LAZY = {"patch": "pyllmops.integrations.patch", "save_adapter": "pyllmops.integrations.adapters",
         "load_adapter": "pyllmops.integrations.adapters", "flash_attn_func": "pyllmops.flash_attn",
         "flash_attn_varlen_func": "pyllmops.flash_attn", "flash_attn_with_kvcache": "pyllmops.flash_attn"}


def __getattr__(name):
    """pyllmops.models (Decoder, generate), pyllmops.train (sft, dpo, dpo_loss), patch, save_adapter,
    load_adapter and the FlashAttention-2 signatures (flash_attn_func, ...) load on first use, so
    `import pyllmops` stays light (the loops bring safetensors and tqdm)."""
    if name in ("models", "train"):
        import importlib

        return importlib.import_module(f"pyllmops.{name}")
    if name in _LAZY:  # integrations (transformers / peft / bitsandbytes are imported only when used)
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyllmops' has no attribute {name!r}")
