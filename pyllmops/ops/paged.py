"""Paged KV cache (vLLM-style block tables) and paged attention: decode and multi-token queries,
split-KV with an LSE merge, GQA, sliding window.

Ops (torch.ops.pyllmops.*), in the order: schema + kernel, fake:
  reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> ()     # mutates the caches
  paged_copy_blocks(caches, pairs) -> ()                                        # copy-on-write copies
  paged_attention(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale,
                  softcap, window_left, max_seqlen_q, num_splits) -> out
No autograd: these are inference ops (the cache is written, not differentiated).
Public API: paged_attention, reshape_and_cache, PagedKVCache, OutOfBlocksError, plan_num_splits,
check_kernel_errors. Kernel design and numbers: csrc/paged/paged.h, docs/paged.md.

Validation. CPU metadata (block tables, seq_lens, cu_seqlens_q, slots) is checked here before any
kernel runs, and again in C++. CUDA metadata lives on the device, and checking it here would need a
host synchronization (which breaks CUDA-graph capture of decode steps), so by default the CUDA
kernels bounds-check it themselves: they never read outside the cache, skip what is out of range,
write NaN to the affected attention rows and raise a bit in a per-device error word that
check_kernel_errors() reads (and that validate=True checks eagerly, with a sync, before the launch).
"""
import math
import struct
from typing import Optional

import torch

from pyllmops._ext import lib
from pyllmops.ops._common import (FLOAT_DTYPES, check_bool, check_int, check_tensor, empty, error_word, on_cuda,
                                  opt_view, register_error_word, stream, view)
from pyllmops.ops._common import check_kernel_errors  # noqa: F401  (documented here; covers every family)

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256   # csrc/paged/paged.h
MAX_HEAD_DIM = 256
MAX_SPLITS = 64
ROW_TILE = 8
CTAS_PER_SM = 4  # csrc/paged/paged_cuda.cu min_ctas_per_sm: resident attention CTAs per SM (static, sm_90a)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
_ERR_BITS = {1: "a block-table entry some query can see is outside [0, num_blocks)",
             2: "a seq_len is negative, beyond the block table's capacity, or smaller than its number of queries",
             4: "a reshape_and_cache slot is outside [-1, num_blocks * block_size)"}


class OutOfBlocksError(RuntimeError):
    """The KV cache has too few free blocks for the request; the cache is left exactly as it was."""


# ================================ CUDA error word ================================
def _describe_errors(entries):
    what = "; ".join(msg for b, msg in _ERR_BITS.items() if entries[0] & b)
    return f"paged kernels skipped out-of-range metadata: {what}"


register_error_word("paged", 1, _describe_errors)


def _error_word(device):
    """Per-device int32 word the paged CUDA kernels raise error bits in (None on the CPU)."""
    return error_word("paged", device)


# ================================ torch.library ops ================================
@torch.library.custom_op("pyllmops::reshape_and_cache", mutates_args=("key_cache", "value_cache"),
                         device_types=("cpu", "cuda"))
def _reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    lib().paged_reshape_and_cache(view(key.contiguous()), view(value.contiguous()), view(key_cache),
                                  view(value_cache), view(slot_mapping.contiguous()),
                                  opt_view(_error_word(key.device)), stream(key))


@_reshape_and_cache.register_fake
def _(key, value, key_cache, value_cache, slot_mapping):
    return None


@torch.library.custom_op("pyllmops::paged_copy_blocks", mutates_args=("caches",), device_types=("cpu", "cuda"))
def _paged_copy_blocks(caches: torch.Tensor, pairs: torch.Tensor) -> None:
    lib().paged_copy_blocks(view(caches), view(pairs.contiguous()), stream(caches))


@_paged_copy_blocks.register_fake
def _(caches, pairs):
    return None


@torch.library.custom_op("pyllmops::paged_attention", mutates_args=(), device_types=("cpu", "cuda"))
def _paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], softmax_scale: float,
                     softcap: float, window_left: int, max_seqlen_q: int, num_splits: int) -> torch.Tensor:
    q = q.contiguous()
    out = empty(q.shape, q.dtype, q.device)
    part_out = part_ml = None
    if num_splits > 1:  # split-KV workspaces: torch's (caching) allocator, never the kernel's
        part_out = empty((num_splits, *q.shape), torch.float32, q.device)
        part_ml = empty((num_splits, q.shape[0], q.shape[1], 2), torch.float32, q.device)  # each split's (m, l)
    lib().paged_attention(view(q), view(key_cache), view(value_cache), view(block_tables.contiguous()),
                          view(seq_lens.contiguous()), opt_view(None if cu_seqlens_q is None else
                                                                cu_seqlens_q.contiguous()),
                          view(out), opt_view(part_out), opt_view(part_ml), opt_view(_error_word(q.device)),
                          float(softmax_scale), float(softcap), window_left, max_seqlen_q, num_splits, stream(q))
    return out


@_paged_attention.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, softmax_scale, softcap, window_left,
      max_seqlen_q, num_splits):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ================================ planning ================================
_sm_counts = {}


def _parallel_units(device):
    """Streaming multiprocessors on CUDA (host-side property, cached), threads on the CPU."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _sm_counts:
            _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return _sm_counts[idx]
    return lib().num_threads()


def plan_num_splits(num_seqs, num_kv_heads, group, max_seqlen_q, max_keys, block_size, device):
    """Split-KV count from host-side sizes only (deterministic for a shape; no sync).

    Work items without splitting: num_seqs * num_kv_heads * row tiles. When they cannot fill the
    device (CTAS_PER_SM resident CTAs per SM on CUDA, the attention kernel's __launch_bounds__
    occupancy; 2 per thread on the CPU), each sequence's visible keys are cut
    into up to 64 splits of at least 256 keys on CUDA, 2048 on the CPU (and at least one block),
    merged afterwards.
    max_keys: an upper bound on the keys one row tile can see (the block table's capacity, or the
    window plus the queries).
    """
    row_tiles = -(-max_seqlen_q * group // ROW_TILE)
    items = num_seqs * num_kv_heads * row_tiles
    device = torch.device(device)
    target = (CTAS_PER_SM if device.type == "cuda" else 2) * _parallel_units(device)
    if items == 0 or items >= target or max_keys <= 0:
        return 1
    by_work = -(-target // items)
    # keys per split: 256 on CUDA; 2048 on the CPU, where a split costs a thread start (tens of us) and
    # a merge, and 2048 keys of a 128-dim fp32 head are ~2 MB of K/V (~200 us of memory traffic)
    min_keys = 2048 if device.type == "cpu" else 256
    by_len = max(1, min(max_keys // min_keys, -(-max_keys // block_size)))
    return max(1, min(by_work, by_len, MAX_SPLITS))


# ================================ validation ================================
def _check_cache(key_cache, value_cache, dtypes=FLOAT_DTYPES):
    check_tensor("key_cache", key_cache, dtypes=dtypes, dim=4)
    check_tensor("value_cache", value_cache, dtypes=(key_cache.dtype,), dim=4, device=key_cache.device)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache has shape {tuple(value_cache.shape)}, expected key_cache's "
                         f"{tuple(key_cache.shape)} [num_blocks, block_size, num_kv_heads, head_dim]")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]")
    bs, d = key_cache.shape[1], key_cache.shape[3]
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise ValueError(f"block_size (key_cache.shape[1]) must be a power of two in [{MIN_BLOCK_SIZE}, "
                         f"{MAX_BLOCK_SIZE}], got {bs}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (key_cache.shape[3]) must be in [1, {MAX_HEAD_DIM}], got {d}")
    if key_cache.shape[2] < 1:
        raise ValueError(f"num_kv_heads (key_cache.shape[2]) must be >= 1, got {key_cache.shape[2]}")


_F32_MAX = float(torch.finfo(torch.float32).max)
_LOG2E = 1.4426950408889634


def _f32(x):
    """x rounded to float32 (the C cast the kernels see), as a Python float (inf when it overflows)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _check_scales(softmax_scale, softcap, head_dim):
    """softmax_scale (default 1/sqrt(head_dim)) and softcap (0 = off) as the kernels will use them: positive
    and finite after the cast to float32, and so are softmax_scale * log2(e) and softmax_scale / softcap."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    for name, v in (("softmax_scale", softmax_scale), ("softcap", softcap)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__} {v!r}")
    softmax_scale, softcap = float(softmax_scale), float(softcap)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0 and 0 < _f32(softmax_scale) < math.inf
            and _f32(softmax_scale * _LOG2E) < math.inf):
        raise ValueError(f"softmax_scale must be positive and finite in float32 (0 < softmax_scale <= "
                         f"{_F32_MAX / _LOG2E:.3g}, not rounding to 0), got {softmax_scale}")
    if softcap != 0.0:
        if not (math.isfinite(softcap) and softcap > 0 and 0 < _f32(softcap) < math.inf):
            raise ValueError(f"softcap must be 0 (off) or positive and finite in float32, got {softcap}")
        ratio = softmax_scale / softcap
        if not 0 < _f32(ratio) < math.inf:
            raise ValueError(f"softmax_scale / softcap must be positive and finite in float32, got "
                             f"{softmax_scale} / {softcap} = {ratio}")
    return softmax_scale, softcap


def _validate_metadata(block_tables, seq_lens, cu_seqlens_q, q_lens, total_q, num_blocks, block_size, window_left,
                       max_seqlen_q):
    """Checks the metadata values (syncs on CUDA): what the C++ CPU path re-checks."""
    n, max_blocks = block_tables.shape
    if n == 0:
        return
    cap = max_blocks * block_size
    lens = seq_lens.long()
    bad = ((lens < 0) | (lens > cap)).nonzero()
    if bad.numel():
        i = bad[0, 0].item()
        raise ValueError(f"seq_lens[{i}] = {lens[i].item()} is outside [0, {cap}] (block_tables holds {max_blocks} "
                         f"blocks of {block_size} per sequence)")
    if cu_seqlens_q is not None:
        cu = cu_seqlens_q.long()
        if cu[0].item() != 0 or cu[-1].item() != total_q:
            raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q={total_q} (q.shape[0]), got "
                             f"{cu.tolist()[:16]}")
        if (q_lens < 0).any():
            raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cu.tolist()[:16]}")
        if q_lens.max().item() > max_seqlen_q:
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} but a sequence has {q_lens.max().item()} queries")
    short = (q_lens > lens).nonzero()
    if short.numel():
        i = short[0, 0].item()
        raise ValueError(f"sequence {i} has {q_lens[i].item()} queries but seq_lens[{i}] = {lens[i].item()}; the "
                         f"queries are the last positions of the sequence, so q_len <= seq_len")
    # Table entries some query can see: blocks [first_key // bs, ceil(seq_len / bs)).
    first_pos = lens - q_lens
    first_key = (first_pos - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(lens)
    idx = torch.arange(max_blocks, device=block_tables.device)
    seen = (idx >= (first_key // block_size)[:, None]) & (idx < ((lens + block_size - 1) // block_size)[:, None])
    seen &= (q_lens > 0)[:, None]
    bad = (seen & ((block_tables < 0) | (block_tables >= num_blocks))).nonzero()
    if bad.numel():
        s, b = bad[0].tolist()
        raise ValueError(f"block_tables[{s}, {b}] = {block_tables[s, b].item()} is outside [0, {num_blocks}) "
                         f"(the cache has {num_blocks} blocks) and sequence {s} reads it")


# ================================ public API ================================
def paged_attention(q, key_cache, value_cache, block_tables, seq_lens, *, softmax_scale=None, softcap=0.0,
                    window_left=-1, cu_seqlens_q=None, max_seqlen_q=None, num_splits=None, validate=None):
    """Attention of new queries over a paged KV cache.

    Args:
        q: decode: (num_seqs, heads_q, head_dim), one query per sequence at position seq_len - 1;
            multi-token: (total_q, heads_q, head_dim) packed, with cu_seqlens_q.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype
            (float16/bfloat16 on CUDA; float32/bfloat16/float16 on the CPU); block_size a power of two
            in [8, 256]; head_dim <= 256; heads_q a multiple of num_kv_heads (GQA).
        block_tables: int32 [num_seqs, max_blocks]; entries nobody can see (beyond seq_len, or wholly
            outside the window) are not read and may be anything (e.g. -1).
        seq_lens: int32 [num_seqs], keys per sequence (already written with reshape_and_cache).
        softmax_scale: default 1 / sqrt(head_dim); positive and finite in float32 (huge scales are
            fine: scores are never scaled before the max is subtracted, so 1e38 gives the hard max).
        softcap: logit softcap (Gemma 2): scores become softcap * tanh(softmax_scale * q.k / softcap)
            before the mask and softmax; 0 (default) is off.
        window_left: -1, or w >= 0: a query at position p sees keys max(0, p - w) .. p. Blocks wholly
            outside every query's window are not read. A window at least the block table's capacity
            is unbounded (the same as -1).
        cu_seqlens_q: int32 [num_seqs + 1] offsets of each sequence's queries in q (multi-token
            queries: chunked prefill, speculative verification); the queries of a sequence are its
            last q_len positions, causal.
        max_seqlen_q: the largest q_len (host int in [1, total_q]; sizes the launch). Default: read from
            cu_seqlens_q when it is on the CPU; on CUDA, total_q (correct, but launches idle row tiles;
            pass it).
        num_splits: split-KV count (1..64); default plan_num_splits (host-side sizes only).
        validate: check block tables / seq_lens / cu_seqlens_q values here with torch ops before the
            launch. Default False: CPU metadata is always checked by the C++ layer before its kernel
            runs (the same ValueErrors, without ~15 small torch ops per call); on CUDA the kernel
            bounds-checks instead (see check_kernel_errors). True on CUDA checks eagerly (synchronizes).

    Returns:
        out, q's shape and dtype. A query that sees no key gets 0. NaN / inf in q, K or V reach exactly
        the output rows that see them (as in float64; docs/paged.md "NaN policy").

    Example:
        >>> cache = pyllmops.PagedKVCache(1, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64,
        ...                               dtype=torch.bfloat16, device="cuda")
        >>> seq = cache.add_sequence()
        >>> slots = cache.allocate_slots([seq], 100)              # prefill 100 tokens
        >>> cache.write(0, k, v, slots)                           # k, v: (100, 2, 64)
        >>> out = pyllmops.paged_attention(q, cache.key_cache[0], cache.value_cache[0],
        ...                                cache.block_tables([seq]), cache.seq_lens([seq]),
        ...                                cu_seqlens_q=torch.tensor([0, 100], dtype=torch.int32, device="cuda"),
        ...                                max_seqlen_q=100)      # q: (100, 8, 64)
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    dev = q.device
    _check_cache(key_cache, value_cache)
    if key_cache.device != dev:
        raise ValueError(f"key_cache is on {key_cache.device}, expected {dev} (q's device)")
    if on_cuda(dev) and q.dtype not in CUDA_DTYPES:
        raise ValueError(f"q must be float16 or bfloat16 on CUDA, got {q.dtype}")
    if key_cache.dtype != q.dtype:
        raise ValueError(f"key_cache has dtype {key_cache.dtype}, expected q's dtype {q.dtype}")
    num_blocks, block_size, heads_kv, head_dim = key_cache.shape
    total_q, heads_q, qd = q.shape
    if qd != head_dim:
        raise ValueError(f"q has head_dim {qd}, expected the cache's head_dim {head_dim}")
    if heads_q % heads_kv:
        raise ValueError(f"q has {heads_q} heads, expected a multiple of num_kv_heads={heads_kv} (GQA)")
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), dim=2, device=dev)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), dim=1, device=dev)
    num_seqs = block_tables.shape[0]
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, expected one per block_tables row ({num_seqs})")
    check_int("window_left", window_left, min_value=-1)
    if window_left >= block_tables.shape[1] * block_size:
        window_left = -1  # no key position reaches it: unbounded (and no int64 overflow downstream)
    softmax_scale, softcap = _check_scales(softmax_scale, softcap, head_dim)
    if cu_seqlens_q is None:
        if total_q != num_seqs:
            raise ValueError(f"decode takes one query per sequence: q has {total_q} rows but there are {num_seqs} "
                             f"sequences (pass cu_seqlens_q for multi-token queries)")
        if max_seqlen_q not in (None, 1):
            raise ValueError(f"max_seqlen_q must be 1 (or None) for decode, got {max_seqlen_q}")
        max_seqlen_q = 1
    else:
        check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,), dim=1, device=dev)
        if cu_seqlens_q.shape[0] != num_seqs + 1:
            raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected num_seqs + 1 = "
                             f"{num_seqs + 1}")
        if max_seqlen_q is None:  # on CUDA, reading the sizes would synchronize: use the bound total_q
            max_seqlen_q = min(max(int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()), 1), max(total_q, 1)) if (
                not on_cuda(dev) and num_seqs) else max(total_q, 1)  # (malformed offsets: validation names them)
        check_int("max_seqlen_q", max_seqlen_q, min_value=1)
        if max_seqlen_q > max(total_q, 1):
            raise ValueError(f"max_seqlen_q must be in [1, total_q={max(total_q, 1)}] (no sequence has more queries "
                             f"than q has rows), got {max_seqlen_q}")
    if validate is None:
        validate = False  # CPU: the C++ layer checks every value below before its kernel runs (cheaply)
    check_bool("validate", validate)
    if validate:
        q_lens = (torch.ones(num_seqs, dtype=torch.long, device=dev) if cu_seqlens_q is None
                  else (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long())
        _validate_metadata(block_tables, seq_lens, cu_seqlens_q, q_lens, total_q, num_blocks, block_size,
                           window_left, max_seqlen_q)
    if on_cuda(dev) and -(-max_seqlen_q * (heads_q // heads_kv) // ROW_TILE) > 65535:
        raise ValueError(f"max_seqlen_q * heads_q / num_kv_heads = {max_seqlen_q * heads_q // heads_kv} is too "
                         f"large for one launch (at most {65535 * ROW_TILE}); use flash attention for prefill")
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        if window_left >= 0:
            max_keys = min(max_keys, window_left + ROW_TILE + block_size)
        num_splits = plan_num_splits(num_seqs, heads_kv, heads_q // heads_kv, max_seqlen_q, max_keys, block_size, dev)
    check_int("num_splits", num_splits, min_value=1)
    if num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return torch.ops.pyllmops.paged_attention(q, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
                                              softmax_scale, softcap, window_left, max_seqlen_q, num_splits)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *, validate=None):
    """Writes new tokens' K and V into their cache slots (slot = block * block_size + offset).

    Args:
        key, value: (num_tokens, num_kv_heads, head_dim), the caches' dtype.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], written in place.
        slot_mapping: int64 (num_tokens,); -1 skips a token (padding). Slots outside
            [-1, num_blocks * block_size) raise ValueError (CPU, or CUDA with validate=True) or, on CUDA
            by default, are skipped and reported by check_kernel_errors() (no host sync). Two tokens
            may not share a slot (which one wins would depend on thread timing): ValueError on the
            CPU and with validate=True on CUDA (checking device-resident slots by default would
            synchronize).

    key_cache and value_cache must not share memory, nor key / value with either cache (ValueError).
    """
    _check_cache(key_cache, value_cache)
    dev = key_cache.device
    n_blocks, block_size, heads_kv, head_dim = key_cache.shape
    check_tensor("key", key, dtypes=(key_cache.dtype,), dim=3, device=dev)
    check_tensor("value", value, dtypes=(key_cache.dtype,), dim=3, device=dev)
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape[1:]) != (heads_kv, head_dim):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (num_tokens, {heads_kv}, {head_dim})")
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"value has {value.shape[0]} tokens but key has {key.shape[0]}")
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), dim=1, device=dev)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries, expected one per token ({key.shape[0]})")
    if validate is None:
        validate = not on_cuda(dev)
    check_bool("validate", validate)
    if _overlap(key_cache, value_cache):
        raise ValueError("key_cache and value_cache share memory (the values would overwrite the keys); pass two "
                         "separate caches")
    for name, t in (("key", key), ("value", value)):
        if _overlap(t, key_cache) or _overlap(t, value_cache):
            raise ValueError(f"{name} shares memory with a cache it is written into; pass a separate tensor")
    if validate and slot_mapping.numel():
        bad = ((slot_mapping < -1) | (slot_mapping >= n_blocks * block_size)).nonzero()
        if bad.numel():
            i = bad[0, 0].item()
            raise ValueError(f"slot_mapping[{i}] = {slot_mapping[i].item()} is outside [-1, "
                             f"{n_blocks * block_size}) (num_blocks * block_size; -1 skips a token)")
        used = slot_mapping[slot_mapping >= 0]
        uniq, counts = torch.unique(used, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][0].item()
            where = (slot_mapping == dup).nonzero()[:2, 0].tolist()
            raise ValueError(f"slot_mapping has duplicate slot {dup} (tokens {where[0]} and {where[1]}); each slot "
                             f"may be written by one token (-1 skips a token)")
    torch.ops.pyllmops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def _overlap(a, b):
    """Whether the memory spans of two tensors overlap (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    span = (lambda t: (t.data_ptr(), t.data_ptr() + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
                       * t.element_size()))
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ================================ cache + block manager ================================
class _Seq:
    __slots__ = ("blocks", "length")

    def __init__(self, blocks, length):
        self.blocks, self.length = blocks, length  # blocks: physical ids, -1 where released (window)


class PagedKVCache:
    """Per-layer paged K/V pools plus a block manager (free list, reference counts, copy-on-write).

    key_cache[layer], value_cache[layer]: [num_blocks, block_size, num_kv_heads, head_dim] views of one
    storage tensor [num_layers, 2, num_blocks, ...], so one kernel copies a block in every layer.

    Manager: add_sequence() -> id; allocate_slots(ids, num_tokens) -> int64 slots for the new tokens
    (blocks allocated on demand; a shared partial last block is copied first, in every layer: copy
    on write); fork(id) -> new id sharing all blocks; free(id); block_tables(ids) -> int32
    [n, max_blocks] (-1 past the end and for released blocks); seq_lens(ids) -> int32 [n];
    num_free_blocks. Running out raises OutOfBlocksError and changes nothing. With
    sliding_window=w (attention window_left), blocks wholly before every future query's window
    (position < length - w) are released as sequences grow.

    Example:
        >>> cache = PagedKVCache(2, 128, 16, 4, 64, dtype=torch.float32, device="cpu")
        >>> a = cache.add_sequence(); slots = cache.allocate_slots([a], 20)
        >>> for layer in range(2): cache.write(layer, k[layer], v[layer], slots)
        >>> b = cache.fork(a)                         # shares a's blocks
        >>> cache.allocate_slots([b], 1)               # copies the shared partial block first
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, *, dtype, device,
                 sliding_window=None):
        check_int("num_layers", num_layers, min_value=1)
        check_int("num_blocks", num_blocks, min_value=1)
        check_int("block_size", block_size, min_value=MIN_BLOCK_SIZE)
        if block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], "
                             f"got {block_size}")
        check_int("num_kv_heads", num_kv_heads, min_value=1)
        check_int("head_dim", head_dim, min_value=1)
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {head_dim}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if sliding_window is not None:
            check_int("sliding_window", sliding_window, min_value=0)
        elems = num_layers * 2 * num_blocks * block_size * num_kv_heads * head_dim
        if elems * torch.empty(0, dtype=dtype).element_size() >= 2**63:
            raise ValueError(f"num_blocks={num_blocks} is too large: the cache would hold {elems} elements "
                             f"(num_layers * 2 * num_blocks * block_size * num_kv_heads * head_dim), beyond int64 "
                             f"byte offsets")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.sliding_window = sliding_window
        self.storage = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype,
                                   device=self.device)
        self.key_cache = [self.storage[i, 0] for i in range(num_layers)]
        self.value_cache = [self.storage[i, 1] for i in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._ref = [0] * num_blocks
        self._seqs = {}
        self._next_id = 0

    # ---- queries ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self):
        return len(self._free)

    def _seq(self, seq_id):
        if seq_id not in self._seqs:
            raise KeyError(f"unknown sequence id {seq_id!r} (live: {sorted(self._seqs)[:16]})")
        return self._seqs[seq_id]

    def seq_len(self, seq_id):
        return self._seq(seq_id).length

    def blocks(self, seq_id):
        """Physical block ids of a sequence (-1 where a block was released by the window)."""
        return list(self._seq(seq_id).blocks)

    def block_tables(self, seq_ids, max_blocks=None):
        seqs = [self._seq(s) for s in seq_ids]
        width = max([len(s.blocks) for s in seqs] + [1])
        if max_blocks is not None:
            check_int("max_blocks", max_blocks, min_value=1)
            if max_blocks < width:
                raise ValueError(f"max_blocks={max_blocks} is smaller than the longest table ({width})")
            width = max_blocks
        rows = [s.blocks + [-1] * (width - len(s.blocks)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.device)

    def seq_lens(self, seq_ids):
        return torch.tensor([self._seq(s).length for s in seq_ids], dtype=torch.int32).to(self.device)

    # ---- manager ----------------------------------------------------------------------------
    def add_sequence(self):
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq([], 0)
        return sid

    def fork(self, seq_id):
        src = self._seq(seq_id)
        sid = self.add_sequence()
        self._seqs[sid] = _Seq(list(src.blocks), src.length)
        for b in src.blocks:
            if b >= 0:
                self._ref[b] += 1
        return sid

    def free(self, seq_id):
        seq = self._seq(seq_id)
        for b in seq.blocks:
            if b >= 0:
                self._release(b)
        del self._seqs[seq_id]

    def _release(self, b):
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free.append(b)

    def _window_releasable(self, seq):
        """Logical blocks wholly before position length - w (no current or future query sees them)."""
        if self.sliding_window is None:
            return []
        end = (seq.length - self.sliding_window) // self.block_size  # blocks [0, end) are out of every window
        return [i for i in range(min(end, len(seq.blocks))) if seq.blocks[i] >= 0]

    def allocate_slots(self, seq_ids, num_tokens):
        """Reserves room for num_tokens new tokens of each sequence (an int for all, or one per id) and
        returns their int64 slots, sequence after sequence, in position order. All or nothing: on
        OutOfBlocksError nothing changed."""
        # ---- validate everything (no mutation before this block ends) ----
        if not isinstance(seq_ids, (list, tuple, range)):
            raise TypeError(f"seq_ids must be a list of sequence ids, got {type(seq_ids).__name__} {seq_ids!r}")
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        if isinstance(num_tokens, (list, tuple)):
            counts = list(num_tokens)
            if len(counts) != len(seq_ids):
                raise ValueError(f"num_tokens has {len(counts)} entries for {len(seq_ids)} sequences")
        elif isinstance(num_tokens, int) and not isinstance(num_tokens, bool):
            counts = [num_tokens] * len(seq_ids)
        else:
            raise TypeError(f"num_tokens must be an int (for every sequence) or a list of ints (one per sequence), "
                            f"got {type(num_tokens).__name__} {num_tokens!r}")
        for i, c in enumerate(counts):
            check_int(f"num_tokens[{i}]" if isinstance(num_tokens, (list, tuple)) else "num_tokens", c, min_value=0)
        seqs = [self._seq(s) for s in seq_ids]
        bs = self.block_size
        # ---- plan (no mutation) ----
        drops = {}  # block -> references dropped by window release
        for seq in seqs:
            for i in self._window_releasable(seq):
                drops[seq.blocks[i]] = drops.get(seq.blocks[i], 0) + 1
        freed = sum(1 for b, n in drops.items() if self._ref[b] == n)
        needed, cow_drops = 0, {}
        for seq, n in zip(seqs, counts):
            if n == 0:
                continue
            needed += -(-(seq.length + n) // bs) - len(seq.blocks)
            last = seq.blocks[-1] if seq.length % bs else None
            if last is not None and self._ref[last] - drops.get(last, 0) - cow_drops.get(last, 0) > 1:
                needed += 1  # copy-on-write of the shared partial last block (as the commit below does)
                cow_drops[last] = cow_drops.get(last, 0) + 1
        if needed > len(self._free) + freed:
            raise OutOfBlocksError(f"need {needed} free blocks, have {len(self._free) + freed} "
                                   f"({len(self._free)} free + {freed} released by the window) of {self.num_blocks}")
        # ---- commit ----
        for seq in seqs:
            for i in self._window_releasable(seq):
                self._release(seq.blocks[i])
                seq.blocks[i] = -1
        copies, slots = [], []
        for seq, n in zip(seqs, counts):
            if n == 0:
                continue
            if seq.length % bs and self._ref[seq.blocks[-1]] > 1:
                old, new = seq.blocks[-1], self._free.pop()
                self._ref[old] -= 1
                self._ref[new] = 1
                seq.blocks[-1] = new
                copies.append((old, new))
            while len(seq.blocks) * bs < seq.length + n:
                b = self._free.pop()
                self._ref[b] = 1
                seq.blocks.append(b)
            for pos in range(seq.length, seq.length + n):
                slots.append(seq.blocks[pos // bs] * bs + pos % bs)
            seq.length += n
        if copies:
            self.copy_blocks(copies)
        return torch.tensor(slots, dtype=torch.int64).to(self.device)

    def copy_blocks(self, pairs):
        """Copies block src -> dst in every layer's K and V pool, in one kernel launch."""
        try:
            t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"pairs must be a list of (src, dst) block ids, got {pairs!r}") from e
        if t.numel() and (t.min().item() < 0 or t.max().item() >= self.num_blocks):
            raise ValueError(f"block pairs must be in [0, {self.num_blocks}), got {pairs}")
        caches = self.storage.view(self.num_layers * 2, self.num_blocks, -1)
        torch.ops.pyllmops.paged_copy_blocks(caches, t.to(self.device))

    def write(self, layer, key, value, slots):
        """reshape_and_cache into layer `layer`."""
        check_int("layer", layer, min_value=0)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be < num_layers={self.num_layers}, got {layer}")
        reshape_and_cache(key, value, self.key_cache[layer], self.value_cache[layer], slots)
