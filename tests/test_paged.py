"""Paged KV cache + paged attention against dense float64 attention over K/V gathered from the cache."""
import math
import random
import sys

import pytest
import torch

import pyllmops
from pyllmops.ops import paged as P
from pyllmops.reference import paged as ref

from conftest import CUDA, CUDA_MARKS, GPU_ONLY_MARKS, assert_close, devices, sync

TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 2e-3}  # ~10x, 5x, 10x the errors measured on the CPU kernels


def dtypes_for(device):
    return (torch.float32, torch.bfloat16, torch.float16) if device == "cpu" else (torch.float16, torch.bfloat16)


def random_cache(num_blocks, block_size, heads_kv, head_dim, dtype, device):
    k = torch.randn(num_blocks, block_size, heads_kv, head_dim, device=device).to(dtype)
    v = torch.randn(num_blocks, block_size, heads_kv, head_dim, device=device).to(dtype)
    return k, v


def shuffled_tables(seq_lens, block_size, num_blocks, device, pad=2):
    """Non-contiguous, shuffled block tables over a random permutation of the pool; -1 past the end."""
    need = [-(-L // block_size) for L in seq_lens]
    perm = torch.randperm(num_blocks).tolist()
    assert sum(need) <= num_blocks
    width = max(need + [1]) + pad
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [-1] * (width - n))
        i += n
    return torch.tensor(rows, dtype=torch.int32, device=device)


def run_case(device, dtype, seq_lens, q_lens=None, heads_kv=2, group=4, head_dim=64, block_size=16, window=-1,
             num_splits=None, scale=None, softcap=0.0):
    n_blocks = sum(-(-L // block_size) for L in seq_lens) + 3
    kc, vc = random_cache(n_blocks, block_size, heads_kv, head_dim, dtype, device)
    bt = shuffled_tables(seq_lens, block_size, n_blocks, device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    cu = None
    total = len(seq_lens)
    if q_lens is not None:
        cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
        total = sum(q_lens)
    q = torch.randn(total, heads_kv * group, head_dim, device=device).to(dtype)
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, window_left=window, num_splits=num_splits,
                                   softmax_scale=scale, softcap=softcap,
                                   max_seqlen_q=None if q_lens is None else max(max(q_lens), 1))
    want = ref.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, window_left=window, softmax_scale=scale,
                               softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape
    if device == CUDA:
        P.check_kernel_errors(device)
    assert_close(out, want, TOL[dtype])
    return out


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size,head_dim", [(8, 64), (16, 128), (128, 64)])
def test_decode(device, group, block_size, head_dim):
    for dtype in dtypes_for(device):
        run_case(device, dtype, [1, 17, 129, 300, 64], group=group, head_dim=head_dim, block_size=block_size,
                 heads_kv=2 if group < 8 else 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("window", [-1, 0, 5, 100])
def test_decode_splits_and_windows(device, num_splits, window):
    dtype = dtypes_for(device)[-1]
    run_case(device, dtype, [1000, 1, 33, 257], group=4, window=window, num_splits=num_splits)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("head_dim", [1, 17, 80, 256])
def test_odd_head_dims(device, head_dim):
    for dtype in dtypes_for(device):
        run_case(device, dtype, [5, 129], group=2, head_dim=head_dim, block_size=32, num_splits=2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("block_size", [8, 16, 256])
def test_multi_token(device, block_size):
    for dtype in dtypes_for(device):
        # chunked prefill (17 new of 129), a whole prefill (40 of 40), one query, no queries, spec verify
        run_case(device, dtype, [129, 40, 7, 20, 300], q_lens=[17, 40, 1, 0, 5], group=4, block_size=block_size)
        run_case(device, dtype, [129, 40, 7, 20, 300], q_lens=[17, 40, 1, 0, 5], group=1, block_size=block_size,
                 window=9, num_splits=3)
        # head_dim % 8 != 0: on CUDA the CUDA-core kernel (8-row tiles of several queries), not tensor cores
        run_case(device, dtype, [129, 40, 7], q_lens=[17, 40, 1], group=2, head_dim=20, block_size=block_size,
                 window=9, num_splits=2)


@pytest.mark.parametrize("device", devices())
def test_scale_and_automatic_splits(device):
    dtype = dtypes_for(device)[-1]
    # one long sequence and one kv head: too few work items, so the planner splits
    # (at least 256 keys per split on CUDA, 2048 on the CPU, where a split costs a thread start)
    n = P.plan_num_splits(1, 1, 1, 1, 5000 // 16 * 16 + 32, 16, torch.device(device))
    assert n > 1
    run_case(device, dtype, [5000], heads_kv=1, group=1, scale=0.3)


@pytest.mark.parametrize("device", devices())
def test_split_result_is_deterministic(device):
    dtype = dtypes_for(device)[-1]
    kc, vc = random_cache(40, 16, 2, 64, dtype, device)
    bt = shuffled_tables([600], 16, 40, device)
    sl = torch.tensor([600], dtype=torch.int32, device=device)
    q = torch.randn(1, 8, 64, device=device).to(dtype)
    outs = [pyllmops.paged_attention(q, kc, vc, bt, sl, num_splits=5) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_planner_is_host_side_and_bounded():
    dev = torch.device("cpu")
    assert P.plan_num_splits(4096, 8, 1, 1, 32768, 16, dev) == 1  # plenty of work items
    for keys in (1, 100, 5000, 10 ** 6):
        n = P.plan_num_splits(1, 1, 1, 1, keys, 16, dev)
        assert 1 <= n <= P.MAX_SPLITS and n == P.plan_num_splits(1, 1, 1, 1, keys, 16, dev)


# ---------------------------------------------------------------- cache + attention end to end
def dense_causal(x, wq, wk, wv, heads_q, heads_kv, d):
    t = x.shape[0]
    q = (x @ wq).view(t, heads_q, d)
    k = (x @ wk).view(t, heads_kv, d)
    v = (x @ wv).view(t, heads_kv, d)
    return ref.attention(q, k, v, softmax_scale=1 / math.sqrt(d), positions=torch.arange(t, device=x.device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("window", [None, 12])
def test_prefill_then_decode_equals_recompute(device, window):
    """One attention layer: prefill two prompts, then decode 40 steps through the cache; every step's
    output equals dense attention over the full sequence so far."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    heads_q, heads_kv, d, hidden = 8, 2, 64, 32
    wq = torch.randn(hidden, heads_q * d, device=device) / hidden ** 0.5
    wk = torch.randn(hidden, heads_kv * d, device=device) / hidden ** 0.5
    wv = torch.randn(hidden, heads_kv * d, device=device) / hidden ** 0.5
    cache = pyllmops.PagedKVCache(1, 40, 8, heads_kv, d, dtype=dtype, device=device, sliding_window=window)
    wl = -1 if window is None else window
    prompts = [torch.randn(n, hidden, device=device) for n in (13, 30)]
    seqs = [cache.add_sequence() for _ in prompts]
    xs = [p.clone() for p in prompts]

    def step(new):  # new: list of (t_i, hidden) per sequence
        lens = [n.shape[0] for n in new]
        slots = cache.allocate_slots(seqs, lens)
        x = torch.cat(new)
        cache.write(0, (x @ wk).view(-1, heads_kv, d).to(dtype), (x @ wv).view(-1, heads_kv, d).to(dtype), slots)
        q = (x @ wq).view(-1, heads_q, d).to(dtype)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        multi = max(lens) > 1
        return pyllmops.paged_attention(q, cache.key_cache[0], cache.value_cache[0], cache.block_tables(seqs),
                                        cache.seq_lens(seqs), window_left=wl, cu_seqlens_q=cu if multi else None,
                                        max_seqlen_q=max(lens) if multi else None).split(lens)

    outs = step(prompts)
    for i in range(2):
        x = xs[i]
        L = x.shape[0]
        q, k, v = ((x @ w).view(L, -1, d).to(dtype) for w in (wq, wk, wv))
        want = ref.attention(q, k, v, softmax_scale=1 / math.sqrt(d), positions=torch.arange(L), window_left=wl)
        assert_close(outs[i], want, TOL[dtype] * 2, f"prefill {i}")
        if window is None:  # and, independently, plain dense causal attention
            assert_close(outs[i], dense_causal(x, wq, wk, wv, heads_q, heads_kv, d), TOL[dtype] * 2, f"prefill {i}")
    min_free = cache.num_free_blocks
    for t in range(40):
        new = [torch.randn(1, hidden, device=device) for _ in seqs]
        xs = [torch.cat([a, b]) for a, b in zip(xs, new)]
        outs = step(new)
        for i in range(2):
            x = xs[i]
            L = x.shape[0]
            q = (x[-1:] @ wq).view(1, heads_q, d).to(dtype)
            k = (x @ wk).view(L, heads_kv, d).to(dtype)
            v = (x @ wv).view(L, heads_kv, d).to(dtype)
            want = ref.attention(q, k, v, softmax_scale=1 / math.sqrt(d), positions=torch.tensor([L - 1]),
                                 window_left=wl)
            assert_close(outs[i], want, TOL[dtype] * 2, f"decode step {t} seq {i}")
        min_free = min(min_free, cache.num_free_blocks)
    if window is not None:  # blocks wholly outside the window were released: at most ~3 blocks per sequence live
        assert cache.num_free_blocks >= 40 - 2 * (-(-(window + 1) // 8) + 2)
        assert (cache.block_tables(seqs)[:, 0] == -1).all()
    else:
        assert cache.num_free_blocks == 40 - sum(-(-x.shape[0] // 8) for x in xs)


# ---------------------------------------------------------------- reshape_and_cache
@pytest.mark.parametrize("device", devices())
def test_reshape_and_cache(device):
    for dtype in dtypes_for(device):
        kc = torch.zeros(6, 8, 3, 16, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        n = 11
        key = torch.randn(n, 3, 16, device=device).to(dtype)
        value = torch.randn(n, 3, 16, device=device).to(dtype)
        slots = torch.randperm(48)[:n].to(device)
        slots[3] = -1
        pyllmops.reshape_and_cache(key, value, kc, vc, slots)
        flat_k, flat_v = kc.view(48, 3, 16), vc.view(48, 3, 16)
        keep = slots >= 0
        assert torch.equal(flat_k[slots[keep]], key[keep]) and torch.equal(flat_v[slots[keep]], value[keep])
        written = torch.zeros(48, dtype=torch.bool, device=device)
        written[slots[keep]] = True
        assert (flat_k[~written] == 0).all() and (flat_v[~written] == 0).all()


def test_reshape_and_cache_out_of_range_leaves_cache_unchanged():
    kc, vc = random_cache(4, 8, 2, 16, torch.float32, "cpu")
    k0, v0 = kc.clone(), vc.clone()
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    for bad in (32, -2, 10 ** 6):
        with pytest.raises(ValueError, match=rf"slot_mapping\[2\] = {bad}"):
            pyllmops.reshape_and_cache(key, value, kc, vc, torch.tensor([0, 5, bad]))
        # the C++ binding checks too, before writing anything
        with pytest.raises(ValueError, match="slot_mapping"):
            pyllmops.reshape_and_cache(key, value, kc, vc, torch.tensor([0, 5, bad]), validate=False)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


# ---------------------------------------------------------------- block manager
def snapshot(cache):
    return (list(cache._free), list(cache._ref), {s: (list(q.blocks), q.length) for s, q in cache._seqs.items()},
            cache.storage.clone())


def same_snapshot(a, b):
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3])


def check_invariants(cache):
    owners = {}
    for s, q in cache._seqs.items():
        assert len(q.blocks) == -(-q.length // cache.block_size)
        for b in q.blocks:
            if b >= 0:
                owners[b] = owners.get(b, 0) + 1
    free = cache._free
    assert len(set(free)) == len(free), "a block is on the free list twice"
    for b in range(cache.num_blocks):
        assert cache._ref[b] == owners.get(b, 0), f"block {b}: refcount {cache._ref[b]} != owners {owners.get(b, 0)}"
        assert (b in free) == (cache._ref[b] == 0), f"block {b} leaked or owned while free"
    assert cache.num_free_blocks + len(owners) == cache.num_blocks


@pytest.mark.parametrize("device", devices())
def test_fork_copy_on_write(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cache = pyllmops.PagedKVCache(2, 10, 16, 2, 8, dtype=dtype, device=device)
    a = cache.add_sequence()
    kv = {}
    slots = cache.allocate_slots([a], 20)
    for layer in range(2):
        k, v = torch.randn(20, 2, 8, device=device).to(dtype), torch.randn(20, 2, 8, device=device).to(dtype)
        cache.write(layer, k, v, slots)
        kv[layer] = (k, v)
    b = cache.fork(a)
    assert cache.blocks(a) == cache.blocks(b) and cache.num_free_blocks == 8
    # b writes into the shared partial block: it gets a copy (in every layer), a keeps its block
    sb = cache.allocate_slots([b], 3)
    assert cache.blocks(b)[0] == cache.blocks(a)[0] and cache.blocks(b)[1] != cache.blocks(a)[1]
    new_b = {}
    for layer in range(2):
        k, v = torch.randn(3, 2, 8, device=device).to(dtype), torch.randn(3, 2, 8, device=device).to(dtype)
        cache.write(layer, k, v, sb)
        new_b[layer] = (k, v)
    sa = cache.allocate_slots([a], 2)  # a's block is no longer shared: written in place, no copy
    assert cache.blocks(a)[1] == cache.blocks(a)[1] and cache.num_free_blocks == 7
    new_a = {}
    for layer in range(2):
        k, v = torch.randn(2, 2, 8, device=device).to(dtype), torch.randn(2, 2, 8, device=device).to(dtype)
        cache.write(layer, k, v, sa)
        new_a[layer] = (k, v)
    bt = cache.block_tables([a, b]).cpu()
    for layer in range(2):
        for i, (seq, new) in enumerate(((a, new_a), (b, new_b))):
            L = cache.seq_len(seq)
            got_k = ref.gather_kv(cache.key_cache[layer].cpu(), bt[i], L)
            got_v = ref.gather_kv(cache.value_cache[layer].cpu(), bt[i], L)
            assert torch.equal(got_k, torch.cat([kv[layer][0], new[layer][0]]).cpu())
            assert torch.equal(got_v, torch.cat([kv[layer][1], new[layer][1]]).cpu())
    check_invariants(cache)
    cache.free(a)
    cache.free(b)
    assert cache.num_free_blocks == 10
    check_invariants(cache)


@pytest.mark.parametrize("window", [None, 5])
def test_allocate_fork_free_churn(window):
    """Random add / allocate / fork / free: no block leaked, none owned twice, refusals change nothing."""
    rng = random.Random(torch.initial_seed())
    cache = pyllmops.PagedKVCache(1, 24, 8, 1, 4, dtype=torch.float32, device="cpu", sliding_window=window)
    refusals = 0
    for _ in range(600):
        live = list(cache._seqs)
        op = rng.random()
        if op < 0.15 or not live:
            cache.add_sequence()
        elif op < 0.25:
            cache.fork(rng.choice(live))
        elif op < 0.4:
            cache.free(rng.choice(live))
        else:
            ids = rng.sample(live, rng.randint(1, min(3, len(live))))
            counts = [rng.choice([0, 1, 1, 1, 3, 9, 20]) for _ in ids]
            before = snapshot(cache)
            try:
                slots = cache.allocate_slots(ids, counts)
            except pyllmops.OutOfBlocksError:
                refusals += 1
                assert same_snapshot(before, snapshot(cache))
            else:
                assert slots.numel() == sum(counts) and len(set(slots.tolist())) == slots.numel()
                # a slot written now is in a block owned by that sequence alone
                for b in {s // 8 for s in slots.tolist()}:
                    assert cache._ref[b] == 1
        check_invariants(cache)
    assert refusals > 0  # the loop does reach exhaustion
    for s in list(cache._seqs):
        cache.free(s)
    assert cache.num_free_blocks == 24
    check_invariants(cache)


def test_out_of_blocks_is_all_or_nothing():
    cache = pyllmops.PagedKVCache(2, 6, 8, 1, 4, dtype=torch.float32, device="cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.allocate_slots([a], 12)
    cache.write(0, torch.randn(12, 1, 4), torch.randn(12, 1, 4), torch.arange(12))
    c = cache.fork(a)
    before = snapshot(cache)
    # b needs 2 blocks, a 1 new + 1 copy, c 1 new (a took the copy): 5 > 4, the whole call is refused
    with pytest.raises(pyllmops.OutOfBlocksError, match="need 5 free blocks, have 4"):
        cache.allocate_slots([b, a, c], [16, 10, 10])
    assert same_snapshot(before, snapshot(cache))
    cache.allocate_slots([b, a], [16, 4])  # b: 2 blocks, a: 1 copy, no new block
    assert cache.num_free_blocks == 1
    check_invariants(cache)


def test_block_tables_and_lens():
    cache = pyllmops.PagedKVCache(1, 8, 8, 1, 4, dtype=torch.float32, device="cpu")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.allocate_slots([a, b], [17, 3])
    bt = cache.block_tables([a, b])
    assert bt.dtype == torch.int32 and bt.shape == (2, 3) and bt[1, 1:].tolist() == [-1, -1]
    assert cache.seq_lens([b, a]).tolist() == [3, 17]
    assert cache.block_tables([b], max_blocks=5).shape == (1, 5)
    with pytest.raises(KeyError):
        cache.block_tables([99])


# ---------------------------------------------------------------- validation
def small():
    kc, vc = random_cache(4, 8, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    sl = torch.tensor([9, 16], dtype=torch.int32)
    return q, kc, vc, bt, sl


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(bt=torch.tensor([[0, 7], [2, 3]], dtype=torch.int32)), ValueError, r"block_tables\[0, 1\] = 7"),
    (lambda a: a.update(bt=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)), ValueError, r"block_tables\[1, 0\] = -1"),
    (lambda a: a.update(sl=torch.tensor([9, 17], dtype=torch.int32)), ValueError, r"seq_lens\[1\] = 17"),
    (lambda a: a.update(sl=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"seq_lens\[0\] = -1"),
    (lambda a: a.update(sl=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "queries but seq_lens"),
    (lambda a: a.update(bt=a["bt"].long()), ValueError, "block_tables must have dtype in"),
    (lambda a: a.update(sl=a["sl"][:1]), ValueError, "seq_lens has 1 entries"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of num_kv_heads"),
    (lambda a: a.update(q=a["q"].double()), ValueError, "q must have dtype"),
    (lambda a: a.update(q=a["q"].bfloat16()), ValueError, "key_cache has dtype"),
    (lambda a: a.update(q=a["q"][:1]), ValueError, "one query per sequence"),
    (lambda a: a.update(q=a["q"][..., :8]), ValueError, "head_dim 8"),
    (lambda a: a.update(kc=a["kc"][:, :6]), ValueError, "value_cache has shape"),
    (lambda a: a.update(kc=a["kc"][:, :6].contiguous(), vc=a["vc"][:, :6].contiguous()), ValueError,
     "power of two"),
    (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(kw=dict(window_left=-2)), ValueError, "window_left must be >= -1"),
    (lambda a: a.update(kw=dict(window_left=1.5)), TypeError, "window_left must be an int"),
    (lambda a: a.update(kw=dict(num_splits=0)), ValueError, "num_splits must be >= 1"),
    (lambda a: a.update(kw=dict(num_splits=65)), ValueError, "num_splits must be in"),
    (lambda a: a.update(kw=dict(softmax_scale="x")), TypeError, "softmax_scale"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32))), ValueError,
     "cu_seqlens_q has 2 entries"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32))), ValueError,
     "non-decreasing"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32))), ValueError,
     "end at total_q=2"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([1, 1, 2], dtype=torch.int32))), ValueError,
     "start at 0"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([0, 2, 2], dtype=torch.int32), max_seqlen_q=1)),
     ValueError, "max_seqlen_q = 1 but a sequence has 2 queries"),
    (lambda a: a.update(kw=dict(cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32), max_seqlen_q=0)),
     ValueError, "max_seqlen_q must be >= 1"),
])
def test_bad_inputs(change, err, match):
    a = dict(zip(("q", "kc", "vc", "bt", "sl"), small()), kw={})
    change(a)
    with pytest.raises(err, match=match):
        pyllmops.paged_attention(a["q"], a["kc"], a["vc"], a["bt"], a["sl"], **a["kw"])


def test_cpp_rechecks_metadata():
    """With Python's checks skipped (validate=False) the C++ layer still refuses before reading."""
    q, kc, vc, bt, sl = small()
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = 9"):
        pyllmops.paged_attention(q, kc, vc, torch.tensor([[0, 9], [2, 3]], dtype=torch.int32), sl, validate=False)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 40"):
        pyllmops.paged_attention(q, kc, vc, bt, torch.tensor([3, 40], dtype=torch.int32), validate=False)


def test_empty_batch():
    _, kc, vc, _, _ = small()
    out = pyllmops.paged_attention(torch.randn(0, 4, 16), kc, vc, torch.zeros(0, 2, dtype=torch.int32),
                                   torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 4, 16)


def test_unread_table_entries_are_not_validated():
    """Entries past seq_len, or wholly outside the window, may hold anything (e.g. -1 of released blocks)."""
    q, kc, vc, _, _ = small()
    bt = torch.tensor([[-1, 1, 77], [2, -5, -1]], dtype=torch.int32)
    sl = torch.tensor([16, 3], dtype=torch.int32)
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, window_left=4)
    want = ref.paged_attention(q, kc, vc, bt.clamp(min=0), sl, window_left=4)
    assert_close(out, want, TOL[torch.float32])


def test_reshape_and_cache_bad_inputs():
    kc, vc = random_cache(4, 8, 2, 16, torch.float32, "cpu")
    key = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="key has shape"):
        pyllmops.reshape_and_cache(key[:, :1], key[:, :1], kc, vc, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        pyllmops.reshape_and_cache(key, key, kc, vc, torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping has 2 entries"):
        pyllmops.reshape_and_cache(key, key, kc, vc, torch.arange(2))
    with pytest.raises(ValueError, match="key must have dtype"):
        pyllmops.reshape_and_cache(key.bfloat16(), key, kc, vc, torch.arange(3))


def test_cache_constructor_checks():
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        pyllmops.PagedKVCache(1, 4, 24, 1, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="head_dim must be <= 256"):
        pyllmops.PagedKVCache(1, 4, 16, 1, 300, dtype=torch.float32, device="cpu")
    with pytest.raises(TypeError, match="num_blocks must be an int"):
        pyllmops.PagedKVCache(1, 4.0, 16, 1, 8, dtype=torch.float32, device="cpu")
    cache = pyllmops.PagedKVCache(1, 4, 16, 1, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="distinct"):
        a = cache.add_sequence()
        cache.allocate_slots([a, a], 1)


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    dtype = dtypes_for(device)[-1]
    kc, vc = random_cache(10, 8, 2, 16, dtype, device)
    bt = shuffled_tables([20, 9], 8, 10, device)
    sl = torch.tensor([20, 9], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 16, device=device).to(dtype)
    torch.library.opcheck(torch.ops.pyllmops.paged_attention, (q, kc, vc, bt, sl, None, 0.25, 0.0, -1, 1, 2))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    q3 = torch.randn(5, 4, 16, device=device).to(dtype)
    torch.library.opcheck(torch.ops.pyllmops.paged_attention, (q3, kc, vc, bt, sl, cu, 0.25, 0.0, 4, 3, 1))
    torch.library.opcheck(torch.ops.pyllmops.paged_attention, (q3, kc, vc, bt, sl, cu, 0.25, 5.0, -1, 3, 2))
    key = torch.randn(3, 2, 16, device=device).to(dtype)
    torch.library.opcheck(torch.ops.pyllmops.reshape_and_cache,
                          (key, key.clone(), kc, vc, torch.tensor([0, -1, 79], device=device)))
    caches = torch.randn(4, 10, 8, 2, 16, device=device).to(dtype)
    torch.library.opcheck(torch.ops.pyllmops.paged_copy_blocks,
                          (caches, torch.tensor([[0, 3], [5, 9]], device=device)))


@pytest.mark.parametrize("device", devices())
def test_zero_query_heads(device):
    """q with 0 heads (a multiple of any num_kv_heads) is an empty attention: an empty out, no launch (a
    zero-element q passes the contiguity checks, so this reaches _C)."""
    dtype = dtypes_for(device)[-1]
    kc, vc = random_cache(4, 16, 2, 64, dtype, device)
    bt = torch.tensor([[0], [1]], dtype=torch.int32, device=device)
    sl = torch.tensor([3, 5], dtype=torch.int32, device=device)
    out = pyllmops.paged_attention(torch.randn(2, 0, 64, device=device).to(dtype), kc, vc, bt, sl)
    assert out.shape == (2, 0, 64)


# ---------------------------------------------------------------- CUDA only: in-kernel checks, graph capture
@pytest.mark.parametrize("device", [pytest.param(CUDA, marks=CUDA_MARKS)])
@pytest.mark.parametrize("group", [2, 4])
def test_cuda_bad_metadata_is_flagged_not_read(device, group):
    """CUDA checks device-resident metadata in the kernel (no host sync): out-of-range entries are
    never dereferenced, the affected rows are NaN, and check_kernel_errors raises."""
    P.check_kernel_errors(device)  # start clean
    kc, vc = random_cache(8, 16, 2, 64, torch.bfloat16, device)
    bt = torch.tensor([[0, 10 ** 6], [2, 3]], dtype=torch.int32, device=device)
    sl = torch.tensor([20, 20], dtype=torch.int32, device=device)
    q = torch.randn(2, 2 * group, 64, device=device).bfloat16()  # group 2: CUDA cores, 4: tensor cores
    for splits in (1, 3):
        out = pyllmops.paged_attention(q, kc, vc, bt, sl, num_splits=splits)
        sync()
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
        with pytest.raises(RuntimeError, match="block-table entry"):
            P.check_kernel_errors(device)
        P.check_kernel_errors(device)  # cleared
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = 1000000"):
        pyllmops.paged_attention(q, kc, vc, bt, sl, validate=True)
    bad_len = torch.tensor([20, 33], dtype=torch.int32, device=device)
    for splits in (1, 3):  # with splits the merge must keep the NaN, not rebuild a row from empty splits
        out = pyllmops.paged_attention(q, kc, vc, bt.clamp(max=3), bad_len, num_splits=splits)
        sync()
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
        with pytest.raises(RuntimeError, match="seq_len"):
            P.check_kernel_errors(device)
    k0 = kc.clone()
    key = torch.randn(2, 2, 64, device=device).bfloat16()
    pyllmops.reshape_and_cache(key, key, kc, vc, torch.tensor([5, 8 * 16], device=device))
    sync()
    assert torch.equal(kc.view(-1, 2, 64)[5], key[0])
    k0.view(-1, 2, 64)[5] = key[0]
    assert torch.equal(kc, k0)  # the out-of-range token was skipped
    with pytest.raises(RuntimeError, match="slot"):
        P.check_kernel_errors(device)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU_ONLY_MARKS)])
def test_cuda_graph_decode_step(device):
    """A decode step (split-KV included) is captured once and replayed with new q / seq_lens."""
    kc, vc = random_cache(80, 16, 2, 128, torch.bfloat16, device)
    bt = shuffled_tables([600, 500], 16, 80, device)
    sl = torch.tensor([300, 450], dtype=torch.int32, device=device)
    q = torch.randn(2, 8, 128, device=device).bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pyllmops.paged_attention(q, kc, vc, bt, sl, num_splits=4)  # warm-up: error word, allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pyllmops.paged_attention(q, kc, vc, bt, sl, num_splits=4)
    for lens in ([301, 451], [17, 600]):
        q.copy_(torch.randn_like(q))
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref.paged_attention(q, kc, vc, bt, sl), TOL[torch.bfloat16])
    P.check_kernel_errors(device)


def test_multi_token_with_no_queries():
    """Every sequence contributes 0 queries: an empty output, not an error."""
    kc, vc = torch.randn(4, 8, 2, 64), torch.randn(4, 8, 2, 64)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    out = pyllmops.paged_attention(torch.randn(0, 4, 64), kc, vc, bt, torch.tensor([5, 9], dtype=torch.int32),
                                   cu_seqlens_q=torch.tensor([0, 0, 0], dtype=torch.int32))
    assert out.shape == (0, 4, 64)


# ---------------------------------------------------------------- softcap, huge scales, instruction sets
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [1, 3])
def test_softcap(device, num_splits):
    """Gemma-2 logit softcap: softcap * tanh(scale * q.k / softcap) before the mask and softmax."""
    for dtype in dtypes_for(device)[:1]:
        run_case(device, dtype, [40, 300], heads_kv=2, group=4, softcap=2.0, scale=0.5, num_splits=num_splits)
        run_case(device, dtype, [33, 70], q_lens=[5, 9], heads_kv=1, group=2, softcap=0.7, window=20,
                 num_splits=num_splits)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [1, 4])
def test_huge_softmax_scale_is_the_hard_max(device, num_splits):
    """Scores are scaled only after the row max is subtracted, so softmax_scale = 1e38 (finite in float32)
    gives float64's answer (the value of the best key), never NaN."""
    dtype = dtypes_for(device)[0]
    out = run_case(device, dtype, [37, 130], heads_kv=2, group=4, scale=1e38, num_splits=num_splits)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale,match", [(1e39, "softmax_scale must be positive and finite in float32"),
                                         (3e38, "softmax_scale must be positive and finite in float32"),
                                         (1e-50, "softmax_scale must be positive and finite in float32"),
                                         (float("nan"), "softmax_scale"), (-1.0, "softmax_scale")])
def test_softmax_scale_must_survive_float32(scale, match):
    q, kc, vc, bt, sl = small()
    with pytest.raises(ValueError, match=match):
        pyllmops.paged_attention(q, kc, vc, bt, sl, softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):  # the C++ layer checks again
        torch.ops.pyllmops.paged_attention(q, kc, vc, bt, sl, None, scale, 0.0, -1, 1, 1)


@pytest.mark.parametrize("softcap,match", [(-1.0, "softcap must be 0"), (float("inf"), "softcap must be 0"),
                                           (1e-45, "softmax_scale / softcap"), ("x", "softcap must be a float")])
def test_bad_softcap(softcap, match):
    q, kc, vc, bt, sl = small()
    with pytest.raises((ValueError, TypeError), match=match):
        pyllmops.paged_attention(q, kc, vc, bt, sl, softcap=softcap)


def supported_isas():
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    isas = ["scalar"]
    if " avx2" in flags and " fma" in flags and " f16c" in flags:
        isas.append("avx2")
    if " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags:
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", supported_isas())
def test_every_instruction_set(isa, monkeypatch):
    """The CPU work item is compiled for AVX-512, AVX2 and portable code, picked at run time; each one is
    checked here (PYLLMOPS_PAGED_ISA forces it), including odd head dims (vector tails) and every dtype."""
    monkeypatch.setenv("PYLLMOPS_PAGED_ISA", isa)
    for dtype in dtypes_for("cpu"):
        run_case("cpu", dtype, [1, 70, 129], heads_kv=2, group=8, head_dim=40, num_splits=2)
        run_case("cpu", dtype, [20, 90], q_lens=[3, 11], heads_kv=1, group=4, head_dim=17, window=30)
    run_case("cpu", torch.float32, [77], heads_kv=3, group=1, head_dim=128, softcap=3.0)


def test_bad_isa_name(monkeypatch):
    monkeypatch.setenv("PYLLMOPS_PAGED_ISA", "sse9")
    q, kc, vc, bt, sl = small()
    with pytest.raises(ValueError, match="PYLLMOPS_PAGED_ISA must be scalar, avx2 or avx512, got sse9"):
        pyllmops.paged_attention(q, kc, vc, bt, sl)


# ---------------------------------------------------------------- upper bounds (no hang, no overflow)
@pytest.mark.parametrize("max_seqlen_q", [3, 2 ** 40, 2 ** 62])
def test_max_seqlen_q_upper_bound(max_seqlen_q):
    """max_seqlen_q sizes the launch: above total_q it is refused at once (2**40 used to loop for ages, and
    2**62 with GQA 2 overflowed into NaN), in Python and again in C++."""
    q, kc, vc, bt, sl = small()
    q = torch.randn(2, 4, 16)
    kc2, vc2 = kc[:, :, :1].contiguous(), vc[:, :, :1].contiguous()  # GQA 4 (and 2 below)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    for k, v, qq in ((kc, vc, q), (kc2, vc2, q), (kc[:, :, :2].contiguous(), vc[:, :, :2].contiguous(), q)):
        with pytest.raises(ValueError, match=rf"max_seqlen_q must be in \[1, total_q=2\].*got {max_seqlen_q}"):
            pyllmops.paged_attention(qq, k, v, bt, sl, cu_seqlens_q=cu, max_seqlen_q=max_seqlen_q)
        with pytest.raises(ValueError, match="max_seqlen_q must be in"):
            torch.ops.pyllmops.paged_attention(qq, k, v, bt, sl, cu, 0.25, 0.0, -1, max_seqlen_q, 1)


@pytest.mark.parametrize("window", [16, 2 ** 31, 2 ** 62, 2 ** 70])
def test_huge_window_is_unbounded(window):
    """A window at least the block table's capacity sees everything: same result as window_left=-1."""
    q, kc, vc, bt, sl = small()
    want = pyllmops.paged_attention(q, kc, vc, bt, sl)
    assert torch.equal(pyllmops.paged_attention(q, kc, vc, bt, sl, window_left=window), want)
    if window < 2 ** 63:  # the C++ layer clamps too
        got = torch.ops.pyllmops.paged_attention(q, kc, vc, bt, sl, None, 0.25, 0.0, window, 1, 1)
        assert torch.equal(got, torch.ops.pyllmops.paged_attention(q, kc, vc, bt, sl, None, 0.25, 0.0, -1, 1, 1))


def test_cache_size_overflow_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_blocks=4611686018427387904 is too large"):
        pyllmops.PagedKVCache(1, 2 ** 62, 8, 2, 16, dtype=torch.float32, device="cpu")


def test_zero_kv_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        pyllmops.PagedKVCache(1, 4, 16, 0, 8, dtype=torch.float32, device="cpu")
    kc = torch.zeros(4, 8, 0, 16)
    with pytest.raises(ValueError, match=r"num_kv_heads \(key_cache.shape\[2\]\) must be >= 1, got 0"):
        pyllmops.paged_attention(torch.randn(1, 4, 16), kc, kc.clone(), torch.zeros(1, 1, dtype=torch.int32),
                                 torch.ones(1, dtype=torch.int32))


# ---------------------------------------------------------------- NaN policy
def _multi_token_poison_inputs(device, dtype, group, d, bs=16):
    """Inputs of the multi-token NaN-policy cases: 2 kv heads, sequences of 70 and 300 keys with 6 and 9 queries
    (cu_seqlens_q [0, 6, 15]) over shuffled tables -> (k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, q,
    cache_slot(s, pos) -> (block, offset) of sequence s's key at position pos)."""
    seq_lens, heads_kv = [70, 300], 2
    n_blocks = sum(-(-L // bs) for L in seq_lens) + 3
    kc, vc = random_cache(n_blocks, bs, heads_kv, d, dtype, device)
    bt = shuffled_tables(seq_lens, bs, n_blocks, device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    cu = torch.tensor([0, 6, 15], dtype=torch.int32, device=device)
    q = torch.randn(15, heads_kv * group, d, device=device).to(dtype)

    def cache_slot(s, pos):
        return bt[s, pos // bs].item(), pos % bs

    return kc, vc, bt, sl, cu, q, cache_slot


def assert_nonfinite_like(out, want, tol):
    """Non-finite exactly where the float64 reference is, close elsewhere."""
    bad_out, bad_want = ~torch.isfinite(out.double()), ~torch.isfinite(want)
    assert torch.equal(bad_out, bad_want), (f"non-finite at {bad_out.nonzero()[:8].tolist()}, reference at "
                                            f"{bad_want.nonzero()[:8].tolist()}")
    keep = ~bad_want
    assert_close(out.double()[keep], want[keep], tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("d", [32, 20])  # CUDA: tensor cores (32), the CUDA-core kernel (20: not a multiple of 8)
@pytest.mark.parametrize("poison", ["q_nan", "q_inf", "k_nan", "k_inf", "v_inf", "v_nan", "k_nan_masked",
                                    "all_scores_neg_inf"])
def test_non_finite_reaches_what_it_touches(device, num_splits, d, poison):
    """NaN / inf in q, K or V reaches exactly the outputs that see it, as in float64, with and without
    split-KV (the merge never turns a NaN partial into -inf or 0); masked keys never leak."""
    dtype = dtypes_for(device)[0]
    window = 40
    kc, vc, bt, sl, cu, q, cache_slot = _multi_token_poison_inputs(device, dtype, 4, d)

    if poison == "q_nan":
        q[3, 5, 7] = float("nan")
    elif poison == "q_inf":
        q[10, 0, 2] = float("inf")
    elif poison in ("k_nan", "k_inf", "v_inf", "v_nan"):
        b, o = cache_slot(1, 290 - 40 + 2)  # seen by sequence 1's last queries only (window 40, causal)
        cache = kc if poison[0] == "k" else vc
        cache[b, o, 1, 5] = float("nan") if poison.endswith("nan") else float("inf")
    elif poison == "k_nan_masked":
        b, o = cache_slot(1, 100)  # outside every window of sequence 1
        kc[b, o, 0, :] = float("nan")
        vc[b, o, 1, :] = float("inf")
    elif poison == "all_scores_neg_inf":
        kc[..., 0] = float("-inf")  # q.k = -inf for every key where q[..., 0] > 0
        q[..., 0] = q[..., 0].abs() + 0.5
        q[4, :, 0] = 0.0  # 0 * -inf = NaN rows too
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, max_seqlen_q=9, window_left=window,
                                   num_splits=num_splits)
    if device == CUDA:
        P.check_kernel_errors(device)
    want = ref.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, window_left=window)
    assert (~torch.isfinite(want)).any() or poison == "k_nan_masked"
    assert_nonfinite_like(out, want, TOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("d,q_len", [(32, 6), (20, 6), (32, 1)])
def test_split_of_neg_inf_scores_keeps_its_non_finite_v(device, num_splits, d, q_len):
    """A split in which every score a row sees is -inf still multiplies its V by the weight 0: an inf there
    is NaN in that column (0 * inf, as in float64), not dropped with the split. Keys 32..39 (the last block,
    one split of 5) score -inf for every head (K[..., 0] = -inf, q[..., 0] > 0); V[35, head 0, 3] = inf."""
    dtype = dtypes_for(device)[0]
    heads_kv, group, bs, L = 2, 4, 8, 40
    kc, vc = random_cache(L // bs + 3, bs, heads_kv, d, dtype, device)
    bt = shuffled_tables([L], bs, L // bs + 3, device)
    sl = torch.tensor([L], dtype=torch.int32, device=device)
    q = torch.randn(q_len, heads_kv * group, d, device=device).to(dtype)
    q[..., 0] = q[..., 0].abs() + 0.5
    b = bt[0, 4].item()
    kc[b, :, :, 0] = float("-inf")
    vc[b, 35 % bs, 0, 3] = float("inf")
    cu = torch.tensor([0, q_len], dtype=torch.int32, device=device) if q_len > 1 else None
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, max_seqlen_q=q_len if cu is not None else None,
                                   num_splits=num_splits)
    if device == CUDA:
        P.check_kernel_errors(device)
    want = ref.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu)
    assert (~torch.isfinite(want)).any() and torch.isfinite(want[..., 4:]).all()
    assert_nonfinite_like(out, want, TOL[dtype])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", [0, 1])
def test_random_cases_with_poisons(device, seed):
    """Random shapes (groups 1-12, head dims 8-256 incl. 20, block sizes 8-128, q_len 0-40 or decode, windows
    0-100 or none, 1-7 splits, softcap) with NaN / +-inf placed in K and V near the queries, where a key is
    often visible to some rows of a tile and not to others: non-finite exactly where float64 is."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        group, heads_kv = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 12]), rng.choice([1, 2])
        d, bs = rng.choice([8, 20, 40, 64, 128, 256]), rng.choice([8, 16, 32, 128])
        dtype = rng.choice(dtypes_for(device)[-2:])
        seq_lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 3))]
        q_lens = [rng.randint(0, min(L, 40)) for L in seq_lens] if rng.random() < 0.7 else [1] * len(seq_lens)
        window, splits = rng.choice([-1, 0, 3, 6, 7, 8, 20, 100]), rng.choice([1, 2, 3, 4, 7])
        softcap = rng.choice([0.0, 0.0, 2.0])
        n_blocks = sum(-(-L // bs) for L in seq_lens) + 3
        kc = torch.randn(n_blocks, bs, heads_kv, d, generator=gen).to(dtype)
        vc = torch.randn(n_blocks, bs, heads_kv, d, generator=gen).to(dtype)
        bt = shuffled_tables(seq_lens, bs, n_blocks, "cpu")
        for _ in range(rng.randint(0, 3)):
            s = rng.randrange(len(seq_lens))
            pos = rng.randrange(max(0, seq_lens[s] - q_lens[s] - 10), seq_lens[s])
            cache = kc if rng.random() < 0.25 else vc
            cache[bt[s, pos // bs], pos % bs, rng.randrange(heads_kv), rng.randrange(d)] = rng.choice(
                [float("nan"), float("inf"), float("-inf")])
        q = torch.randn(sum(q_lens), heads_kv * group, d, generator=gen).to(dtype)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
        args = [t.to(device) for t in (q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32))]
        out = pyllmops.paged_attention(*args, cu_seqlens_q=cu.to(device), max_seqlen_q=max(max(q_lens), 1),
                                       window_left=window, num_splits=splits, softcap=softcap)
        if device == CUDA:
            P.check_kernel_errors(device)
        want = ref.paged_attention(*args, cu_seqlens_q=cu.to(device), window_left=window, softcap=softcap)
        assert_nonfinite_like(out, want, TOL[dtype])


# ---------------------------------------------------------------- CUDA tensor-core path
# fp16 / bf16 decode with GQA group >= 4, and multi-token queries with any group, run the tensor-core kernel
# (csrc/paged/paged_tc.cu: mma.sync, cp.async pipeline) when head_dim % 8 == 0; head dims are padded to 64 / 128
# / 256 there. Multi-token row tiles hold 8 rows of one or several consecutive queries (group 1: 8 queries,
# group 3: 2 2/3 queries, ...), each row with its own key bounds. These cases cover its shapes: every block size
# class, padded head dims, 2 row tiles per kv head (group 16), groups that split a query across tiles (3, 6),
# query chunks longer than a 16 KB stage's keys, q_len 0 and 1, partial last blocks (lengths not multiples of
# the block size or of a stage), split-KV, softcap, windows, and the NaN policy on keys only some rows of a
# tile see. (PYLLMOPS_EMU_BREAK=mma or =ldmatrix makes them fail: they do run the tensor-core path.)
TC_ONLY = [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)]


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 64, 8), (8, 128, 16), (4, 256, 32), (8, 64, 256),
                                                       (16, 128, 64), (4, 96, 16), (8, 40, 8), (8, 256, 128)])
def test_tc_decode(device, group, head_dim, block_size):
    for dtype in dtypes_for(device):
        run_case(device, dtype, [1, 17, 130, 333], heads_kv=2 if group < 16 else 1, group=group,
                 head_dim=head_dim, block_size=block_size, num_splits=1)
    run_case(device, torch.bfloat16, [70, 333], heads_kv=1, group=group, head_dim=head_dim,
             block_size=block_size, num_splits=3)


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_tc_decode_softcap_window_splits(device, num_splits):
    run_case(device, torch.float16, [40, 301, 1000], heads_kv=2, group=8, head_dim=128, block_size=16,
             softcap=3.0, scale=0.2, num_splits=num_splits)
    run_case(device, torch.bfloat16, [40, 301, 1000], heads_kv=1, group=4, head_dim=64, block_size=32,
             window=77, num_splits=num_splits)
    run_case(device, torch.bfloat16, [9, 500], heads_kv=2, group=4, head_dim=256, block_size=8, window=200,
             softcap=1.5, num_splits=num_splits)


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 8), (2, 128, 16), (3, 40, 128), (4, 256, 16),
                                                       (6, 64, 128), (8, 128, 8), (16, 64, 32), (1, 256, 128)])
def test_tc_multi_token(device, group, head_dim, block_size):
    """Multi-token queries on tensor cores for every group: chunked prefill (17 new of 129, and 70 new of 300:
    longer than a 16 KB stage's 64 / 32 / 16 keys), a whole prefill (40 of 40), one query, no queries."""
    heads_kv = 1 if group >= 8 else 2
    for dtype in dtypes_for(device):
        run_case(device, dtype, [129, 40, 7, 20, 300], q_lens=[17, 40, 1, 0, 70], heads_kv=heads_kv, group=group,
                 head_dim=head_dim, block_size=block_size, num_splits=1)


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 16])
def test_tc_multi_token_window_softcap_splits(device, group, num_splits):
    """Windows cut each tile's keys at both ends (the first queries see keys the last do not), with softcap
    and split-KV (splits whose range some rows of a tile do not reach at all)."""
    run_case(device, torch.bfloat16, [90, 300, 33], q_lens=[6, 41, 33], heads_kv=1, group=group, head_dim=64,
             block_size=16, window=30, softcap=2.0, num_splits=num_splits)
    run_case(device, torch.float16, [150, 64], q_lens=[23, 9], heads_kv=2, group=group, head_dim=128,
             block_size=8, window=5, scale=0.2, num_splits=num_splits)
    run_case(device, torch.float16, [200], q_lens=[37], heads_kv=1, group=group, head_dim=256, block_size=128,
             window=0 if group < 4 else 100, num_splits=num_splits)


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("group", [4, 8])
@pytest.mark.parametrize("poison", ["q_nan", "q_inf", "k_nan", "k_inf", "v_inf", "v_nan", "masked",
                                    "all_scores_neg_inf"])
def test_tc_non_finite_reaches_what_it_touches(device, num_splits, group, poison):
    """The NaN policy on the tensor-core path (decode, window 100): a poisoned visible key reaches every head
    of its kv head; keys outside the window (never loaded) and zero-filled stage padding never leak."""
    dtype = torch.bfloat16
    seq_lens, heads_kv, d, bs, window = [70, 300], 2, 128, 16, 100
    n_blocks = sum(-(-L // bs) for L in seq_lens) + 3
    kc, vc = random_cache(n_blocks, bs, heads_kv, d, dtype, device)
    bt = shuffled_tables(seq_lens, bs, n_blocks, device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = torch.randn(2, heads_kv * group, d, device=device).to(dtype)

    def cache_slot(s, pos):
        return bt[s, pos // bs].item(), pos % bs

    if poison == "q_nan":
        q[1, group + 1, 7] = float("nan")
    elif poison == "q_inf":
        q[0, 0, 2] = float("inf")
    elif poison in ("k_nan", "k_inf", "v_inf", "v_nan"):
        b, o = cache_slot(1, 250)  # visible to sequence 1 (window 100 from position 299)
        cache = kc if poison[0] == "k" else vc
        cache[b, o, 1, 5] = float("nan") if poison.endswith("nan") else float("inf")
        if poison == "k_inf":  # one head of kv head 1 scores it +inf (a NaN row); with all q[.., 5] < 0 all see -inf
            q[1, group, 5] = q[1, group, 5].abs() + 0.5
    elif poison == "masked":
        b, o = cache_slot(1, 150)  # outside sequence 1's window
        kc[b, o, 0, :] = float("nan")
        vc[b, o, 1, :] = float("inf")
    elif poison == "all_scores_neg_inf":
        kc[..., 0] = float("-inf")
        q[..., 0] = q[..., 0].abs() + 0.5
        q[1, 1, 0] = 0.0  # 0 * -inf = NaN row
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, window_left=window, num_splits=num_splits)
    P.check_kernel_errors(device)
    want = ref.paged_attention(q, kc, vc, bt, sl, window_left=window)
    assert (~torch.isfinite(want)).any() or poison == "masked"
    assert_nonfinite_like(out, want, TOL[dtype])


@pytest.mark.parametrize("device", TC_ONLY)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("poison", ["q_nan", "q_inf", "k_nan", "k_inf", "v_inf", "v_nan", "v_ninf_nan", "masked"])
def test_tc_multi_token_ragged_non_finite(device, num_splits, group, poison):
    """The NaN policy on multi-token tensor-core tiles whose rows see different keys. Sequence 1 has 9 queries
    at positions 291..299 and window 40, so a row tile's first queries see keys 251.. its last do not (window
    start) and its last queries see keys up to 298 its first do not (causal end). A poison on such a ragged
    key reaches exactly the rows that see it (P V on the tensor core would give 0 * inf = NaN to the others);
    keys outside every window never leak. kv head 0 holds the causal-end poison, kv head 1 the window-start."""
    dtype, window, d = torch.float16, 40, 64
    kc, vc, bt, sl, cu, q, cache_slot = _multi_token_poison_inputs(device, dtype, group, d)

    late = [cache_slot(1, 292), cache_slot(1, 296)]  # seen from query 1 / 5 of sequence 1 on (causal end)
    early = [cache_slot(1, 253), cache_slot(1, 257)]  # seen up to query 2 / 6 only (window start)
    if poison == "q_nan":
        q[6 + 3, 1, 7] = float("nan")
    elif poison == "q_inf":
        q[6 + 4, group, 2] = float("inf")
    elif poison in ("k_nan", "k_inf", "v_inf", "v_nan"):
        cache = kc if poison[0] == "k" else vc
        val = float("nan") if poison.endswith("nan") else float("inf")
        for (b, o), h in [(late[0], 0), (late[1], 0), (early[0], 1), (early[1], 1)]:
            cache[b, o, h, 5 + o % 3] = val
    elif poison == "v_ninf_nan":  # -inf and NaN in different warps' columns of one key, inf in another key
        for (b, o), h in [(late[0], 0), (early[1], 1)]:
            vc[b, o, h, 3] = float("-inf")
            vc[b, o, h, d - 2] = float("nan")
        b, o = late[1]
        vc[b, o, 0, 40] = float("inf")
    elif poison == "masked":  # outside every window of sequence 1, and past sequence 0's end
        b, o = cache_slot(1, 240)
        kc[b, o, 0, :] = float("nan")
        vc[b, o, 1, :] = float("inf")
        vc[bt[0, 4].item(), 6:, :, :] = float("nan")  # block 4 of sequence 0 holds keys 64..69: offsets 6.. unused
    out = pyllmops.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, max_seqlen_q=9, window_left=window,
                                   num_splits=num_splits)
    P.check_kernel_errors(device)
    want = ref.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, window_left=window)
    bad_rows = (~torch.isfinite(want)).any(-1)
    if poison != "masked":  # a poisoned ragged key reaches some rows of a tile and not others
        assert bad_rows.any() and not bad_rows[6:].all()
    assert_nonfinite_like(out, want, TOL[dtype])


# ---------------------------------------------------------------- reshape_and_cache: races and aliasing
@pytest.mark.parametrize("validate", [True, False])
def test_reshape_and_cache_refuses_duplicate_slots(validate):
    """Two tokens writing one slot would race (the winner depended on thread timing): refused before any
    write, in Python (validate) and in C++ (validate=False)."""
    kc, vc = random_cache(4, 8, 2, 16, torch.float32, "cpu")
    k0, v0 = kc.clone(), vc.clone()
    key, value = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match=r"duplicate slot 5 \(tokens 1 and 3\)"):
        pyllmops.reshape_and_cache(key, value, kc, vc, torch.tensor([0, 5, -1, 5]), validate=validate)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)
    pyllmops.reshape_and_cache(key, value, kc, vc, torch.tensor([0, -1, -1, 5]), validate=validate)  # -1 repeats


def test_reshape_and_cache_refuses_aliased_caches():
    kc, _ = random_cache(4, 8, 2, 16, torch.float32, "cpu")
    k0 = kc.clone()
    key = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="key_cache and value_cache share memory"):
        pyllmops.reshape_and_cache(key, key.clone(), kc, kc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="key_cache and value_cache share memory"):  # C++ checks too
        torch.ops.pyllmops.reshape_and_cache(key, key.clone(), kc, kc, torch.tensor([0, 1]))
    storage = torch.randn(2, 4, 8, 2, 16)
    with pytest.raises(ValueError, match="key shares memory"):
        pyllmops.reshape_and_cache(storage[0, 0, :2], key, storage[0], storage[1], torch.tensor([0, 1]))
    assert torch.equal(kc, k0)


# ---------------------------------------------------------------- cache manager: validate before mutating
@pytest.mark.parametrize("call,err,match", [
    (lambda c, a: c.allocate_slots([a], 2.0), TypeError, "num_tokens must be an int .* got float 2.0"),
    (lambda c, a: c.allocate_slots([a], [1, 2]), ValueError, "num_tokens has 2 entries for 1 sequences"),
    (lambda c, a: c.allocate_slots([a], [-1]), ValueError, r"num_tokens\[0\] must be >= 0, got -1"),
    (lambda c, a: c.allocate_slots([a], True), TypeError, "num_tokens must be an int"),
    (lambda c, a: c.allocate_slots(a, 1), TypeError, "seq_ids must be a list of sequence ids, got int"),
    (lambda c, a: c.allocate_slots([a, 99], 1), KeyError, "unknown sequence id 99"),
    (lambda c, a: c.allocate_slots([a], 10 ** 6), pyllmops.OutOfBlocksError, "need"),
    (lambda c, a: c.fork(99), KeyError, "unknown sequence id 99"),
    (lambda c, a: c.free(99), KeyError, "unknown sequence id 99"),
    (lambda c, a: c.copy_blocks([(0, 99)]), ValueError, "block pairs must be in"),
    (lambda c, a: c.copy_blocks("ab"), ValueError, "pairs must be a list"),
    (lambda c, a: c.block_tables([a], max_blocks=1.5), TypeError, "max_blocks must be an int"),
    (lambda c, a: c.write(0, torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3, 3])), ValueError,
     "duplicate slot 3"),
    (lambda c, a: c.write(2, torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.tensor([3, 4])), ValueError,
     "layer must be < num_layers=2, got 2"),
])
def test_cache_manager_refusals_change_nothing(call, err, match):
    cache = pyllmops.PagedKVCache(2, 6, 8, 2, 8, dtype=torch.float32, device="cpu")
    a = cache.add_sequence()
    cache.allocate_slots([a], 11)
    cache.fork(a)
    before = snapshot(cache)
    with pytest.raises(err, match=match):
        call(cache, a)
    assert same_snapshot(before, snapshot(cache))
    check_invariants(cache)
