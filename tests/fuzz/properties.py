"""Hypothesis properties, registered as fuzz cases "property/...": random valid shapes, strides, masks and
metadata must give the float64 reference's result. Each property runs PYLLMOPS_FUZZ_EXAMPLES examples (default
20) inside one fuzz case (so under its watchdog, in a subprocess); a failure names the shrunk example."""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

import pyllmops
from pyllmops.ops.paged import PagedKVCache

from cases import Bad, add, compare, randn
from families import paged_ref

EXAMPLES = int(os.environ.get("PYLLMOPS_FUZZ_EXAMPLES", "20"))


def prop(name):
    """Registers a hypothesis test `fn(g, data)` as fuzz case property/<name>, seeded from the case's generator."""
    def deco(fn):
        def case(g):
            s = int(torch.randint(0, 2**31, (1,), generator=g))

            @hseed(s)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(st.data())
            def run(data):
                gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="tensor seed"))
                drawn = []
                real = data.draw

                def draw(strategy, label=None):
                    v = real(strategy, label=label)
                    drawn.append((label, v))
                    return v
                try:
                    fn(gen, draw)
                except Exception as e:  # noqa: BLE001  (re-raised with the example that broke it)
                    raise Bad(f"{dict(drawn)}: {type(e).__name__}: {e}") from None
            run()
        add(f"property/{name}", case)
        return fn
    return deco


WINDOW = st.one_of(st.just(-1), st.integers(0, 24), st.just(2**40))


@prop("flash_attention")
def _flash(g, draw):
    b = draw(st.integers(1, 2), "batch")
    sq, sk = draw(st.integers(1, 20), "seqlen_q"), draw(st.integers(1, 20), "seqlen_k")
    hkv, group = draw(st.integers(1, 2), "heads_kv"), draw(st.integers(1, 3), "group")
    d = draw(st.sampled_from([8, 16, 40]), "head_dim")
    causal = draw(st.booleans(), "causal")
    window = (draw(WINDOW, "left"), draw(WINDOW, "right"))
    layout = draw(st.sampled_from(["bshd", "bhsd"]), "layout")

    def make(s, h):
        t = randn(g, b, s, h, d)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bhsd" else t
    q, k, v = make(sq, hkv * group), make(sk, hkv), make(sk, hkv)
    out, lse = pyllmops.flash_attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    from families import attn_ref
    compare((out, lse), attn_ref(dict(q=q, k=k, v=v, causal=causal, window_size=window)), 1e-4)


@prop("flash_attention_varlen")
def _varlen(g, draw):
    n = draw(st.integers(1, 4), "num_seqs")
    lq = [draw(st.integers(0, 9), f"len_q{i}") for i in range(n)]
    lk = [draw(st.integers(0, 9), f"len_k{i}") for i in range(n)]
    extra = draw(st.integers(0, 3), "max_seqlen slack")
    causal = draw(st.booleans(), "causal")
    window = (draw(WINDOW, "left"), draw(st.sampled_from([-1, 0, 3]), "right"))
    d = draw(st.sampled_from([8, 32]), "head_dim")
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    cq, ck = cu(lq), cu(lk)
    q, k, v = randn(g, sum(lq), 4, d), randn(g, sum(lk), 2, d), randn(g, sum(lk), 2, d)
    from families import varlen_call, varlen_ref
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lq) + extra,
             max_seqlen_k=max(lk) + extra, causal=causal, window_size=window)
    compare(varlen_call(a), varlen_ref(a), 1e-4)


@prop("paged_attention")
def _paged(g, draw):
    bs = draw(st.sampled_from([8, 16]), "block_size")
    n = draw(st.integers(1, 3), "num_seqs")
    lens = [draw(st.integers(1, 40), f"seq_len{i}") for i in range(n)]
    qlens = [draw(st.integers(1, L), f"q_len{i}") for i, L in enumerate(lens)]
    multi = draw(st.booleans(), "multi-token") or any(x > 1 for x in qlens) and draw(st.booleans(), "force")
    if not multi:
        qlens = [1] * n
    hkv, group = draw(st.integers(1, 2), "heads_kv"), draw(st.integers(1, 4), "group")
    d = draw(st.sampled_from([16, 64]), "head_dim")
    wl = draw(st.one_of(st.just(-1), st.integers(0, 30)), "window_left")
    splits = draw(st.one_of(st.none(), st.integers(1, 8)), "num_splits")
    need = [-(-L // bs) for L in lens]
    nblk = sum(need) + draw(st.integers(0, 3), "spare blocks")
    perm = torch.randperm(nblk, generator=g).tolist()
    width = max(need) + draw(st.integers(0, 2), "table slack")
    bt = torch.full((n, width), -1, dtype=torch.int32)
    at = 0
    for i, m in enumerate(need):
        bt[i, :m] = torch.tensor(perm[at:at + m], dtype=torch.int32)
        at += m
    a = dict(q=randn(g, sum(qlens), hkv * group, d), key_cache=randn(g, nblk, bs, hkv, d),
             value_cache=randn(g, nblk, bs, hkv, d), block_tables=bt, seq_lens=torch.tensor(lens, dtype=torch.int32),
             window_left=wl)
    if multi:
        a["cu_seqlens_q"] = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
        a["max_seqlen_q"] = max(qlens)
    if splits is not None:
        a["num_splits"] = splits
    from families import paged_call
    compare(paged_call(a), paged_ref(a), 1e-4)


@prop("nf4_roundtrip")
def _nf4(g, draw):
    numel = draw(st.integers(1, 700), "numel")
    blocksize = draw(st.sampled_from([32, 64, 128, 256]), "blocksize")
    dq = draw(st.booleans(), "double_quant")
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), "dtype")
    w = randn(g, numel, dtype=dtype, scale=draw(st.sampled_from([1e-3, 0.05, 30.0]), "scale"))
    packed, state = pyllmops.quantize_nf4(w, blocksize, dq)
    from pyllmops.reference import nf4 as ref_nf4
    if not dq:
        want_packed, want_absmax = ref_nf4.quantize_nf4(w.float(), blocksize)
        if not torch.equal(packed.view(-1), want_packed.view(-1)) or not torch.equal(state.absmax, want_absmax):
            raise Bad("quantize_nf4 differs from the reference's codes or absmax")
    compare(pyllmops.dequantize_nf4(packed, state), ref_nf4.dequantize_nf4(packed, state).to(dtype).double(), 0)


@prop("kv_cache_manager")
def _cache(g, draw):
    """A random program of add / allocate / fork / free / write: every block is owned or free, never both; a
    refused allocation changes nothing; each live sequence reads back exactly the keys written for it."""
    bs, nblk = 8, draw(st.integers(2, 12), "num_blocks")
    cache = PagedKVCache(1, nblk, bs, 1, 8, dtype=torch.float32, device="cpu")
    shadow = {}  # seq -> list of key rows written (what a reader must see)
    for step in range(draw(st.integers(1, 25), "ops")):
        op = draw(st.sampled_from(["add", "alloc", "fork", "free"]), f"op{step}")
        live = sorted(shadow)
        if op == "add" or not live:
            shadow[cache.add_sequence()] = []
            continue
        s = draw(st.sampled_from(live), f"seq{step}")
        if op == "alloc":
            k = draw(st.integers(0, 20), f"tokens{step}")
            free_before = cache.num_free_blocks
            try:
                slots = cache.allocate_slots([s], k)
            except pyllmops.OutOfBlocksError:
                if cache.num_free_blocks != free_before or cache.seq_len(s) != len(shadow[s]):
                    raise Bad("a refused allocate_slots changed the cache") from None
                continue
            rows = randn(g, k, 1, 8)
            cache.write(0, rows, rows, slots)
            shadow[s] = shadow[s] + list(rows)
        elif op == "fork":
            shadow[cache.fork(s)] = list(shadow[s])
        else:
            cache.free(s)
            del shadow[s]
        for q, rows in shadow.items():
            if cache.seq_len(q) != len(rows):
                raise Bad(f"sequence {q} has seq_len {cache.seq_len(q)}, {len(rows)} tokens were written")
            if rows:
                bt = cache.block_tables([q])[0].long()
                t = torch.arange(len(rows))
                got = cache.key_cache[0][bt[t // bs], t % bs]
                if not torch.equal(got, torch.stack(rows)):
                    raise Bad(f"sequence {q} reads back other keys than were written for it")
