"""The fuzz cases: malformed and edge-case calls of every public op, each with its contract check.

A case is a function of a torch.Generator that raises Bad (or any exception) when the op broke the contract
of docs/errors.md, and returns when it kept it:
- a clear error: ValueError, TypeError, NotImplementedError, IndexError, KeyError or OutOfBlocksError, whose
  message names the argument (and, for scalar arguments, the value), raised before any state changed; or
- a correct result: compared with the float64 references of pyllmops.reference on the same inputs, with the
  NaN policy (a non-finite input reaches exactly the outputs it mathematically touches: the NaN / inf
  pattern must equal the reference's; finite elements within a relative error bound).

Cases are registered by name "<family>/<op>/<what>"; tests/fuzz/worker.py runs them in subprocesses with a
watchdog (tests/test_fuzz.py). Names are stable, so a failing case can be rerun alone:
    python tests/fuzz/worker.py --run attention/flash_attention/q/nan
"""
import math
import re

import torch

from pyllmops.ops.paged import OutOfBlocksError

CASES = {}  # name -> function(generator)
ALLOWED = (ValueError, TypeError, NotImplementedError, IndexError, KeyError, OutOfBlocksError)
BIG_INTS = [2**31, 2**40, 2**62, 2**63 - 1]


class Bad(AssertionError):
    """The op broke the contract; the message says how."""


def add(name, fn):
    assert name not in CASES, name
    CASES[name] = fn


# ---------------------------------------------------------------- contract checks
def _value_strings(value):
    out = {str(value), repr(value)}
    if isinstance(value, float):
        out |= {f"{value:g}", f"{value:.6g}", f"{value:e}"}
        if math.isnan(value):
            out |= {"nan", "NaN"}
    if isinstance(value, tuple):
        out |= {str(list(value))} | {str(v) for v in value}
    return out


def check_error(e, names, value=None):
    msg = str(e)
    if not isinstance(e, ALLOWED):
        raise Bad(f"unclear error: {type(e).__name__}: {msg[:400]}")
    names = [names] if isinstance(names, str) else names
    if not any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names):  # "q", not "seq"
        raise Bad(f"{type(e).__name__} does not name the argument ({' or '.join(names)}): {msg[:400]}")
    if value is not None and not any(v in msg for v in _value_strings(value)):
        raise Bad(f"{type(e).__name__} does not name the value {value!r}: {msg[:400]}")


def attempt(call):
    try:
        return True, call()
    except Exception as e:  # noqa: BLE001  (judged by the caller)
        return False, e


def must_error(call, names, value=None):
    ok, r = attempt(call)
    if ok:
        raise Bad(f"returned a result; expected an error naming {names}")
    check_error(r, names, value)


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    return [x] if isinstance(x, torch.Tensor) else []


def compare(out, ref, tol, what="output"):
    """out against the float64 reference: same shape, same NaN and +-inf positions, finite part close."""
    outs, refs = _flat(out), _flat(ref)
    if len(outs) != len(refs):
        raise Bad(f"{what}: {len(outs)} tensors, the reference has {len(refs)}")
    for i, (o, r) in enumerate(zip(outs, refs)):
        tag = f"{what}[{i}]" if len(outs) > 1 else what
        if tuple(o.shape) != tuple(r.shape):
            raise Bad(f"{tag} has shape {tuple(o.shape)}, the reference {tuple(r.shape)}")
        if o.device.type == "meta":
            continue
        # the float64 reference rounded to the output's dtype (a true value beyond its range is +-inf there)
        o64 = o.detach().cpu().double()
        r64 = r.detach().cpu().to(o.dtype).double() if o.dtype.is_floating_point else r.detach().cpu().double()
        fo, fr = ~torch.isfinite(o64), ~torch.isfinite(r64)
        if not torch.equal(fo, fr):
            extra, missing = (fo & ~fr).sum().item(), (fr & ~fo).sum().item()
            raise Bad(f"{tag}: the non-finite elements differ from the float64 reference's ({extra} extra, {missing} "
                      f"missing of {fr.sum().item()}): " + ("NaN/inf laundered into numbers" if missing else
                                                             "NaN/inf invented"))
        # where the reference is NaN the output must be NaN; where it is +-inf, that inf or NaN (whether a sum
        # meets inf - inf depends on its order)
        nan_lost = torch.isnan(r64) & ~torch.isnan(o64)
        inf_flipped = torch.isinf(r64) & torch.isinf(o64) & (r64 != o64)
        if nan_lost.any() or inf_flipped.any():
            raise Bad(f"{tag}: {nan_lost.sum().item()} NaN of the float64 reference became +-inf, "
                      f"{inf_flipped.sum().item()} infinities changed sign")
        fin = torch.isfinite(r64)
        if fin.any():
            num = (o64[fin] - r64[fin]).norm().item()
            den = r64[fin].norm().item()
            err = num / den if den > 0 else num
            if not err <= tol:
                raise Bad(f"{tag}: relative error {err:.3g} > {tol:g} against the float64 reference")


def _all_empty(r):
    items = r if isinstance(r, (tuple, list)) else (r,)
    return len(items) > 0 and all(isinstance(t, torch.Tensor) and t.numel() == 0 for t in items)


def error_or_correct(call, ref, names, value=None, tol=1e-4):
    """Either a clear error naming the argument, or a result equal to the reference (a callable). An input
    the reference itself cannot evaluate must be refused."""
    ok, r = attempt(call)
    if not ok:
        check_error(r, names, value)
        return
    if _all_empty(r):  # an empty result (e.g. zero query heads): nothing to compare, the shapes are the op's own
        return
    ok, want = attempt(ref)
    if not ok:
        raise Bad(f"returned a result for an input the float64 reference rejects ({type(want).__name__}: "
                  f"{str(want)[:200]}); expected an error naming {names}")
    compare(r, want, tol)


# ---------------------------------------------------------------- tensor mutations
def _like_at_offset(t, offset):
    """t's values in a buffer starting `offset` elements in (storage offset)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    return out


def _misaligned(t):
    """t's values at a data pointer 1 byte past alignment (None where torch cannot make one)."""
    try:
        raw = bytearray(t.numel() * t.element_size() + 1)
        out = torch.frombuffer(raw, dtype=t.dtype, offset=1, count=t.numel()).view(t.shape)
        out.copy_(t)
        return out
    except Exception:  # noqa: BLE001
        return None


def layout_mutations(t):
    """(label, tensor): t's values in other layouts, which a kernel taking strides must honour or refuse."""
    out = []
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(0, 1).contiguous().transpose(0, 1)))
    if t.dim() >= 1 and t.shape[-1] > 0:
        out.append(("last_dim_strided", torch.stack([t, t], -1)[..., 0]))
    out.append(("storage_offset", _like_at_offset(t, 3)))
    mis = _misaligned(t)
    if mis is not None:
        out.append(("misaligned", mis))
    if t.dim() >= 1 and t.shape[0] > 1:
        out.append(("expanded", t[:1].expand(t.shape)))  # stride 0, other values: the reference sees the same
    return out


def poison_value(t, g, value):
    """A copy of float t with `value` at one random element."""
    t = t.clone()
    if t.numel():
        i = int(torch.randint(0, t.numel(), (1,), generator=g))
        t.view(-1)[i] = value
    return t


NONFINITE = [("nan", float("nan")), ("posinf", math.inf), ("neginf", -math.inf)]


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def register_tensor_fuzz(prefix, build, call, reference, names, *, tol=1e-4, nonfinite=(), int_args=(),
                         skip_layout=(), contiguous=(), value_policy=None):
    """The generic cases of an op: for each tensor argument, wrong dtype, wrong rank, zero size, other
    layouts, meta / sparse, non-finite values.

    build(g) -> dict of arguments; call(args) -> result; reference(args) -> float64 result (args made
    dense, CPU). names: {argument: names its error may use}. nonfinite: float tensor arguments that get
    NaN / inf cases (value_policy(arg) -> "propagate" (default) or "refuse": a ValueError naming the index).
    contiguous: arguments documented to need contiguous memory (their other layouts may be refused)."""
    def dense(args):
        return {k: (v.to_dense() if isinstance(v, torch.Tensor) and v.layout != torch.strided else v)
                for k, v in args.items()}

    def reg(label, arg, mutate, expect):
        def fn(g):
            args = build(g)
            orig = dict(args)
            args[arg] = mutate(args[arg], g)
            nm = names.get(arg, [arg])
            if not (label == "sparse" or label.startswith("dtype")):  # a mismatch may be reported by the other side
                nm = nm + [k for k, v in orig.items() if isinstance(v, torch.Tensor)] + ["shape", "device"]
            if expect == "error":
                must_error(lambda: call(args), nm)
            elif expect == "result":
                ok, r = attempt(lambda: call(args))
                if not ok:
                    raise Bad(f"valid values in another layout were refused: {type(r).__name__}: {str(r)[:300]}")
                compare(r, reference(dense(args)), tol)
            elif expect == "error_or_meta":  # shapes only: a meta result must have the reference's shapes
                error_or_correct(lambda: call(args), lambda: reference(orig), nm, tol=tol)
            else:
                error_or_correct(lambda: call(args), lambda: reference(dense(args)), nm, tol=tol)
        add(f"{prefix}/{arg}/{label}", fn)

    def all_meta(g):
        args = build(g)
        meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        ok, r = attempt(lambda: call(meta))
        if not ok:
            check_error(r, [n for v in names.values() for n in v] + list(args))
            return
        out = _flat(r)
        if any(o.device.type != "meta" for o in out):
            raise Bad("meta inputs gave a non-meta output")
        compare(r, reference(args), tol)

    add(f"{prefix}/all_meta", all_meta)
    probe = build(torch.Generator().manual_seed(0))
    for arg, t in probe.items():
        if not isinstance(t, torch.Tensor):
            continue
        is_int = arg in int_args
        if is_int:
            reg("dtype_float32", arg, lambda t, g: t.float(), "error")
            reg("dtype_int64" if t.dtype == torch.int32 else "dtype_int32", arg,
                lambda t, g: t.long() if t.dtype == torch.int32 else t.int(), "either")
        else:
            reg("dtype_int64", arg, lambda t, g: t.round().long(), "error")
            reg("dtype_bool", arg, lambda t, g: t > 0, "error")
            reg("dtype_float64", arg, lambda t, g: t.double(), "either")
        reg("rank_plus1", arg, lambda t, g: t.unsqueeze(0), "either")
        if t.dim() >= 1:
            reg("rank_minus1", arg, lambda t, g: t[0], "either")
        reg("sparse", arg, lambda t, g: t.to_sparse(), "error")
        reg("meta", arg, lambda t, g: t.to("meta"), "error_or_meta")
        for i in range(t.dim()):
            reg(f"zero_dim{i}", arg, lambda t, g, i=i: t.narrow(i, 0, 0), "either")
        if arg in skip_layout:
            continue
        for label, _ in layout_mutations(t):
            # valid values in another layout are a result (docs/errors.md); only a misaligned pointer, or an
            # argument whose documented contract is contiguous memory, may be refused
            must_compute = (label != "misaligned" and arg not in contiguous
                            and not (is_int and label == "expanded"))  # expanded metadata: other (invalid) values
            reg(label, arg, lambda t, g, label=label: dict(layout_mutations(t))[label],
                "result" if must_compute else "either")
        if arg in nonfinite:
            for label, value in NONFINITE:
                policy = value_policy(arg) if value_policy else "propagate"
                if policy == "refuse":
                    def fn(g, arg=arg, value=value):
                        args = build(g)
                        args[arg] = poison_value(args[arg], g, value)
                        ok, r = attempt(lambda: call(args))
                        if ok:
                            raise Bad(f"a non-finite {arg} was quantized; expected a ValueError naming the index")
                        check_error(r, [arg])
                        if not isinstance(r, ValueError) or "index" not in str(r):
                            raise Bad(f"expected a ValueError naming the first bad index, got {type(r).__name__}: {r}")
                    add(f"{prefix}/{arg}/{label}", fn)
                else:
                    reg(label, arg, lambda t, g, value=value: poison_value(t, g, value), "either")


def register_scalar_fuzz(prefix, build, call, reference, arg, values, *, names=None, tol=1e-4, expect="either"):
    """Cases for a scalar argument: each value must give a clear error naming the argument and the value,
    or (expect="either") a result equal to reference(args) (which may normalize the value)."""
    for label, value in values:
        def fn(g, value=value):
            args = build(g)
            args[arg] = value
            nm = names or [arg]
            if expect == "error":
                must_error(lambda: call(args), nm, value if not isinstance(value, (str, bool, type(None))) else None)
            else:
                ok, r = attempt(lambda: call(args))
                if not ok:
                    check_error(r, nm, value if isinstance(value, (int, float)) and not isinstance(value, bool)
                                else None)
                    return
                compare(r, reference(args), tol)
        add(f"{prefix}/{arg}/{label}", fn)
