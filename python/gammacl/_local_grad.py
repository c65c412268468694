"""grad_comm="local": each rank computes the exact gradient of its OWN features, with no
feature-gradient collective (FastCLIP's scheme; derivation: docs/distributed.md).

W ranks of n rows, rank r holding rows R_r = [r n, (r+1) n) of the global batch (N = W n);
x = image features, y = text features, l_ij = s <x_i, y_j> (i, j global), per-anchor LSEs
    a_i = LSE_j l_ij   (image anchor i, every text),   b_j = LSE_i l_ij   (text anchor j).
A loss that is sum_q f_q(a_{R_q}, b_{R_q}) + O(N D) row-wise terms (every rank's loss, summed:
what DDP's average of "reduce" trains with) has, for rank r's own rows,
    d/dx_i = s sum_j [ g^a_i e^{l_ij - a_i} + g^b_j e^{l_ij - b_j} ] y_j        (i in R_r)
with g^a = d f / d a, g^b = d f / d b of the rank that owns the anchor. The first term is the
usual row gradient; the second is x_i as a column of every rank's text anchors. Both are one
simlse backward over (x_{R_r}, y_all) with row statistics (a, g^a) of the local anchors and
column statistics (b, g^b) of ALL anchors: that backward's da is exactly d/dx_{R_r}. So the
forward all-gathers the features WITHOUT autograd plus each anchor's LSE (2 N floats), the
backward all-gathers each anchor's upstream (g^a, g^b) (2 N floats) -- O(N) bytes, never N x D.
The one-pass gamma path (neg_one_pass_local) gathers the anchors' weights in the forward
instead and has no backward collective; SigLIP (siglip_local) gathers features only.

The scale: that backward's dscale on rank r covers its rows of both directions AND its columns
of every anchor, so summed over ranks it counts every logit twice; rank r returns half of it.
Summed over ranks (what DDP averages) it equals the sum of "reduce"'s per-rank dscale; per rank
it is a different share. The gathered side's gradient (db_raw) is not needed: the sweeps run
with need_db=False, which skips its GEMM (12 n N D FLOPs per step instead of 16).

Per-anchor scales (temperature="individual": l_ij = rs_i s_ij for image anchor i, cs_j s_ij for
text anchor j): the same sweep with vector scales, rows at this rank's rs, columns at every
anchor's cs (gathered in the forward with the LSEs, 2 N more floats). Its da is again the exact
d/dx_{R_r} (the scales sit inside W), and its drs is the full gradient of this rank's rs (an
anchor's scale enters only its own LSE); the column partials dcs are other ranks' and unused.
"""

from __future__ import annotations

import torch

from gammacl.distributed import World
from gammacl.ops.simlse import _simlse_backward_op, simlse


class _LocalPairLse(torch.autograd.Function):
    """(a_{R_r}, b_{R_r}, [2, N] every anchor's LSE) for local x, y against gathered all_x, all_y;
    backward: d/dx_{R_r}, d/dy_{R_r}, dscale (module docstring). scale: 0-d, or [2, n] this
    rank's (rs, cs) (vector mode: the forward also gathers every anchor's [2, N])."""

    @staticmethod
    def forward(ctx, x, y, all_x, all_y, scale, world, offset, exclude_pos, backend):
        vec = scale.dim() == 2
        sx, sy = (scale[0].contiguous(), scale[1].contiguous()) if vec else (scale, scale)
        rx, _ = simlse(x, all_y, sx, offset, exclude_pos, False, backend)
        ry, _ = simlse(y, all_x, sy, offset, exclude_pos, False, backend)
        mine = torch.stack([rx, ry, *((sx, sy) if vec else ())], dim=1)
        every = world.gather(mine.detach(), with_grad=False).t().contiguous()
        lse_all, scale_all = every[:2], every[2:] if vec else None
        ctx.save_for_backward(x, y, all_x, all_y, sx, sy, rx, ry, lse_all, scale_all)
        ctx.args = (world, offset, exclude_pos, backend, vec)
        ctx.mark_non_differentiable(lse_all)
        return rx, ry, lse_all

    @staticmethod
    def backward(ctx, g_rx, g_ry, _g_lse):
        x, y, all_x, all_y, sx, sy, rx, ry, lse_all, scale_all = ctx.saved_tensors
        world, offset, exclude_pos, backend, vec = ctx.args
        g_rx = torch.zeros_like(rx) if g_rx is None else g_rx.to(rx.dtype)
        g_ry = torch.zeros_like(ry) if g_ry is None else g_ry.to(ry.dtype)
        # every anchor's upstream, in rank order: the one collective of the backward (2 N floats)
        g_all = world.gather(torch.stack([g_rx, g_ry], dim=1), with_grad=False).t().contiguous()
        dx_raw, _, ds_x = _simlse_backward_op(
            x, all_y, sx, rx, lse_all[1], g_rx.contiguous(), g_all[1], offset, exclude_pos,
            True, backend, scale_all[1] if vec else None, False,
        )  # fmt: skip
        dy_raw, _, ds_y = _simlse_backward_op(
            y, all_x, sy, ry, lse_all[0], g_ry.contiguous(), g_all[0], offset, exclude_pos,
            True, backend, scale_all[0] if vec else None, False,
        )  # fmt: skip
        need_x, need_y, _, _, need_s = ctx.needs_input_grad[:5]
        n = x.shape[0]
        if vec:  # the scales are inside W; drs = ds[:n] (module docstring)
            dx, dy = dx_raw.to(x.dtype), dy_raw.to(y.dtype)
            ds = torch.stack([ds_x[:n], ds_y[:n]])
        else:
            dx, dy = (dx_raw * sx).to(x.dtype), (dy_raw * sy).to(y.dtype)
            ds = 0.5 * (ds_x + ds_y)
        grads = (dx if need_x else None, dy if need_y else None, None, None, ds if need_s else None)
        return (*grads, None, None, None, None)


def local_pair_lse(
    x: torch.Tensor,
    y: torch.Tensor,
    all_x: torch.Tensor,
    all_y: torch.Tensor,
    scale: torch.Tensor,
    world: World,
    *,
    offset: int,
    exclude_pos: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row LSEs [n], [n] of this rank's x against all_y and y against all_x (gathered without
    autograd, rank order), and every anchor's LSE [2, N] (no gradient). Gradients reach x, y
    and scale only, computed locally (module docstring). scale: 0-d, or [2, n] per-anchor scales
    (this rank's image anchors', text anchors')."""
    return _LocalPairLse.apply(
        x, y, all_x.detach(), all_y.detach(), scale, world, offset, exclude_pos, backend
    )


def mean_dots(x, all_y, rs, lse, offset: int, backend: str) -> torch.Tensor:
    """E_p[s_i.] = sum_j p_ij s_ij [n] of this rank's anchors (p_ij = e^{rs_i s_ij - lse_i}, the
    positive (i, i + offset) left out) = d lse_i / d rs_i: the vector-scale backward's drs at
    upstream 1, local (no collective)."""
    ones, none = torch.ones_like(lse), lse.new_empty(0)
    return _simlse_backward_op(
        x.detach(), all_y, rs, lse.detach(), none, ones, none, offset, True, False, backend, None,
        False,
    )[2]  # fmt: skip


def siglip_local(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    world: World,
    backend: str,
) -> torch.Tensor:
    """SigLipLoss with grad_comm="local": rank r's images against the gathered texts (gradient to
    the images, scale, bias), plus a zero-valued term whose gradient is rank r's texts as the
    columns of EVERY rank's images: the pairs (x_i, y_j), j in R_r, i any, are the same terms
    with the roles swapped (siglip(y_{R_r}, x_all), positive at i = j + r n, divided by n, as
    each rank's loss is). Scale and bias get their gradient from the first term only, so every
    gradient equals "reduce"'s rank by rank. SigLIP needs no statistics from other ranks."""
    from gammacl.ops.siglip import siglip

    off = world.rank * image.shape[0]
    all_image = world.gather(image, with_grad=False)
    all_text = world.gather(text, with_grad=False)
    loss = siglip(image, all_text, scale, bias, offset=off, backend=backend)
    cols = siglip(text, all_image, scale.detach(), bias.detach(), offset=off, backend=backend)
    return loss + (cols - cols.detach())


def neg_lse_local(image, text, all_image, all_text, scale, off: int, world: World, backend: str):
    """gammacl.gamma._neg_lse for grad_comm="local": the negatives-only LSEs of this rank's
    anchors (positive (i, i + off) left out), gradients computed locally."""
    return local_pair_lse(
        image, text, all_image, all_text, scale, world, offset=off, exclude_pos=True,
        backend=backend,
    )[:2]  # fmt: skip


class _HalfGrad(torch.autograd.Function):
    """Identity whose backward halves the gradient (the scale's share, module docstring)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 0.5 * g


def neg_one_pass_local(
    image, text, all_image, all_text, scale, log_w, log_r, log_m, clamp, off, world, backend
):
    """gammacl.gamma._neg_one_pass for grad_comm="local": (neg, row LSEs of this rank's image and
    text anchors). The weights alpha = log w - log r - log(B - 1) of every anchor are all-gathered
    in the forward ([N, 2], FastCLIP's u); each side's one fused sweep then carries its rows
    (alpha_row, this rank's anchors) and its columns as every rank's anchors (alpha_col, all N),
    so gamma_onepass's stashed dA is this rank's exact feature gradient and the backward has no
    collective. The value keeps the row terms only (loss_r, as "reduce"); the scale's gradient is
    the half share (both sweeps count each pair once per direction, summed over ranks twice)."""
    from gammacl.ops.gamma_onepass import gamma_onepass

    alpha = (log_w - log_r).detach() - log_m
    alpha_all = world.gather(alpha.t().contiguous(), with_grad=False).t()
    w, s = 0.5 / image.shape[0], _HalfGrad.apply(scale)
    out = [
        gamma_onepass(
            x,
            y.detach(),
            s,
            alpha[k],
            alpha_all[1 - k],
            w_row=w,
            w_col=w,
            clamp=clamp,
            offset=off,
            backend=backend,
        )  # fmt: skip
        for k, (x, y) in enumerate(((image, all_text), (text, all_image)))
    ]
    neg = out[0][0] + out[1][0]
    rows = w * (out[0][3].sum() + out[1][3].sum())
    return neg + (rows - neg).detach(), out[0][1], out[1][1]
