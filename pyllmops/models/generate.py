"""Batched generation on the paged KV cache.

One prefill pass writes every prompt's keys and values into a PagedKVCache (reshape_and_cache) and
attends with paged_attention's multi-token queries (cu_seqlens_q); then each decode step feeds one
token per live sequence and attends with paged_attention's decode kernel. Finished sequences (a stop
token, or max_new_tokens) leave the batch and free their blocks.
"""
import math

import torch

from pyllmops.models.decoder import Packed, cu_seqlens_from_lengths, positions_from_lengths
from pyllmops.ops._common import check_int
from pyllmops.ops.paged import PagedKVCache


def _check_prompts(prompts, vocab_size):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompts[{i}] must hold ints in [0, {vocab_size}), got {ids[:8]}...")
        out.append(ids)
    return out


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next tokens (n,) from logits (n, vocab): argmax when temperature == 0; otherwise a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most likely
    tokens whose probabilities sum to >= top_p; the most likely token is always kept), renormalized."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # shifted by the row max first, so a tiny temperature cannot overflow float32 (the softmax is the same)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator, CUDA logits
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=32, *, temperature=0.0, top_p=1.0, stop_tokens=(), generator=None,
             block_size=16, cache_dtype=None):
    """Continues each prompt with up to max_new_tokens tokens, all prompts in one batch.

    Args:
        model: a pyllmops.models.Decoder (adapters, NF4 bases and all), or a transformers causal LM: then
            its own generate() runs (left-padded batch, its KV cache, the model's attention implementation,
            e.g. "pyllmops" after pyllmops.patch) with the same arguments and the same return value.
            Anything else: TypeError.
        prompts: list of token-id lists (or 1-D tensors), lengths may differ.
        max_new_tokens: int >= 1.
        temperature: 0 -> greedy; > 0 -> sampling from softmax(logits / temperature).
        top_p: nucleus sampling mass in (0, 1] (used when temperature > 0).
        stop_tokens: ids that end a sequence (the stop token is included in its output).
        generator: torch.Generator for sampling (reproducible draws).
        block_size: KV cache block size (power of two in [8, 256]).
        cache_dtype: default float32 on CPU, bfloat16 on CUDA.

    Returns:
        list of lists of new token ids, one per prompt.

    Example:
        >>> out = generate(model, [tok.encode("upper: abc\\n", bos=True)], max_new_tokens=8,
        ...                stop_tokens=[tok.eos_id])
    """
    from pyllmops.models.decoder import Decoder

    hf = _is_transformers_lm(model)
    if not hf and not isinstance(model, Decoder):
        raise TypeError(f"model must be a pyllmops.models.Decoder or a transformers causal LM (with .generate), got "
                        f"{type(model).__name__}")
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size)
    check_int("max_new_tokens", max_new_tokens, min_value=1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__} {top_p!r}")
    if not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    stop = set(int(t) for t in stop_tokens)
    if hf:
        return _generate_transformers(model, prompts, max_new_tokens, temperature, top_p, stop, generator)
    device = model.device
    dtype = cache_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = len(prompts)
    num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts) + 1
    cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype,
                         device=device, sliding_window=cfg.sliding_window)
    was_training = model.training
    model.eval()
    try:
        seqs = [cache.add_sequence() for _ in range(n)]
        lengths = [len(p) for p in prompts]
        # ---- prefill: all prompts packed, multi-token paged attention ----
        slots = cache.allocate_slots(seqs, lengths)
        ctx = Packed(positions_from_lengths(lengths, device), cu_seqlens_from_lengths(lengths, device), max(lengths),
                     cache=cache, slots=slots, block_tables=cache.block_tables(seqs), seq_lens=cache.seq_lens(seqs))
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        logits = model.run(ids, ctx)
        last = ctx.cu_seqlens[1:].long() - 1
        next_tok = sample_next(logits[last], temperature, top_p, generator).tolist()
        outputs = [[] for _ in range(n)]
        live = list(range(n))
        while True:
            still = []
            for i, t in zip(live, next_tok):
                outputs[i].append(t)
                if t in stop or len(outputs[i]) >= max_new_tokens:
                    cache.free(seqs[i])
                else:
                    still.append((i, t))
            if not still:
                break
            live = [i for i, _ in still]
            ids = torch.tensor([t for _, t in still], dtype=torch.long, device=device)
            ids_seq = [seqs[i] for i in live]
            positions = [cache.seq_len(s) for s in ids_seq]
            slots = cache.allocate_slots(ids_seq, 1)
            ctx = Packed(torch.tensor(positions, dtype=torch.long, device=device), None, 1, cache=cache, slots=slots,
                         block_tables=cache.block_tables(ids_seq), seq_lens=cache.seq_lens(ids_seq), decode=True)
            next_tok = sample_next(model.run(ids, ctx), temperature, top_p, generator).tolist()
        return outputs
    finally:
        model.train(was_training)


def _is_transformers_lm(model):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return callable(getattr(model, "generate", None)) and any(isinstance(m, PreTrainedModel) for m in model.modules())


def _generate_transformers(model, prompts, max_new_tokens, temperature, top_p, stop, generator):
    """generate() for a transformers model: one left-padded batch through model.generate."""
    device = next(model.parameters()).device
    n, longest = len(prompts), max(len(p) for p in prompts)
    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    ids = torch.full((n, longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros(n, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad,
              eos_token_id=sorted(stop) or None)
    if temperature > 0:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if generator is not None and temperature > 0:  # reproducible draws from the caller's generator
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    finally:
        model.train(was_training)
    outputs = []
    for row in out[:, longest:].tolist():
        new = []
        for t in row:
            new.append(t)
            if t in stop:
                break
        outputs.append(new[:max_new_tokens])
    return outputs


@torch.no_grad()
def generate_recompute(model, prompts, max_new_tokens=32, *, stop_tokens=()):
    """Greedy generation by full recomputation (no cache): each step runs the whole sequence through
    model.forward. The oracle generate() is tested against; O(n^2), for tests and checks only."""
    prompts = _check_prompts(prompts, model.config.vocab_size)
    check_int("max_new_tokens", max_new_tokens, min_value=1)
    stop = set(int(t) for t in stop_tokens)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for p in prompts:
            seq, out = list(p), []
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([seq], dtype=torch.long, device=model.device))
                t = int(logits[0, -1].argmax())
                out.append(t)
                seq.append(t)
                if t in stop:
                    break
            outputs.append(out)
        return outputs
    finally:
        model.train(was_training)
