"""A small Llama / Mistral-style decoder on pyllmops' kernels, batched generation on the paged KV cache, and
layer-by-layer loading of Hugging Face checkpoints (from_pretrained)."""
from pyllmops.models.decoder import PROJECTIONS, Decoder, DecoderConfig, RMSNorm, merge_adapters
from pyllmops.models.generate import generate, generate_recompute, sample_next
from pyllmops.models.loading import from_pretrained, save_pretrained

__all__ = ["PROJECTIONS", "Decoder", "DecoderConfig", "RMSNorm", "merge_adapters", "generate", "generate_recompute",
           "sample_next", "from_pretrained", "save_pretrained"]
