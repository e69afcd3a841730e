"""Memory-lean mixing of activations: custom autograd functions with fused forward and backward.

Shapes: projections `a`, `b` are (N, G, h) for N tokens, G gate groups and h = m / G hidden units
per group; coefficients are (N, G, n) per token (MoA gates) or (1, G, n) shared by all tokens (LA).

Two functions cover every variant (docs/design.md section 1):
- `product_mix`: P = sum_k c_k sigma_k(a), times Q = sum_l e_l tau_l(b) (`bi`), or times b (`one`),
  or alone (Type-I).
- `pair_mix`: sum_{k,l} C_kl sigma_k(a) tau_l(b) (`qd`), C stored row-major as k * K2 + l.

For backward only `a`, `b` and the coefficients are saved; the K activated copies of the hidden
tensor are recomputed, so memory stays at the baseline's level. The forward and backward bodies are
plain tensor code, compiled by torch.compile into one fused loop each (`kernel=compiled`), or run
as they are (`kernel=eager`, the reference). Math runs in at least float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..activations import ACTIVATIONS, MIXING_VALUE, VALUE_AND_DERIVATIVE

KERNELS = ("auto", "compiled", "eager")
Names = tuple[str, ...]


def _up(x):
    """At least float32: bf16 inputs are computed in float32, float64 stays float64."""
    return None if x is None else x.to(torch.promote_types(x.dtype, torch.float32))


def _mixture(x, c, names: Names, table=MIXING_VALUE):
    out = None
    for k, name in enumerate(names):
        term = c[..., k:k + 1] * table[name](x)
        out = term if out is None else out + term
    return out


def _mixture_with_derivative(x, c, names: Names):
    """sum_k c_k sigma_k(x), sum_k c_k sigma_k'(x), and the list of sigma_k(x)."""
    value = derivative = None
    values = []
    for k, name in enumerate(names):
        v, d = VALUE_AND_DERIVATIVE[name](x)
        ck = c[..., k:k + 1]
        value = ck * v if value is None else value + ck * v
        derivative = ck * d if derivative is None else derivative + ck * d
        values.append(v)
    return value, derivative, values


def _reduce_hidden(grad, values):
    return torch.stack([(grad * v).sum(-1) for v in values], dim=-1)


# --------------------------------------------------------------------------- product_mix bodies


def _product_forward(a, c, b, e, names_a: Names, names_b: Names | None):
    out = _mixture(_up(a), _up(c), names_a)
    if b is not None:
        out = out * (_up(b) if e is None else _mixture(_up(b), _up(e), names_b))
    return out.to(a.dtype)


def _product_backward(grad, a, c, b, e, names_a: Names, names_b: Names | None):
    g = _up(grad)
    p, dp, p_values = _mixture_with_derivative(_up(a), _up(c), names_a)
    if b is None:
        return g * dp, _reduce_hidden(g, p_values), None, None
    if e is None:  # `one`: the up branch is b itself
        q, dq, q_values = _up(b), None, None
    else:
        q, dq, q_values = _mixture_with_derivative(_up(b), _up(e), names_b)
    gq, gp = g * q, g * p
    da = gq * dp
    db = gp if dq is None else gp * dq
    de = None if q_values is None else _reduce_hidden(gp, q_values)
    return da, _reduce_hidden(gq, p_values), db, de


# --------------------------------------------------------------------------- pair_mix bodies


def _pair_forward(a, b, C, names_a: Names, names_b: Names):
    dtype = a.dtype
    a, b, C = _up(a), _up(b), _up(C)
    k2 = len(names_b)
    t_values = [MIXING_VALUE[name](b) for name in names_b]
    out = None
    for k, name in enumerate(names_a):
        row = _mixture_from_values(C[..., k * k2:(k + 1) * k2], t_values)
        term = MIXING_VALUE[name](a) * row
        out = term if out is None else out + term
    return out.to(dtype)


def _mixture_from_values(c, values):
    out = None
    for l, v in enumerate(values):
        term = c[..., l:l + 1] * v
        out = term if out is None else out + term
    return out


def _pair_backward(grad, a, b, C, names_a: Names, names_b: Names):
    g, a, b, C = _up(grad), _up(a), _up(b), _up(C)
    k1, k2 = len(names_a), len(names_b)
    s = [VALUE_AND_DERIVATIVE[name](a) for name in names_a]
    t = [VALUE_AND_DERIVATIVE[name](b) for name in names_b]
    t_values = [v for v, _ in t]
    s_values = [v for v, _ in s]
    da = db = None
    for k in range(k1):
        row = _mixture_from_values(C[..., k * k2:(k + 1) * k2], t_values)  # R_k = sum_l C_kl T_l
        term = s[k][1] * row
        da = term if da is None else da + term
    for l in range(k2):
        col = _mixture_from_values(C[..., l::k2], s_values)  # Q_l = sum_k C_kl S_k
        term = t[l][1] * col
        db = term if db is None else db + term
    dC = torch.stack([(g * s_values[k] * t_values[l]).sum(-1) for k in range(k1) for l in range(k2)], dim=-1)
    return g * da, g * db, dC


# --------------------------------------------------------------------------- kernel selection


@functools.cache
def _compiled(body):
    # Each dictionary is one more specialisation of the same body (parallel.allow_recompiles raises
    # dynamo's limit for them); dynamic=True: one kernel serves training and evaluation batch sizes.
    return torch.compile(body, dynamic=True, fullgraph=True)


_compile_failed = False


def _run(body, kernel: str, *args):
    """Run `body` compiled (kernel compiled/auto) or eagerly; `auto` falls back to eager on failure."""
    global _compile_failed
    if kernel == "eager" or (kernel == "auto" and _compile_failed) or torch.compiler.is_compiling():
        return body(*args)  # inside an outer torch.compile the body is traced and fused anyway
    try:
        return _compiled(body)(*args)
    except Exception as exc:  # noqa: BLE001  (inductor raises many types; auto must keep training)
        if kernel == "compiled":
            raise
        _compile_failed = True
        warnings.warn(f"torch.compile of the MoA mixing kernel failed ({type(exc).__name__}: {exc}); "
                      "using the eager kernel (slower, same results). Set ffn.kernel=eager to silence.",
                      stacklevel=2)
        return body(*args)


def _sum_to(grad, like):
    """Gradient of a coefficient that was broadcast over tokens (LA) is summed over them."""
    if grad is None or like is None or like.shape[0] == grad.shape[0]:
        return grad
    return grad.sum(0, keepdim=True)


class _ProductMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, c, b, e, names_a, names_b, kernel):
        ctx.save_for_backward(a, c, b, e)
        ctx.names, ctx.kernel = (names_a, names_b), kernel
        return _run(_product_forward, kernel, a, c, b, e, names_a, names_b)

    @staticmethod
    def backward(ctx, grad):
        a, c, b, e = ctx.saved_tensors
        da, dc, db, de = _run(_product_backward, ctx.kernel, grad.contiguous(), a, c, b, e, *ctx.names)
        da = da.to(a.dtype)
        db = db.to(b.dtype) if db is not None else None
        dc = _sum_to(dc, c).to(c.dtype)
        de = _sum_to(de, e).to(e.dtype) if de is not None else None
        return da, dc, db, de, None, None, None


class _PairMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, C, names_a, names_b, kernel):
        ctx.save_for_backward(a, b, C)
        ctx.names, ctx.kernel = (names_a, names_b), kernel
        return _run(_pair_forward, kernel, a, b, C, names_a, names_b)

    @staticmethod
    def backward(ctx, grad):
        a, b, C = ctx.saved_tensors
        da, db, dC = _run(_pair_backward, ctx.kernel, grad.contiguous(), a, b, C, *ctx.names)
        return da.to(a.dtype), db.to(b.dtype), _sum_to(dC, C).to(C.dtype), None, None, None


def product_mix(a, c, names_a: Names, b=None, e=None, names_b: Names | None = None, kernel: str = "auto"):
    return _ProductMix.apply(a, c, b, e, tuple(names_a), tuple(names_b) if names_b else None, kernel)


def pair_mix(a, b, C, names_a: Names, names_b: Names, kernel: str = "auto"):
    return _PairMix.apply(a, b, C, tuple(names_a), tuple(names_b), kernel)


# --------------------------------------------------------------------------- reference formulas


def product_mix_reference(a, c, names_a, b=None, e=None, names_b=None):
    """The plain formula with torch's own activations under ordinary autograd: what the fused path must equal."""
    out = _mixture(a, c, tuple(names_a), ACTIVATIONS)
    if b is not None:
        out = out * (b if e is None else _mixture(b, e, tuple(names_b), ACTIVATIONS))
    return out


def pair_mix_reference(a, b, C, names_a, names_b):
    k2 = len(names_b)
    out = 0
    for k, sa in enumerate(names_a):
        for l, tb in enumerate(names_b):
            out = out + C[..., k * k2 + l:k * k2 + l + 1] * ACTIVATIONS[sa](a) * ACTIVATIONS[tb](b)
    return out
