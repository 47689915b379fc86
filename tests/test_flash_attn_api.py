"""pyllmops.flash_attn_func / flash_attn_varlen_func / flash_attn_with_kvcache: FlashAttention 2's call
signatures (positional order included) against float64 references."""
import inspect

import pytest
import torch

import pyllmops
from conftest import assert_close
from pyllmops.reference.attention import attention as attention_reference


def _ref(q, k, v, causal=False, window=(-1, -1), scale=None):
    return attention_reference(q.double(), k.double(), v.double(), causal=causal, window_size=window,
                               softmax_scale=scale)[0]


def test_signatures_follow_flash_attention_2():
    names = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert names(pyllmops.flash_attn_func) == ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size",
                                               "softcap", "alibi_slopes", "deterministic", "return_attn_probs"]
    assert names(pyllmops.flash_attn_varlen_func)[:15] == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale",
        "causal", "window_size", "softcap", "alibi_slopes", "deterministic", "return_attn_probs"]
    assert names(pyllmops.flash_attn_with_kvcache)[:15] == [
        "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
        "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_func_positional(dtype):
    q = torch.randn(2, 17, 4, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 29, 2, 32, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 29, 2, 32, dtype=dtype, requires_grad=True)
    out = pyllmops.flash_attn_func(q, k, v, 0.0, 0.2, True, (5, 0))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(out, _ref(q, k, v, True, (5, 0), 0.2), tol, "flash_attn_func")
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(k.grad).all()


def test_flash_attn_varlen_func_positional():
    cu = torch.tensor([0, 5, 21, 30], dtype=torch.int32)
    q, k, v = torch.randn(30, 4, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    out = pyllmops.flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, 0.0, None, True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = _ref(q[None, a:b], k[None, a:b], v[None, a:b], True)[0]
        assert_close(out[a:b], ref, 1e-5, f"sequence {a}:{b}")


@pytest.mark.parametrize("call,arg", [
    (lambda q: pyllmops.flash_attn_func(q, q, q, 0.1), "dropout_p"),
    (lambda q: pyllmops.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (lambda q: pyllmops.flash_attn_func(q, q, q, return_attn_probs=True), "return_attn_probs"),
    (lambda q: pyllmops.flash_attn_with_kvcache(q, torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16),
                                                cache_seqlens=1, return_softmax_lse=True), "return_softmax_lse"),
    (lambda q: pyllmops.flash_attn_with_kvcache(q, torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16),
                                                cache_seqlens=2, causal=False), "causal=False"),
])
def test_unsupported_arguments_raise_not_implemented(call, arg):
    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(NotImplementedError, match=arg):
        call(q)


def _kv_reference(q, k_full, v_full, lens, causal, left, scale=None):
    """Per sequence b: q's sq queries are positions lens[b] - sq ... lens[b] - 1 of k_full[b, :lens[b]]."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        outs.append(_ref(q[b:b + 1], k_full[b:b + 1, :n], v_full[b:b + 1, :n], causal, (left, 0 if causal else -1),
                         scale)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("sq,left", [(1, -1), (3, -1), (4, 6)])
def test_flash_attn_with_kvcache_appends_and_attends(paged, sq, left):
    torch.manual_seed(0)
    batch, h, hk, d, cache_len = 3, 4, 2, 32, 64
    lens = torch.tensor([5, 0, 40], dtype=torch.int32)
    k_dense = torch.randn(batch, cache_len, hk, d)
    v_dense = torch.randn(batch, cache_len, hk, d)
    q = torch.randn(batch, sq, h, d)
    k_new, v_new = torch.randn(batch, sq, hk, d), torch.randn(batch, sq, hk, d)
    if paged:  # 16-row pages in a shuffled pool
        bs, per = 16, cache_len // 16
        perm = torch.randperm(batch * per)
        table = perm.view(batch, per).to(torch.int32)
        pool_k = torch.empty(batch * per, bs, hk, d)
        pool_v = torch.empty(batch * per, bs, hk, d)
        pool_k[perm] = k_dense.reshape(batch * per, bs, hk, d)
        pool_v[perm] = v_dense.reshape(batch * per, bs, hk, d)
        out = pyllmops.flash_attn_with_kvcache(q, pool_k, pool_v, k_new, v_new, cache_seqlens=lens, block_table=table,
                                               causal=True, window_size=(left, 0))
        got_k = pool_k[table.long()].reshape(batch, cache_len, hk, d)
    else:
        kc, vc = k_dense.clone(), v_dense.clone()
        out = pyllmops.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, None, None, lens, None, None, None, True,
                                               (left, 0))
        got_k = kc
    full_k, full_v = k_dense.clone(), v_dense.clone()
    for b in range(batch):
        n = int(lens[b])
        full_k[b, n:n + sq], full_v[b, n:n + sq] = k_new[b], v_new[b]
    assert torch.equal(got_k, full_k)  # appended in place at cache_seqlens
    ref = _kv_reference(q, full_k, full_v, lens + sq, True, left)
    assert_close(out, ref, 1e-5, "flash_attn_with_kvcache")


@pytest.mark.parametrize("interleaved", [True, False])
def test_flash_attn_with_kvcache_rotary(interleaved):
    torch.manual_seed(1)
    batch, h, d, rd = 2, 2, 32, 16
    lens = torch.tensor([3, 9], dtype=torch.int32)
    kc, vc = torch.randn(batch, 16, h, d), torch.randn(batch, 16, h, d)
    q, k, v = torch.randn(batch, 1, h, d), torch.randn(batch, 1, h, d), torch.randn(batch, 1, h, d)
    theta = torch.arange(32)[:, None].double() * (10000.0 ** (-torch.arange(rd // 2).double() / (rd // 2)))
    cos, sin = theta.cos().float(), theta.sin().float()
    k0 = kc.clone()
    out = pyllmops.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, causal=True,
                                           rotary_interleaved=interleaved)

    def rot(x, p):  # float64 reference rotation at position p
        x = x.double().clone()
        c, s = cos[p].double(), sin[p].double()
        if interleaved:
            a, b = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
            x[..., 0:rd:2], x[..., 1:rd:2] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., :rd // 2].clone(), x[..., rd // 2:rd].clone()
            x[..., :rd // 2], x[..., rd // 2:rd] = a * c - b * s, a * s + b * c
        return x

    for b in range(batch):
        n = int(lens[b])
        kr = rot(k[b, 0], n)
        assert_close(kc[b, n], kr, 1e-6, "rotated k in the cache")
        keys = torch.cat([k0[b, :n].double(), kr[None]])
        vals = torch.cat([vc[b, :n].double(), v[b].double()])
        ref = _ref(rot(q[b], n)[None], keys[None], vals[None], True)[0]
        assert_close(out[b], ref, 1e-5, "rotary kvcache output")
