"""A small Llama / Mistral-style decoder on pyllmops' kernels, and batched generation on the paged KV cache."""
from pyllmops.models.decoder import PROJECTIONS, Decoder, DecoderConfig, RMSNorm, merge_adapters
from pyllmops.models.generate import generate, generate_recompute, sample_next

__all__ = ["PROJECTIONS", "Decoder", "DecoderConfig", "RMSNorm", "merge_adapters", "generate", "generate_recompute",
           "sample_next"]
