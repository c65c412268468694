"""gamma_onepass: value AND gradient of the decomposable negative term in one sweep over S.

The gamma / SogCLR negative term weights each off-diagonal pair by a per-row scalar known
before the sweep (docs/math.md §A.5, §K.3): with l_ij = scale * <a_i, b_j>, entries (i, i + offset)
excluded, and alpha_row [M], alpha_col [N] supplied by the caller (detached),
    neg = w_row * sum_i row_term_i + w_col * sum_j col_term_j
    row_term_i = sum_j e^{min(l_ij + alpha_row_i, clamp)}      col_term_j likewise with alpha_col_j
    dneg/dl_ij = W_ij = w_row e^{min(l_ij + alpha_row_i, clamp)}
                      + w_col e^{min(l_ij + alpha_col_j, clamp)}
No batch normaliser enters W, so every S tile is final when it is computed: one sweep forms S,
the weights, and dA = scale * W @ b, dB = scale * W^T @ a, dscale = <A, W @ b>_F, and (for the
rate state, updated after use) the excluded-positive row/column LSEs. FLOPs: 3 GEMM-equivalents
(6MND) against 4 (8MND) for an LSE pass followed by a gradient pass.

`clamp` caps each exponent so a stale rate can never overflow fp32 (e^30 ~ 1e13 per entry: sums
over 1e25 entries stay finite); W uses the capped weight, so where the cap bites the gradient is
that of the uncapped loss with the pair's weight clipped (not the derivative of the capped
value, which would be 0). With rates updated before use (docs/math.md §K.1) every weight is at most
G_i / ema and the cap never bites.

Backend contract (every backend implements exactly this function):
    fwd(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad)
        -> (row_lse [M], col_lse [N], row_term [M], col_term [N], da_raw [M, D], db_raw [N, D])
    a: [M, D], b: [N, D] same dtype, stride(-1) == 1; scale: 0-d tensor in the accumulation dtype
    (fp64 for fp64 inputs, else fp32) on the features' device; alpha_* contiguous, accumulation
    dtype; w_*, clamp: Python floats; outputs in the accumulation dtype. grad=False skips W and
    the two gradient GEMMs (da_raw, db_raw are then [0, D]). An all-excluded row has LSE -inf and
    term 0. Implementations: torch_fwd below (chunked PyTorch), gammacl.kernels.gamma_onepass
    (Triton), csrc/gamma_onepass.cpp (torch.ops.gammacl.gamma_onepass_fwd, CPU).

The gradient is computed in the forward and stashed (O((M+N)D), never M x N); the backward only
scales it by the upstream gradient of `neg`, so `neg` is the one differentiable output.

Determinism: the torch and cpp backends sum in a fixed order. The Triton kernel merges column
sums (col_term) and dB across row blocks with atomics (rounding-level run-to-run changes on GPU);
under torch.use_deterministic_algorithms(True) it takes an atomic-free two-launch path instead
(kernels/gamma_onepass.py, 8MND). Autocast is switched off inside the op.
"""

from __future__ import annotations

import torch

from gammacl._ext import compiled_fake
from gammacl._validate import acc_dtype
from gammacl.dispatch import resolve_traced
from gammacl.ops._backends import fwd_backends, fwd_fake, stashed_grads
from gammacl.ops.simlse import _acc_operands, _masked_logits

DEFAULT_CLAMP = 30.0


def torch_fwd(
    a, b, scale, alpha_row, alpha_col,
    w_row: float, w_col: float, clamp: float, offset: int, grad: bool,
):  # fmt: skip
    af, bf, step = _acc_operands(a, b)
    acc = af.dtype
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    row_lse = torch.empty(m, dtype=acc, device=a.device)
    row_term = torch.empty(m, dtype=acc, device=a.device)
    col_lse = torch.full((n,), float("-inf"), dtype=acc, device=a.device)
    col_term = torch.zeros(n, dtype=acc, device=a.device)
    da = torch.empty(m if grad else 0, d, dtype=acc, device=a.device)
    db = torch.zeros(n if grad else 0, d, dtype=acc, device=a.device)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        s = _masked_logits(af[i0:i1], bf, scale, i0, offset, True)  # excluded at -inf
        row_lse[i0:i1] = torch.logsumexp(s, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(s, dim=0))
        er = torch.exp((s + alpha_row[i0:i1, None]).clamp_max_(clamp))  # e^{-inf} = 0
        ec = torch.exp((s + alpha_col[None, :]).clamp_max_(clamp))
        row_term[i0:i1] = er.sum(dim=1)
        col_term += ec.sum(dim=0)
        if grad:
            w = er.mul_(w_row).add_(ec, alpha=w_col)
            da[i0:i1] = torch.mm(w, bf)
            db.addmm_(w.t(), af[i0:i1])
    return row_lse, col_lse, row_term, col_term, da, db


def _reference_fwd(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad):
    from gammacl.reference.gamma import gamma_onepass as ref

    out = ref(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, upcast=False)
    if not grad:
        out = out[:4] + (out[4][:0], out[5][:0])
    return out


@compiled_fake("gammacl::gamma_onepass_fwd")
def _compiled_fwd_fake(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad):
    """Shapes of the compiled fwd (cpp / cuda) of the contract above."""
    m, n = a.shape[0], b.shape[0]
    return fwd_fake(a, b, grad, m, n, m, n)


# The dispatch seam of this op: backend name -> fwd of the contract above.
_backend_impl = fwd_backends("gamma_onepass", _reference_fwd, torch_fwd)


# A torch.library custom op (like gammacl::simlse): one opaque node for torch.compile, and opcheck
# can test its schema, fake function and autograd registration.
@torch.library.custom_op("gammacl::gamma_onepass", mutates_args=())
def _gamma_onepass_op(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    alpha_row: torch.Tensor, alpha_col: torch.Tensor, w_row: float, w_col: float, clamp: float,
    offset: int, grad: bool, backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """(neg, row_lse, col_lse, row_term, col_term, dA, dB, dscale); dA/dB/dscale are d neg / d
    input (empty when grad=False), stashed for the backward."""
    fwd = _backend_impl(backend)
    # a user's autocast region must not recast the accumulation-dtype GEMMs inside a backend
    with torch.autocast(a.device.type, enabled=False):
        row_lse, col_lse, row_term, col_term, da_raw, db_raw = fwd(
            a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad
        )
        neg = w_row * row_term.sum() + w_col * col_term.sum()
        if grad:
            da = (da_raw * scale).to(a.dtype)
            db = (db_raw * scale).to(b.dtype)
            ds = (a.to(da_raw.dtype) * da_raw).sum()  # dneg/dscale = sum_ij W_ij <a_i, b_j>
        else:
            da, db = a.new_empty(0, a.shape[1]), b.new_empty(0, b.shape[1])
            ds = scale.new_zeros(())
    return neg, row_lse, col_lse, row_term, col_term, da, db, ds


@_gamma_onepass_op.register_fake
def _(a, b, scale, alpha_row, alpha_col, w_row, w_col, clamp, offset, grad, backend):
    acc = acc_dtype(a.dtype)
    m, n = a.shape[0], b.shape[0]
    vec = lambda k: a.new_empty(k, dtype=acc)
    return (
        a.new_empty((), dtype=acc),
        vec(m),
        vec(n),
        vec(m),
        vec(n),
        a.new_empty(m if grad else 0, a.shape[1]),
        b.new_empty(n if grad else 0, b.shape[1]),
        a.new_empty((), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    grad = inputs[9]
    ctx.grad = grad
    if grad:
        ctx.save_for_backward(*output[5:8])


def _backward(ctx, g_neg, *unused):
    if not ctx.grad:
        raise RuntimeError(
            "gamma_onepass was called with grad=False (no gradient was computed in the forward)"
        )
    return stashed_grads(g_neg, ctx.saved_tensors, 11)  # (dA, dB, dscale) of neg


_gamma_onepass_op.register_autograd(_backward, setup_context=_setup_context)


def gamma_onepass(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    alpha_row: torch.Tensor,
    alpha_col: torch.Tensor,
    *,
    w_row: float,
    w_col: float,
    clamp: float = DEFAULT_CLAMP,
    offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(neg, row_lse, col_lse, row_term, col_term) of the module docstring; only `neg` (0-d) is
    differentiable (to a, b and the 0-d scale). alpha_row / alpha_col are treated as constants.
    Inputs must already be validated (scale: 0-d accumulation-dtype tensor)."""
    name = resolve_traced(backend, a.device)  # a no-op check for an already resolved name
    acc = acc_dtype(a.dtype)
    if a.stride(-1) != 1:
        a = a.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    alpha_row = alpha_row.detach().to(acc).contiguous()
    alpha_col = alpha_col.detach().to(acc).contiguous()
    grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or scale.requires_grad)
    neg, row_lse, col_lse, row_term, col_term, *_ = _gamma_onepass_op(
        a,
        b,
        scale,
        alpha_row,
        alpha_col,
        float(w_row),
        float(w_col),
        float(clamp),
        int(offset),
        bool(grad),
        name,
    )
    return neg, row_lse.detach(), col_lse.detach(), row_term.detach(), col_term.detach()
