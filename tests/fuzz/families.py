"""Registers the fuzz cases of every public op (see cases.py for the contract each case checks)."""
import math

import torch

import pyllmops
from pyllmops import nn as pnn
from pyllmops.ops.paged import PagedKVCache
from pyllmops.reference import attention as ref_attn
from pyllmops.reference import lora as ref_lora
from pyllmops.reference import nf4 as ref_nf4

from cases import (BIG_INTS, Bad, add, attempt, check_error, compare, error_or_correct, must_error, poison_value,
                   randn, register_scalar_fuzz, register_tensor_fuzz)

D64 = torch.float64
SCALES_BAD = [("zero", 0.0), ("negative", -1.0), ("nan", float("nan")), ("inf", math.inf), ("1e39", 1e39),
              ("bool", True), ("str", "1"), ("int_2p63", 2**63)]


def _d(t):
    return None if t is None else t.double()


# ================================================================ attention
def attn_build(g):
    return dict(q=randn(g, 2, 5, 4, 16), k=randn(g, 2, 7, 2, 16), v=randn(g, 2, 7, 2, 16))


def attn_call(a):
    return pyllmops.flash_attention(a["q"], a["k"], a["v"], causal=a.get("causal", False),
                                    window_size=a.get("window_size", (-1, -1)), softmax_scale=a.get("softmax_scale"),
                                    return_lse=True)


def _clamp_window(w, sq, sk):
    """Windows of at least the sequence lengths mean unbounded (what the float64 mask computes without overflow)."""
    big = sq + sk + 1
    return tuple(-1 if x is not None and x >= big else x for x in w)


def attn_ref(a):
    q, k, v = a["q"], a["k"], a["v"]
    w = _clamp_window(tuple(a.get("window_size", (-1, -1))), q.shape[1], k.shape[1])
    return ref_attn.attention(_d(q), _d(k), _d(v), a.get("causal", False), w, a.get("softmax_scale"))


def varlen_build(g):
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    return dict(q=randn(g, 8, 4, 16), k=randn(g, 11, 2, 16), v=randn(g, 11, 2, 16), cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)


def varlen_call(a):
    return pyllmops.flash_attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                           a["max_seqlen_q"], a["max_seqlen_k"], causal=a.get("causal", False),
                                           window_size=a.get("window_size", (-1, -1)),
                                           softmax_scale=a.get("softmax_scale"), return_lse=True)


def varlen_ref(a):
    w = _clamp_window(tuple(a.get("window_size", (-1, -1))), a["q"].shape[0], a["k"].shape[0])
    return ref_attn.attention_varlen(_d(a["q"]), _d(a["k"]), _d(a["v"]), a["cu_seqlens_q"].cpu().long(),
                                     a["cu_seqlens_k"].cpu().long(), a.get("causal", False), w, a.get("softmax_scale"))


def sdpa_build(g):
    return dict(query=randn(g, 2, 4, 5, 16), key=randn(g, 2, 4, 7, 16), value=randn(g, 2, 4, 7, 16))


def sdpa_call(a):
    return pnn.functional.scaled_dot_product_attention(a["query"], a["key"], a["value"],
                                                       is_causal=a.get("is_causal", False), scale=a.get("scale"))


def sdpa_ref(a):
    q, k, v = (_d(a[n]).transpose(1, 2) for n in ("query", "key", "value"))
    out, _ = ref_attn.attention(q, k, v, a.get("is_causal", False), (-1, -1), a.get("scale"), top_left=True)
    return out.transpose(1, 2)


QKV_NAMES = {"q": ["q"], "k": ["k"], "v": ["v"]}
register_tensor_fuzz("attention/flash_attention", attn_build, attn_call, attn_ref, QKV_NAMES, nonfinite=("q", "k", "v"))
register_tensor_fuzz("attention/flash_attention_varlen", varlen_build, varlen_call, varlen_ref,
                     dict(QKV_NAMES, cu_seqlens_q=["cu_seqlens_q"], cu_seqlens_k=["cu_seqlens_k"]),
                     nonfinite=("q", "k", "v"), int_args=("cu_seqlens_q", "cu_seqlens_k"))
register_tensor_fuzz("attention/sdpa", sdpa_build, sdpa_call, sdpa_ref,
                     {"query": ["query"], "key": ["key"], "value": ["value"]}, nonfinite=("query", "key", "value"))

for prefix, build, call, ref in (("attention/flash_attention", attn_build, attn_call, attn_ref),
                                 ("attention/flash_attention_varlen", varlen_build, varlen_call, varlen_ref)):
    register_scalar_fuzz(prefix, build, call, ref, "softmax_scale",
                         SCALES_BAD + [("1e31", 1e31), ("tiny", 1e-30), ("subnormal_f32", 1e-45)])
    # At softmax_scale 1e4 the float32 scores carry an absolute error of ~1e4 * 2^-24 * |q||k| (a few 1e-3): a row
    # whose two best keys are that close mixes their values differently from float64, on any kernel. Relative
    # output errors over 3000 seeds each (2026-12-02): pyllmops' kernel max 5.0e-4 (dense) / 3.1e-4 (varlen),
    # torch's CPU flash kernel 3.7e-4 / 7.4e-4; 3-5 seeds of 3000 above 1e-4 on both, none above 1e-3.
    register_scalar_fuzz(prefix, build, call, ref, "softmax_scale", [("1e4", 1e4)], tol=2e-3)
    register_scalar_fuzz(prefix, build, call, ref, "window_size",
                         [("left_2p63m1", (2**63 - 1, 0)), ("right_2p63m1", (-1, 2**63 - 1)),
                          ("both_2p63m1", (2**63 - 1, 2**63 - 1)), ("left_1e30", (10**30, 0)),
                          ("right_2p40", (0, 2**40)), ("minus2", (-2, 0)), ("min_int64", (-2**63, 0)),
                          ("float", (1.5, 0)), ("three", (1, 2, 3)), ("str", "ab"), ("none", None),
                          ("zero_zero", (0, 0))])
register_scalar_fuzz("attention/sdpa", sdpa_build, sdpa_call, sdpa_ref, "scale", SCALES_BAD + [("1e31", 1e31)])

# varlen: the host ints that size the grid (upper bounds, overflow) and bad offsets
for arg in ("max_seqlen_q", "max_seqlen_k"):
    register_scalar_fuzz("attention/flash_attention_varlen", varlen_build, varlen_call, varlen_ref, arg,
                         [(f"big_{v}", v) for v in BIG_INTS] + [("zero", 0), ("negative", -1), ("float", 5.0),
                                                                ("bool", True), ("none", None), ("exact_plus1", 6)])
for label, cu in (("not_from_zero", [1, 3, 3, 8]), ("decreasing", [0, 4, 3, 8]), ("past_end", [0, 3, 3, 9]),
                  ("short_of_end", [0, 3, 3, 7]), ("len_over_max", [0, 0, 0, 8]), ("negative", [0, -1, 3, 8]),
                  ("int32_max", [0, 3, 3, 2**31 - 1]), ("single", [0])):
    def fn(g, cu=cu):
        a = varlen_build(g)
        a["cu_seqlens_q"] = torch.tensor(cu, dtype=torch.int32)
        must_error(lambda: varlen_call(a), ["cu_seqlens_q", "max_seqlen_q"])
    add(f"attention/flash_attention_varlen/cu_seqlens_q/{label}", fn)


def _nan_key_outside_window(g):
    """A NaN key no query can see leaves every output finite and equal to the reference (NaN not invented)."""
    a = attn_build(g)
    a["causal"] = True
    a["window_size"] = (1, 0)
    a["k"][:, 0] = float("nan")  # key 0: outside every window here (sk - sq = 2: query 0 sees keys 1, 2)
    error_or_correct(lambda: attn_call(a), lambda: attn_ref(a), ["k"])


add("attention/flash_attention/k/nan_outside_window", _nan_key_outside_window)


def _nan_q_grads(g):
    """NaN in one query row: that row's output and its gradients (dq row; dk, dv of what it touched) are NaN."""
    a = attn_build(g)
    a["q"][0, 2, 1, 3] = float("nan")
    ins = [a[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
    out = pyllmops.flash_attention(*ins)
    dout = randn(g, *out.shape)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_(True) for t in ins]
    r, _ = ref_attn.attention(*ref_in)
    r.backward(dout.double())
    compare(out, r, 1e-4)
    compare([t.grad for t in ins], [t.grad for t in ref_in], 1e-4, "grads")


add("attention/flash_attention/q/nan_grads", _nan_q_grads)


def _huge_scale_grads(g):
    """A large but finite softmax_scale: forward and gradients as the float64 reference, or a clear error."""
    a = attn_build(g)
    scale = 1e5
    ins = [a[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
    ok, out = attempt(lambda: pyllmops.flash_attention(*ins, softmax_scale=scale))
    if not ok:
        check_error(out, "softmax_scale", scale)
        return
    dout = randn(g, *out.shape)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_(True) for t in ins]
    r, _ = ref_attn.attention(*ref_in, softmax_scale=scale)
    r.backward(dout.double())
    compare(out, r, 1e-3)
    # dv is well conditioned (the softmax is nearly one-hot); dq and dk are the scale times a cancellation, as ill
    # conditioned as the scale itself (docs/attention.md): only finite there
    compare(ins[2].grad, ref_in[2].grad, 1e-2, "dv")
    for t, n in ((ins[0], "dq"), (ins[1], "dk")):
        if not torch.isfinite(t.grad).all():
            raise Bad(f"{n} is not finite at softmax_scale {scale}")


add("attention/flash_attention/softmax_scale/1e5_grads", _huge_scale_grads)


def _mha_ctor(kwargs, names):
    def fn(g):
        must_error(lambda: pnn.MultiHeadAttention(**kwargs), names)
    return fn


for label, kw, nm in (("heads_zero", dict(hidden_size=64, num_heads=0), "num_heads"),
                      ("kv_heads_zero", dict(hidden_size=64, num_heads=4, num_kv_heads=0), "num_kv_heads"),
                      ("kv_not_divisor", dict(hidden_size=64, num_heads=4, num_kv_heads=3), "num_kv_heads"),
                      ("head_dim_odd", dict(hidden_size=64, num_heads=4, head_dim=7), "head_dim"),
                      ("window_negative", dict(hidden_size=64, num_heads=4, window=-5), "window"),
                      ("hidden_float", dict(hidden_size=64.0, num_heads=4), "hidden_size")):
    add(f"nn/MultiHeadAttention/{label}", _mha_ctor(kw, nm))


def _mha_forward(mutate, names, label):
    def fn(g):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        m = pnn.MultiHeadAttention(32, num_heads=4, num_kv_heads=2)
        x = mutate(randn(g, 2, 6, 32))
        ok, r = attempt(lambda: m(x))
        if not ok:
            check_error(r, names)
        elif label.startswith("nan"):
            if not torch.isnan(r[0]).all() or torch.isnan(r[1]).any():
                raise Bad("NaN in sequence 0's first token must reach that sequence's causal outputs only")
        else:
            raise Bad("returned a result for a malformed input")
    return fn


add("nn/MultiHeadAttention/x/rank2", _mha_forward(lambda x: x[0, 0], ["x"], "rank"))
add("nn/MultiHeadAttention/x/wrong_hidden", _mha_forward(lambda x: x[..., :16], ["x", "hidden"], "hidden"))
add("nn/MultiHeadAttention/x/int", _mha_forward(lambda x: x.long(), ["x", "dtype"], "int"))
add("nn/MultiHeadAttention/x/nan_first_token", _mha_forward(lambda x: x.index_put_((torch.tensor(0), torch.tensor(0)),
                                                                                   torch.tensor(float("nan"))),
                                                            ["x"], "nan"))


# ================================================================ paged
BS, HKV, HD = 8, 2, 16


def paged_build(g, multi=False):
    nblk = 6
    kc, vc = randn(g, nblk, BS, HKV, HD), randn(g, nblk, BS, HKV, HD)
    bt = torch.tensor([[4, 1, 0], [2, 5, -1]], dtype=torch.int32)
    sl = torch.tensor([19, 10], dtype=torch.int32)
    if multi:
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        return dict(q=randn(g, 7, 4, HD), key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=sl,
                    cu_seqlens_q=cu, max_seqlen_q=4)
    return dict(q=randn(g, 2, 4, HD), key_cache=kc, value_cache=vc, block_tables=bt, seq_lens=sl)


def paged_call(a):
    kw = {k: a[k] for k in ("softmax_scale", "window_left", "cu_seqlens_q", "max_seqlen_q", "num_splits") if k in a}
    return pyllmops.paged_attention(a["q"], a["key_cache"], a["value_cache"], a["block_tables"], a["seq_lens"], **kw)


def paged_ref(a):
    """Each sequence as bottom-right causal attention over its gathered keys (reference.attention, float64):
    the paged contract, with the NaN policy of the attention reference."""
    q, kc, vc, bt, sl = a["q"], a["key_cache"], a["value_cache"], a["block_tables"].long(), a["seq_lens"].long()
    n = bt.shape[0]
    cu = a["cu_seqlens_q"].long().tolist() if a.get("cu_seqlens_q") is not None else list(range(n + 1))
    wl = a.get("window_left", -1)
    wl = -1 if wl is None or wl >= 2**31 else wl
    out = torch.zeros(q.shape, dtype=D64)
    for s in range(n):
        L = int(sl[s])
        t = torch.arange(L)
        blocks = bt[s][t // kc.shape[1]]
        k, v = kc[blocks, t % kc.shape[1]].double(), vc[blocks, t % kc.shape[1]].double()
        qs = q[cu[s]:cu[s + 1]].double()
        if qs.shape[0]:
            o, _ = ref_attn.attention(qs[None], k[None], v[None], True, (wl, 0), a.get("softmax_scale"))
            out[cu[s]:cu[s + 1]] = o[0]
    return out


PAGED_NAMES = {"key_cache": ["key_cache"], "value_cache": ["value_cache"], "block_tables": ["block_tables"],
               "seq_lens": ["seq_lens"], "cu_seqlens_q": ["cu_seqlens_q"], "q": ["q"]}
register_tensor_fuzz("paged/paged_attention", paged_build, paged_call, paged_ref, PAGED_NAMES,
                     nonfinite=("q", "key_cache", "value_cache"), int_args=("block_tables", "seq_lens"),
                     contiguous=("key_cache", "value_cache"))
register_tensor_fuzz("paged/paged_attention_multi", lambda g: paged_build(g, True), paged_call, paged_ref, PAGED_NAMES,
                     nonfinite=("q",), int_args=("block_tables", "seq_lens", "cu_seqlens_q"),
                     skip_layout=("key_cache", "value_cache"))
register_scalar_fuzz("paged/paged_attention", paged_build, paged_call, paged_ref, "softmax_scale",
                     SCALES_BAD + [("1e38", 1e38), ("1e31", 1e31)])
register_scalar_fuzz("paged/paged_attention", paged_build, paged_call, paged_ref, "window_left",
                     [("2p31", 2**31), ("2p63m1", 2**63 - 1), ("minus2", -2), ("float", 3.0), ("zero", 0), ("one", 1)])
register_scalar_fuzz("paged/paged_attention_multi", lambda g: paged_build(g, True), paged_call, paged_ref,
                     "max_seqlen_q",
                     [(f"big_{v}", v) for v in BIG_INTS] + [("zero", 0), ("too_small", 3), ("float", 4.0)])
register_scalar_fuzz("paged/paged_attention", paged_build, paged_call, paged_ref, "num_splits",
                     [("zero", 0), ("65", 65), ("2p40", 2**40), ("float", 2.0), ("four", 4), ("one", 1)])
for label, bt, sl in (("block_out_of_range", [[4, 1, 6], [2, 5, -1]], None),
                      ("block_negative_used", [[4, -1, 0], [2, 5, -1]], None),
                      ("seq_len_over_table", None, [25, 10]), ("seq_len_negative", None, [19, -1]),
                      ("seq_len_int32_max", None, [2**31 - 1, 10])):
    def fn(g, bt=bt, sl=sl):
        a = paged_build(g)
        if bt is not None:
            a["block_tables"] = torch.tensor(bt, dtype=torch.int32)
        if sl is not None:
            a["seq_lens"] = torch.tensor(sl, dtype=torch.int32)
        must_error(lambda: paged_call(a), ["block_tables", "seq_lens"])
    add(f"paged/paged_attention/metadata/{label}", fn)


def _paged_split_nonfinite(value, label):
    def fn(g):
        a = paged_build(g)
        a["num_splits"] = 4
        a["q"][0, 1, 2] = value
        error_or_correct(lambda: paged_call(a), lambda: paged_ref(a), ["q"])
    add(f"paged/paged_attention/q/split4_{label}", fn)


for label, value in (("nan", float("nan")), ("posinf", math.inf), ("neginf", -math.inf)):
    _paged_split_nonfinite(value, label)


def rc_build(g):
    kc, vc = randn(g, 4, BS, HKV, HD), randn(g, 4, BS, HKV, HD)
    return dict(key=randn(g, 5, HKV, HD), value=randn(g, 5, HKV, HD), key_cache=kc, value_cache=vc,
                slot_mapping=torch.tensor([3, 9, -1, 31, 0], dtype=torch.int64))


def rc_call(a):
    kc, vc = a["key_cache"], a["value_cache"]
    pyllmops.reshape_and_cache(a["key"], a["value"], kc, vc, a["slot_mapping"])
    return kc, vc


def rc_ref(a):
    kc, vc = a["key_cache"].double().clone(), a["value_cache"].double().clone()
    flat_k, flat_v = kc.view(-1, HKV, HD), vc.view(-1, HKV, HD)
    for i, s in enumerate(a["slot_mapping"].tolist()):
        if s >= 0:
            flat_k[s], flat_v[s] = a["key"][i].double(), a["value"][i].double()
    return kc, vc


def _rc_case(mutate_args, expect, names):
    def fn(g):
        a = rc_build(g)
        mutate_args(a, g)
        before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor) and v.layout == torch.strided
                  and v.device.type == "cpu"}
        ref, must = None, expect == "error"
        if not must:
            try:
                ref = rc_ref({k: (v.to_dense() if isinstance(v, torch.Tensor) and v.layout != torch.strided else v)
                              for k, v in a.items()})
            except Exception:  # noqa: BLE001  (no reference for this input: only an error is right)
                must = True
        ok, r = attempt(lambda: rc_call(a))
        if not ok:
            check_error(r, names)
            for k, v in before.items():  # refused before any write
                if not torch.equal(v.nan_to_num(7.0), a[k].nan_to_num(7.0)):
                    raise Bad(f"{k} was modified before the error was raised")
            return
        if must:
            raise Bad(f"returned (and wrote the caches); expected an error naming {names}")
        compare(r, ref, 0.0)
    return fn


def _set(k, f):
    def m(a, g):
        a[k] = f(a[k], g)
    return m


RC_ARGS = ("key", "value", "key_cache", "value_cache", "slot_mapping")
for arg in RC_ARGS:
    is_int = arg == "slot_mapping"
    muts = [("dtype_float32" if is_int else "dtype_int64",
             (lambda t, g: t.float()) if is_int else (lambda t, g: t.long()), "error"),
            ("rank_plus1", lambda t, g: t.unsqueeze(0), "error"), ("sparse", lambda t, g: t.to_sparse(), "error"),
            ("meta", lambda t, g: t.to("meta"), "error"), ("zero_dim0", lambda t, g: t[:0], "either")]
    if is_int:
        muts.append(("dtype_int32", lambda t, g: t.int(), "either"))
    else:
        muts.append(("dtype_float64", lambda t, g: t.double(), "either"))
        if arg in ("key", "value"):
            muts += [("transposed", lambda t, g: t.transpose(0, 1).contiguous().transpose(0, 1), "either"),
                     ("expanded", lambda t, g: t[:1].expand(t.shape), "either"),
                     ("nan", lambda t, g: poison_value(t, g, float("nan")), "either")]
        else:
            muts.append(("transposed", lambda t, g: t.transpose(0, 1), "either"))
    for label, f, expect in muts:
        nm = [arg] if label == "sparse" or label.startswith("dtype") else [arg, *RC_ARGS, "shape", "device"]
        add(f"paged/reshape_and_cache/{arg}/{label}", _rc_case(_set(arg, f), expect, nm))
for label, slots in (("duplicate", [3, 9, 3, 31, 0]), ("out_of_range", [3, 9, -1, 32, 0]),
                     ("below_minus1", [3, 9, -2, 31, 0]),
                     ("int64_max", [3, 9, 2**63 - 1, 31, 0])):
    add(f"paged/reshape_and_cache/slot_mapping/{label}",
        _rc_case(_set("slot_mapping", lambda t, g, slots=slots: torch.tensor(slots, dtype=torch.int64)), "error",
                 ["slot_mapping"]))
add("paged/reshape_and_cache/value_cache/aliases_key_cache",
    _rc_case(lambda a, g: a.__setitem__("value_cache", a["key_cache"]), "error", ["value_cache", "key_cache"]))


def _cache_ctor(kwargs, names, value=None):
    def fn(g):
        base = dict(num_layers=1, num_blocks=4, block_size=8, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                    device="cpu")
        base.update(kwargs)
        args = [base.pop(k) for k in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim")]
        must_error(lambda: PagedKVCache(*args, **base), names, value)
    return fn


for label, kw, nm, val in (("kv_heads_zero", dict(num_kv_heads=0), "num_kv_heads", 0),
                           ("head_dim_zero", dict(head_dim=0), "head_dim", 0),
                           ("head_dim_huge", dict(head_dim=2**20), "head_dim", 2**20),
                           ("blocks_2p62", dict(num_blocks=2**62), "num_blocks", 2**62),
                           ("block_size_3", dict(block_size=3), "block_size", 3),
                           ("layers_float", dict(num_layers=1.0), "num_layers", None),
                           ("dtype_int", dict(dtype=torch.int64), "dtype", None),
                           ("window_negative", dict(sliding_window=-3), "sliding_window", -3)):
    add(f"paged/PagedKVCache/{label}", _cache_ctor(kw, nm, val))


def _alloc_case(num_tokens, names, value=None):
    def fn(g):
        cache = PagedKVCache(1, 4, 8, 2, 16, dtype=torch.float32, device="cpu")
        s = cache.add_sequence()
        free = cache.num_free_blocks
        must_error(lambda: cache.allocate_slots([s], num_tokens), names, value)
        after = cache.num_free_blocks
        if after != free or cache.seq_len(s) != 0:
            raise Bad("a refused allocate_slots changed the cache")
    return fn


for label, n, nm, val in (("float", 2.0, "num_tokens", None), ("negative", -1, "num_tokens", -1),
                          ("huge", 2**62, "num_tokens", None), ("too_many", 33, "num_tokens", None),
                          ("bool", True, "num_tokens", None), ("none", None, "num_tokens", None),
                          ("list_wrong_len", [1, 2], "num_tokens", None)):
    add(f"paged/PagedKVCache/allocate_slots/{label}", _alloc_case(n, [nm, "OutOfBlocks", "blocks"], val))


def _cache_unknown_seq(g):
    cache = PagedKVCache(1, 4, 8, 2, 16, dtype=torch.float32, device="cpu")
    must_error(lambda: cache.allocate_slots([7], 1), ["seq", "7"])
    must_error(lambda: cache.free(7), ["seq", "7"])
    must_error(lambda: cache.fork(7), ["seq", "7"])


add("paged/PagedKVCache/unknown_sequence", _cache_unknown_seq)


# ================================================================ nf4
def nf4_q_build(g):
    return dict(w=randn(g, 24, 40, scale=0.05))


def nf4_q_call(a):
    packed, st = pyllmops.quantize_nf4(a["w"], a.get("blocksize", 64), a.get("double_quant", False))
    return pyllmops.dequantize_nf4(packed, st)


def nf4_q_ref(a):
    w = a["w"]
    packed, absmax = ref_nf4.quantize_nf4(w.float().reshape(-1), a.get("blocksize", 64))
    st = pyllmops.NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=a.get("blocksize", 64))
    return ref_nf4.dequantize_nf4(packed, st).to(w.dtype).double()


register_tensor_fuzz("nf4/quantize_nf4", nf4_q_build, nf4_q_call, nf4_q_ref, {"w": ["w"]}, tol=0, nonfinite=("w",),
                     value_policy=lambda arg: "refuse")
register_scalar_fuzz("nf4/quantize_nf4", nf4_q_build, nf4_q_call, nf4_q_ref, "blocksize",
                     [("zero", 0), ("48", 48), ("8192", 8192), ("2p62", 2**62), ("float", 64.0), ("bool", True)],
                     expect="error")
register_scalar_fuzz("nf4/quantize_nf4", nf4_q_build, nf4_q_call, nf4_q_ref, "double_quant",
                     [("int", 1), ("str", "yes")], expect="error")


def _nf4_double_quant_inf(g):
    w = randn(g, 48, 32, scale=0.05)
    w[3, 5] = math.inf
    ok, r = attempt(lambda: pyllmops.quantize_nf4(w, 64, True))
    if ok:
        raise Bad("an inf weight was quantized with double_quant=True")
    check_error(r, ["w"])
    if "index" not in str(r):
        raise Bad(f"the error does not name the first bad index: {r}")


add("nf4/quantize_nf4/w/inf_double_quant", _nf4_double_quant_inf)


def nf4_lin_build(g):
    w = randn(g, 24, 64, scale=0.05)
    packed, st = pyllmops.quantize_nf4(w, 64, True)
    return dict(x=randn(g, 3, 64), packed=packed, absmax=st.absmax, nested_absmax=st.nested_absmax,
                nested_code=st.nested_code, nested_offset=st.nested_offset, bias=randn(g, 24), _st=st)


def _state(a):
    st = a["_st"]
    return pyllmops.NF4State(absmax=a["absmax"], shape=st.shape, dtype=st.dtype, blocksize=st.blocksize,
                             nested_absmax=a["nested_absmax"], nested_code=a["nested_code"],
                             nested_offset=a["nested_offset"])


def nf4_lin_call(a):
    return pyllmops.nf4_linear(a["x"], a["packed"], _state(a), a["bias"])


def nf4_lin_ref(a):
    st = _state({k: (v.to_dense() if isinstance(v, torch.Tensor) and v.layout != torch.strided else v)
                 for k, v in a.items()})
    return ref_nf4.nf4_linear(a["x"].double(), a["packed"], st, _d(a["bias"]))


register_tensor_fuzz("nf4/nf4_linear", nf4_lin_build, nf4_lin_call, nf4_lin_ref,
                     {"packed": ["packed"], "absmax": ["absmax"], "nested_absmax": ["nested_absmax"],
                      "nested_code": ["nested_code"], "nested_offset": ["nested_offset"], "bias": ["bias"]},
                     nonfinite=("x", "bias"), int_args=("packed", "absmax"))


def nf4_deq_call(a):
    return pyllmops.dequantize_nf4(a["packed"], _state(a))


def nf4_deq_ref(a):
    st = _state(a)
    return ref_nf4.dequantize_nf4(a["packed"], st).float().double()


register_tensor_fuzz("nf4/dequantize_nf4",
                     lambda g: {k: v for k, v in nf4_lin_build(g).items() if k not in ("x", "bias")},
                     nf4_deq_call, nf4_deq_ref, {}, tol=1e-6, int_args=("packed", "absmax"))


def _bnb(mutate, names):
    def fn(g):
        w = randn(g, 16, 64, scale=0.05)
        _, st = pyllmops.quantize_nf4(w, 64, True)
        d = st.as_bnb_dict()
        mutate(d)
        must_error(lambda: pyllmops.NF4State.from_bnb_dict(d), names)
    return fn


_BLOB = "quant_state.bitsandbytes__nf4"
for label, mut, nm in (
        ("blob_not_utf8", lambda d: d.__setitem__(_BLOB, torch.tensor([0xff, 0xfe, 0x00], dtype=torch.uint8)),
         [_BLOB, "quant_state"]),
        ("blob_not_json", lambda d: d.__setitem__(_BLOB, torch.tensor(list(b"{x"), dtype=torch.uint8)),
         [_BLOB, "quant_state"]),
        ("blob_a_list", lambda d: d.__setitem__(_BLOB, torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
         [_BLOB, "quant_state"]),
        ("blocksize_str", lambda d: _patch_blob(d, blocksize="x"), ["blocksize"]),
        ("shape_negative", lambda d: _patch_blob(d, shape=[-16, 64]), ["shape"]),
        ("dtype_unknown", lambda d: _patch_blob(d, dtype="float7"), ["dtype"]),
        ("absmax_missing", lambda d: d.pop("absmax"), ["absmax"]),
        ("absmax_wrong_size", lambda d: d.__setitem__("absmax", d["absmax"][:3]), ["absmax"]),
        ("nested_offset_str", lambda d: _patch_blob(d, nested_offset="a"), ["nested_offset"]),
        ("quant_map_wrong", lambda d: d.__setitem__("quant_map", d["quant_map"] * 2), ["quant_map"]),
        ("not_a_dict", None, ["d", "dict"])):
    if mut is None:
        add(f"nf4/from_bnb_dict/{label}",
            lambda g: must_error(lambda: pyllmops.NF4State.from_bnb_dict([1, 2]), ["d", "dict"]))
    else:
        add(f"nf4/from_bnb_dict/{label}", _bnb(mut, nm))


def _patch_blob(d, **kw):
    import json
    meta = json.loads(bytes(d[_BLOB].tolist()).decode())
    meta.update(kw)
    d[_BLOB] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _nf4_strided_state(g):
    """Strided (valid) nested metadata is accepted and decodes as the contiguous one."""
    w = randn(g, 64, 64, scale=0.05)
    packed, st = pyllmops.quantize_nf4(w, 64, True)
    want = pyllmops.dequantize_nf4(packed, st)
    st2 = pyllmops.NF4State(absmax=st.absmax, shape=st.shape, dtype=st.dtype, blocksize=st.blocksize,
                            nested_absmax=torch.stack([st.nested_absmax, st.nested_absmax], -1)[:, 0],
                            nested_code=torch.stack([st.nested_code, st.nested_code], -1)[:, 0],
                            nested_offset=st.nested_offset)
    ok, r = attempt(lambda: pyllmops.dequantize_nf4(packed, st2))
    if not ok:
        raise Bad(f"valid strided nested_absmax / nested_code refused: {type(r).__name__}: {r}")
    compare(r, want.double(), 0)


add("nf4/NF4State/strided_nested", _nf4_strided_state)


# ================================================================ lora
def lora_build(g):
    return dict(x=randn(g, 3, 5, 32), weight=randn(g, 24, 32, scale=0.2), lora_a=randn(g, 8, 32, scale=0.2),
                lora_b=randn(g, 24, 8, scale=0.2), scaling=2.0, bias=randn(g, 24))


def lora_call(a):
    return pyllmops.lora_linear(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["scaling"], a["bias"])


def lora_ref(a):
    s = a["scaling"]
    return ref_lora.lora_linear(_d(a["x"]), _d(a["weight"]), _d(a["lora_a"]), _d(a["lora_b"]), s, _d(a["bias"]))


register_tensor_fuzz("lora/lora_linear", lora_build, lora_call, lora_ref, {}, nonfinite=("x", "weight", "lora_a",
                                                                                      "lora_b", "bias"))
register_scalar_fuzz("lora/lora_linear", lora_build, lora_call, lora_ref, "scaling",
                     [("nan", float("nan")), ("inf", math.inf), ("1e39", 1e39), ("str", "2"), ("none", None),
                      ("zero", 0.0), ("negative", -2.0), ("1e30", 1e30)], tol=1e-4)


def _lora_b_zero_huge_scaling(g):
    """B = 0 and a scaling that overflows float32: the output is the base layer (or a clear error)."""
    a = lora_build(g)
    a["lora_b"] = torch.zeros_like(a["lora_b"])
    a["scaling"] = 1e39
    error_or_correct(lambda: lora_call(a), lambda: lora_ref({**a, "scaling": 0.0}), ["scaling"], 1e39)


add("lora/lora_linear/scaling/1e39_b_zero", _lora_b_zero_huge_scaling)


def _lora_in_zero(g):
    a = lora_build(g)
    a.update(x=a["x"][..., :0], weight=a["weight"][:, :0], lora_a=a["lora_a"][:, :0])
    error_or_correct(lambda: lora_call(a), lambda: lora_ref(a), ["in_features", "x", "weight"])


add("lora/lora_linear/in_features_zero", _lora_in_zero)


def qi_build(g):
    return dict(w=randn(g, 16, 128, scale=0.05))


def qi_call(a):
    bits, gs = a.get("bits", 4), a.get("group_size", 64)
    qw, sc, z = pyllmops.quantize_int(a["w"], bits, gs)
    return pyllmops.dequantize_int(qw, sc, z, bits, gs)


def qi_ref(a):
    bits, gs = a.get("bits", 4), a.get("group_size", 64)
    codes, sc, z = ref_lora.quantize_int(a["w"].float(), bits, gs)
    n, k = codes.shape
    return ((codes.reshape(n, k // gs, gs).double() * sc.double()[..., None] + z.double()[..., None])
            .reshape(n, k).float().double())


register_tensor_fuzz("lora/quantize_int", qi_build, qi_call, qi_ref, {"w": ["w"]}, tol=1e-6, nonfinite=("w",),
                     value_policy=lambda arg: "refuse")
register_scalar_fuzz("lora/quantize_int", qi_build, qi_call, qi_ref, "bits",
                     [("one", 1), ("five", 5), ("float", 4.0), ("2p62", 2**62)], expect="error")
register_scalar_fuzz("lora/quantize_int", qi_build, qi_call, qi_ref, "group_size",
                     [("zero", 0), ("negative", -64), ("not_divisor", 48), ("2p62", 2**62), ("float", 64.0)],
                     expect="error")


def qlora_build(g):
    w = randn(g, 24, 64, scale=0.05)
    packed, st = pyllmops.quantize_nf4(w, 64, True)
    return dict(x=randn(g, 3, 64), packed=packed, state=st, lora_a=randn(g, 8, 64, scale=0.2),
                lora_b=randn(g, 24, 8, scale=0.2), scaling=2.0, bias=None)


def qlora_call(a):
    return pyllmops.qlora_linear(a["x"], a["packed"], a["state"], a["lora_a"], a["lora_b"], a["scaling"], a["bias"])


def qlora_ref(a):
    return ref_lora.qlora_linear(a["x"].double(), a["packed"], a["state"], _d(a["lora_a"]), _d(a["lora_b"]),
                                 a["scaling"])


register_tensor_fuzz("lora/qlora_linear", qlora_build, qlora_call, qlora_ref, {}, nonfinite=("x", "lora_a", "lora_b"),
                     int_args=("packed",))
register_scalar_fuzz("lora/qlora_linear", qlora_build, qlora_call, qlora_ref, "scaling",
                     [("nan", float("nan")), ("inf", math.inf), ("1e39", 1e39)])


def qalora_build(g):
    qw, sc, z = pyllmops.quantize_int(randn(g, 24, 128, scale=0.05), 4, 32)
    return dict(x=randn(g, 3, 128), qweight=qw, scales=sc, zeros=z, lora_a=randn(g, 8, 4, scale=0.2),
                lora_b=randn(g, 24, 8, scale=0.2), scaling=2.0)


def qalora_call(a):
    return pyllmops.qalora_linear(a["x"], a["qweight"], a["scales"], a["zeros"], a["lora_a"], a["lora_b"], a["scaling"],
                                  bits=a.get("bits", 4), group_size=a.get("group_size", 32))


def qalora_ref(a):
    return ref_lora.qalora_linear(a["x"].double(), a["qweight"], _d(a["scales"]), _d(a["zeros"]), _d(a["lora_a"]),
                                  _d(a["lora_b"]), a["scaling"], a.get("bits", 4), a.get("group_size", 32))


register_tensor_fuzz("lora/qalora_linear", qalora_build, qalora_call, qalora_ref, {},
                     nonfinite=("x", "scales", "zeros", "lora_a", "lora_b"), int_args=("qweight",))
register_scalar_fuzz("lora/qalora_linear", qalora_build, qalora_call, qalora_ref, "scaling",
                     [("nan", float("nan")), ("inf", math.inf), ("1e39", 1e39)])
register_scalar_fuzz("lora/qalora_linear", qalora_build, qalora_call, qalora_ref, "group_size",
                     [("zero", 0), ("2p62", 2**62), ("wrong", 64)], expect="error")


def _lora_module(kwargs, names, value=None):
    def fn(g):
        must_error(lambda: pnn.LoRALinear(torch.nn.Linear(32, 24), **kwargs), names, value)
    return fn


for label, kw, nm, val in (("alpha_1e40", dict(alpha=1e40), "alpha", 1e40),
                           ("alpha_nan", dict(alpha=float("nan")), "alpha", None),
                           ("r_zero", dict(r=0), "r", 0), ("r_float", dict(r=4.0), "r", None),
                           ("dropout_one", dict(dropout=1.0), "dropout", 1.0),
                           ("dropout_nan", dict(dropout=float("nan")), "dropout", None)):
    add(f"nn/LoRALinear/{label}", _lora_module(kw, nm, val))


def _lora_merge_roundtrip(g):
    """merge() then forward equals the unmerged forward; unmerge restores the base weight exactly or closely."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    base = torch.nn.Linear(32, 24)
    m = pnn.LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = randn(g, 3, 32)
    want = m(x).detach()
    w0 = base.weight.detach().clone()
    m.merge()
    compare(m(x), want.double(), 1e-5, "merged forward")
    m.unmerge()
    compare(m.base_layer.weight, w0.double(), 1e-5, "unmerged weight")


add("nn/LoRALinear/merge_unmerge", _lora_merge_roundtrip)


def _nf4_linear_module(g):
    must_error(lambda: pnn.NF4Linear(64, 32, blocksize=48), ["blocksize"], 48)
    must_error(lambda: pnn.NF4Linear(0, 32), ["in_features"], 0)
    m = pnn.NF4Linear.from_linear(torch.nn.Linear(64, 32))
    must_error(lambda: m(randn(g, 3, 63)), ["x", "in_features"])


add("nn/NF4Linear/bad_args", _nf4_linear_module)


def _apply_lora_all_or_nothing(g):
    from pyllmops.models import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                                  num_kv_heads=2))
    names = [n for n, _ in model.named_modules()]
    ok, r = attempt(lambda: pyllmops.apply_lora(model, target_modules=["q_proj", "down_proj"], quantize="int4",
                                                group_size=64))
    if ok:
        raise Bad("apply_lora accepted group_size=64 for down_proj (in_features 96)")
    check_error(r, ["group_size", "down_proj"])
    if [n for n, _ in model.named_modules()] != names:
        raise Bad("apply_lora replaced some layers before it raised (half-applied)")


add("nn/apply_lora/half_apply", _apply_lora_all_or_nothing)


# ================================================================ models
def _tiny_decoder():
    from pyllmops.models import Decoder, DecoderConfig
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                 num_kv_heads=1))


def _decoder_ids(ids, names, value=None):
    def fn(g):
        m = _tiny_decoder()
        must_error(lambda: m(ids()), names, value)
    return fn


add("models/Decoder/input_ids/out_of_vocab", _decoder_ids(lambda: torch.tensor([[1, 2, 64]]), ["input_ids"], 64))
add("models/Decoder/input_ids/negative", _decoder_ids(lambda: torch.tensor([[1, -1, 3]]), ["input_ids"], -1))
add("models/Decoder/input_ids/float", _decoder_ids(lambda: torch.tensor([[1.0, 2.0]]), ["input_ids"]))
add("models/Decoder/input_ids/sparse", _decoder_ids(lambda: torch.tensor([[1, 2]]).to_sparse(), ["input_ids"]))
add("models/Decoder/input_ids/rank3", _decoder_ids(lambda: torch.tensor([[[1, 2]]]), ["input_ids"]))


def _generate(kwargs, names, value=None, prompts=((1, 2, 3),)):
    def fn(g):
        from pyllmops.models import generate
        m = _tiny_decoder()
        must_error(lambda: generate(m, [list(p) for p in prompts], 4, **kwargs), names, value)
    return fn


for label, kw, nm, val in (("temperature_nan", dict(temperature=float("nan")), "temperature", float("nan")),
                           ("temperature_inf", dict(temperature=math.inf), "temperature", math.inf),
                           ("temperature_negative", dict(temperature=-1.0), "temperature", -1.0),
                           ("temperature_str", dict(temperature="hot"), "temperature", None),
                           ("top_p_nan", dict(top_p=float("nan")), "top_p", float("nan")),
                           ("top_p_zero", dict(top_p=0.0), "top_p", 0.0),
                           ("top_p_two", dict(top_p=2.0), "top_p", 2.0),
                           ("block_size_3", dict(block_size=3), "block_size", 3)):
    add(f"models/generate/{label}", _generate(kw, nm, val))
add("models/generate/prompt_out_of_vocab", _generate({}, ["prompts"], None, prompts=((1, 99),)))
add("models/generate/prompt_empty", _generate({}, ["prompts"], None, prompts=((),)))


def _generate_tiny_temperature(g):
    from pyllmops.models import generate
    m = _tiny_decoder()
    ok, r = attempt(lambda: generate(m, [[1, 2, 3]], 3, temperature=1e-30, generator=torch.Generator().manual_seed(0)))
    if not ok:
        check_error(r, "temperature", 1e-30)
        return
    greedy = generate(m, [[1, 2, 3]], 3)
    if r != greedy:
        raise Bad(f"temperature 1e-30 sampled {r}, greedy is {greedy}")


add("models/generate/temperature_tiny", _generate_tiny_temperature)


# ================================================================ int (QA-LoRA base) linear, dequantize
def int_build(g):
    qw, sc, z = pyllmops.quantize_int(randn(g, 24, 128, scale=0.05), 4, 32)
    return dict(x=randn(g, 3, 128), qweight=qw, scales=sc, zeros=z, bias=randn(g, 24))


def int_call(a):
    return pyllmops.int_linear(a["x"], a["qweight"], a["scales"], a["zeros"], bits=4, group_size=32, bias=a["bias"])


def int_ref(a):
    w = ref_lora.dequantize_int(a["qweight"], _d(a["scales"]), _d(a["zeros"]), 4, 32)
    return a["x"].double() @ w.T + _d(a["bias"])


register_tensor_fuzz("lora/int_linear", int_build, int_call, int_ref, {}, nonfinite=("x", "scales", "zeros", "bias"),
                     int_args=("qweight",))
register_tensor_fuzz("lora/dequantize_int", lambda g: {k: v for k, v in int_build(g).items() if k not in ("x", "bias")},
                     lambda a: pyllmops.dequantize_int(a["qweight"], a["scales"], a["zeros"], 4, 32),
                     lambda a: ref_lora.dequantize_int(a["qweight"], _d(a["scales"]), _d(a["zeros"]), 4, 32)
                     .float().double(), {}, tol=1e-6, nonfinite=("scales", "zeros"), int_args=("qweight",))


# ================================================================ huge sizes (stride-0 views cost no memory)
def _huge(call_with, names):
    """An input of an enormous size (numel within int64): a clear error, or torch's allocator refusing the
    output (resource exhaustion, not a contract breach); never a hang, a crash or an overflowed index."""
    def fn(g):
        ok, r = attempt(call_with(g))
        if ok:
            raise Bad("returned a result for a tensor of an astronomically large size")
        if isinstance(r, RuntimeError) and "allocate" in str(r):
            return
        check_error(r, names)
    return fn


add("attention/flash_attention/k/huge_seqlen_expanded", _huge(
    lambda g: lambda: pyllmops.flash_attention(randn(g, 1, 4, 2, 16), randn(g, 1, 1, 2, 16).expand(1, 2**40, 2, 16),
                                               randn(g, 1, 1, 2, 16).expand(1, 2**40, 2, 16)),
    ["k", "v", "seqlen", "size"]))
add("attention/flash_attention/q/huge_batch_expanded", _huge(
    lambda g: lambda: pyllmops.flash_attention(randn(g, 1, 4, 2, 16).expand(2**40, 4, 2, 16),
                                               randn(g, 1, 4, 2, 16).expand(2**40, 4, 2, 16),
                                               randn(g, 1, 4, 2, 16).expand(2**40, 4, 2, 16)),
    ["q", "batch", "size"]))
add("lora/lora_linear/x/huge_rows_expanded", _huge(
    lambda g: lambda: pyllmops.lora_linear(randn(g, 1, 32).expand(2**40, 32), randn(g, 24, 32), randn(g, 8, 32),
                                           randn(g, 24, 8), 2.0),
    ["x", "size", "rows"]))
add("nf4/nf4_linear/x/huge_rows_expanded", _huge(
    lambda g: (lambda w: lambda: pyllmops.nf4_linear(randn(g, 1, 64).expand(2**40, 64), *pyllmops.quantize_nf4(w)))(
        randn(g, 24, 64)), ["x", "size", "rows"]))
add("paged/paged_attention/q/huge_heads_expanded", _huge(
    lambda g: lambda: pyllmops.paged_attention(randn(g, 2, 1, HD).expand(2, 2**40, HD), randn(g, 6, BS, HKV, HD),
                                               randn(g, 6, BS, HKV, HD),
                                               torch.tensor([[4, 1, 0], [2, 5, -1]], dtype=torch.int32),
                                               torch.tensor([19, 10], dtype=torch.int32)), ["q", "heads", "size"]))


# ================================================================ modules that change state: all or nothing
def _load_adapter_atomic(g):
    from pyllmops.nn.lora import adapter_state_dict, load_adapter_state_dict
    from pyllmops.models import PROJECTIONS
    m = _tiny_decoder()
    pyllmops.apply_lora(m, r=4, target_modules=PROJECTIONS)
    sd = {k: v.clone().normal_() for k, v in adapter_state_dict(m).items()}
    last = sorted(sd)[-1]
    sd[last] = sd[last][:, :1]  # one wrong shape, sorted last: the others would load first
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ok, r = attempt(lambda: load_adapter_state_dict(m, sd))
    if ok:
        raise Bad("an adapter state dict with a wrong shape was loaded")
    check_error(r, [last, last.removeprefix("base_model.model.")])
    for k, v in m.state_dict().items():
        if not torch.equal(v, before[k]):
            raise Bad(f"{k} was written before load_adapter_state_dict raised")


add("nn/load_adapter_state_dict/all_or_nothing", _load_adapter_atomic)


def _qalora_merge(g):
    """QALoRALinear.merge() is an IntLinear with the same outputs (the documented merge formula)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    m = pnn.QALoRALinear.from_linear(torch.nn.Linear(128, 24), bits=4, group_size=32, r=4, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = randn(g, 5, 128)
    compare(m.merge()(x), m(x).detach().double(), 1e-4, "merged output")


add("nn/QALoRALinear/merge", _qalora_merge)


def _merge_adapters_model(g):
    """models.merge_adapters keeps the logits (LoRA on a dense base)."""
    from pyllmops.models import PROJECTIONS, merge_adapters
    m = _tiny_decoder()
    pyllmops.apply_lora(m, r=4, target_modules=PROJECTIONS)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.1)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    want = m(ids).detach()
    compare(merge_adapters(m)(ids), want.double(), 1e-4, "merged logits")


add("models/merge_adapters/logits", _merge_adapters_model)
