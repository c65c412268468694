"""The one tolerance table of the test suite, and the comparison rule every parity test uses.

float64: the fused path must match the float64 reference tightly (rtol 1e-9).
Lower precision: the path's error against the float64 reference may be at most twice PyTorch's
own error in that dtype (the reference run in the input dtype) plus TOL[dtype] relative to the
reference's largest magnitude plus a small absolute ATOL[dtype] (CCE / FlashAttention rule).
"""

from __future__ import annotations

import torch

RTOL_FP64 = 1e-9
ATOL_FP64 = 1e-12

# extra allowance on top of 2 x PyTorch's own error: TOL relative to max|reference| plus an
# absolute floor ATOL (near-zero references, e.g. gradients of N=1 losses, are pure rounding).
# fp16 / bf16: about two units of the dtype's rounding (eps 9.8e-4 / 7.8e-3). The fused GPU paths
# (triton, cuda) round the gradient weights W to the input dtype for the tensor-core GEMMs, as
# FlashAttention does with P; on a reduction that cancels (dscale = <A, W B>) that costs ~1.6 ulp
# of max|ref| (the strided fp16 case of tests/gpu_cases.py), while torch's CPU fp16 reference
# rounds only its outputs. (The triton backend forms dscale from its fp32 W in the kernel, so
# its dscale is held to 10x torch's error: test_clip.py::test_dscale_16bit_where_it_cancels.)
TOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
ATOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-6,
    torch.bfloat16: 1e-5,
}


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (x.double() - ref.double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fp64(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(
        out.double(), ref.double(), rtol=RTOL_FP64, atol=ATOL_FP64, msg=lambda m: f"{what}: {m}"
    )


def assert_close_dtype(
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor | None,
    dtype: torch.dtype,
    what: str = "",
) -> None:
    """out (computed from `dtype` inputs) vs the float64 reference, relative to torch's error."""
    if dtype == torch.float64:
        assert_close_fp64(out, ref64, what)
        return
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: finite pattern differs from reference"
    scale = float(ref64[fin].abs().max()) if fin.any() else 0.0
    torch_err = _err(torch_same_dtype[fin], ref64[fin]) if torch_same_dtype is not None else 0.0
    err = _err(out[fin], ref64[fin])
    bound = 2.0 * torch_err + TOL[dtype] * scale + ATOL[dtype]
    assert err <= bound, (
        f"{what}: max error {err:.3e} > bound {bound:.3e} (2 x torch {dtype} error "
        f"{torch_err:.3e} + {TOL[dtype]:.0e} x max|ref| {scale:.3g} + {ATOL[dtype]:.0e})"
    )


def simlse_fwd_bwd(fn, a, b, s, g_row, g_col, cols):
    """(row, col, grad a, grad b, grad scale) of sum(g_row * row) + [cols] sum(g_col * col) on
    fresh leaves, for the simlse op tests; entries whose LSE is -inf (all-excluded rows /
    columns) get upstream 0."""
    a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
    row, col = fn(a, b, s)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
    if cols:
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
    ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
    return row.detach(), col.detach(), ga, gb, gs
