"""siglip: value AND gradient of the pairwise sigmoid (SigLIP) loss in one sweep over S.

With S = a @ b^T (a: [M, D], b: [N, D]), l_ij = scale * S_ij + bias, z_ij = +1 on the positive
pair (i, i + offset) and -1 elsewhere, y_ij = -z_ij l_ij (open_clip's SigLipLoss, math in
gammacl.reference.siglip):
    loss = (1/M) sum_ij softplus(y_ij)                 softplus(y) = max(y, 0) + log1p(e^{-|y|})
    W_ij = d softplus(y_ij) / d l_ij = -z_ij sigmoid(y_ij)            (|W_ij| <= 1)
    dloss/da = (scale/M) W @ b       dloss/db = (scale/M) W^T @ a
    dloss/dscale = (1/M) <W, S>_F = (1/M) sum_i row_wdot_i        dloss/dbias = (1/M) sum_ij W_ij
W needs nothing but l_ij itself (no normaliser, unlike the softmax losses), so each S tile is
final when it is formed: one sweep computes S (2MND FLOPs), the loss, W, and the two gradient
GEMMs (4MND): 3 GEMM-equivalents, 6MND FLOPs, against 8MND for a forward then a backward that
recomputes S. Never an M x N buffer (row chunks / tiles only).

Backend contract (every backend implements exactly this function):
    fwd(a, b, scale, bias, offset, grad)
        -> (row_loss [M], row_wsum [M], row_wdot [M], da_raw [M, D], db_raw [N, D])
    a: [M, D], b: [N, D] same dtype, stride(-1) == 1; scale, bias: 0-d tensors in the
    accumulation dtype (fp64 for fp64 inputs, else fp32) on the features' device; outputs in the
    accumulation dtype: row_loss_i = sum_j softplus(y_ij), row_wsum_i = sum_j W_ij,
    row_wdot_i = sum_j W_ij S_ij, da_raw = W @ b, db_raw = W^T @ a. grad=False skips the two
    gradient GEMMs and row_wdot (da_raw, db_raw are then [0, D], row_wdot [0]). row_wdot (the
    scale's gradient) comes from the accumulation-dtype W: the backends that round W to 16 bits
    for their GEMMs would otherwise lose it where its positive and negative terms cancel (as
    simlse's dscale).
    Implementations: torch_fwd below (chunked PyTorch), gammacl.kernels.siglip (Triton),
    csrc/siglip.cpp (torch.ops.gammacl.siglip_fwd, CPU), csrc/siglip_cuda.{cpp,cu} (CUDA),
    gammacl.reference.siglip.siglip (materialised).

Numerics: softplus and sigmoid from one e^{-|y|} in fp32 (fp64 for fp64): no overflow at any
|l| (tested at |l| = 1e4), log1p accurate for small e^{-|y|} (a bias of -10 puts every negative at
softplus ~ 4.5e-5, where log(1 + x) in fp32 would lose three digits).

The gradient is computed in the forward and stashed (O((M+N)D), never M x N); the backward only
scales it by the upstream gradient, so `loss` is the one differentiable output. Autocast is off
inside the op: the statistics are fp32 and the gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gammacl._ext import compiled_fake
from gammacl._validate import acc_dtype
from gammacl.dispatch import resolve_traced
from gammacl.ops._backends import fwd_backends, fwd_fake, stashed_grads
from gammacl.ops.simlse import _acc_operands


def torch_fwd(a, b, scale, bias, offset: int, grad: bool):
    """Chunked PyTorch backend: per chunk of R rows, l = scale * a_c @ b^T + bias (R x N, the
    positive diagonal sign-flipped in place to y = -z l), the loss rows, W in place, then
    da_c = W @ b and db += W^T @ a_c."""
    af, bf, step = _acc_operands(a, b, 3)  # S, y / W and W * S: three R x N buffers
    acc = af.dtype
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    row_loss = torch.empty(m, dtype=acc, device=a.device)
    row_wsum = torch.empty(m, dtype=acc, device=a.device)
    row_wdot = torch.empty(m if grad else 0, dtype=acc, device=a.device)
    da = torch.empty(m if grad else 0, d, dtype=acc, device=a.device)
    db = torch.zeros(n if grad else 0, d, dtype=acc, device=a.device)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        s = torch.mm(af[i0:i1], bf.t())
        y = s * scale + bias  # l
        y.diagonal(i0 + offset).neg_()  # y = -z l (z = +1 on the positives)
        row_loss[i0:i1] = F.logsigmoid(-y).sum(1).neg_()  # softplus(y), stable for any y
        w = y.sigmoid_()
        w.diagonal(i0 + offset).neg_()  # W = -z sigmoid(y)
        row_wsum[i0:i1] = w.sum(1)
        if grad:
            row_wdot[i0:i1] = (w * s).sum(1)
            torch.mm(w, bf, out=da[i0:i1])
            db.addmm_(w.t(), af[i0:i1])
    return row_loss, row_wsum, row_wdot, da, db


def _reference_fwd(a, b, scale, bias, offset, grad):
    from gammacl.reference.siglip import siglip as ref

    out = ref(a, b, scale, bias, offset, upcast=False)
    if not grad:
        out = out[:2] + (out[2][:0], out[3][:0], out[4][:0])
    return out


@compiled_fake("gammacl::siglip_fwd")
def _compiled_fwd_fake(a, b, scale, bias, offset, grad):
    """Shapes of the compiled fwd (cpp / cuda) of the contract above."""
    m = a.shape[0]
    return fwd_fake(a, b, grad, m, m, m if grad else 0)


# The dispatch seam of this op: backend name -> fwd of the contract above.
_backend_impl = fwd_backends("siglip", _reference_fwd, torch_fwd)


# A torch.library custom op: one opaque node for torch.compile; opcheck tests its schema, fake
# function and autograd registration.
@torch.library.custom_op("gammacl::siglip", mutates_args=())
def _siglip_op(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
    offset: int, grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, dA, dB, dscale, dbias): dA/dB/dscale/dbias are d loss / d input (dA, dB empty when
    grad=False), stashed for the backward."""
    fwd = _backend_impl(backend)
    m = a.shape[0]
    with torch.autocast(a.device.type, enabled=False):
        row_loss, row_wsum, row_wdot, da_raw, db_raw = fwd(a, b, scale, bias, offset, grad)
        loss = row_loss.sum() / m
        dbias = row_wsum.sum() / m
        if grad:
            da = (da_raw * (scale / m)).to(a.dtype)
            db = (db_raw * (scale / m)).to(b.dtype)
            ds = row_wdot.sum() / m  # (1/M) sum_ij W_ij <a_i, b_j>
        else:
            da, db = a.new_empty(0, a.shape[1]), b.new_empty(0, b.shape[1])
            ds = scale.new_zeros(())
    return loss, da, db, ds, dbias


@_siglip_op.register_fake
def _(a, b, scale, bias, offset, grad, backend):
    acc = acc_dtype(a.dtype)
    m, n = a.shape[0], b.shape[0]
    return (
        a.new_empty((), dtype=acc),
        a.new_empty(m if grad else 0, a.shape[1]),
        b.new_empty(n if grad else 0, b.shape[1]),
        a.new_empty((), dtype=acc),
        a.new_empty((), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    ctx.grad = inputs[5]
    if ctx.grad:
        ctx.save_for_backward(*output[1:5])


def _backward(ctx, g, *unused):
    if not ctx.grad:
        raise RuntimeError("siglip was called with grad=False (no gradient was computed)")
    return stashed_grads(g, ctx.saved_tensors, 7)  # (dA, dB, dscale, dbias) of the loss


_siglip_op.register_autograd(_backward, setup_context=_setup_context)


def siglip(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """The 0-d loss of the module docstring (fp32, fp64 for fp64 inputs), differentiable to a,
    b, the 0-d scale and the 0-d bias. Inputs must already be validated (scale, bias: 0-d
    accumulation-dtype tensors on the features' device)."""
    name = resolve_traced(backend, a.device)  # a no-op check for an already resolved name
    if a.stride(-1) != 1:
        a = a.contiguous()
    if b.stride(-1) != 1:
        b = b.contiguous()
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, scale, bias))
    return _siglip_op(a, b, scale, bias, int(offset), bool(grad), name)[0]
