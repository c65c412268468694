"""Parity cases shared by the GPU tests (tests/test_gpu.py, marker `gpu`) and their CPU run
through the CUDA emulator / Triton interpreter (tests/test_gpucheck.py): each builder returns a
check that runs one backend against gammacl.reference with the one tolerance rule
(tests/tolerances.py) and returns a "max|err| ..." summary, raising AssertionError on a miss.

* `simlse_case`: simlse forward (row / column LSE) and backward (grads of a, b, scale under
  random upstream);
* `onepass_case`: the gamma_onepass backend function against reference.gamma.gamma_onepass;
* `clip_case`: gammacl.clip_loss value and grads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMES = ("row", "col", "da", "db", "dscale")  # the outputs of fwd_bwd


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feats(
    m: int, n: int, d: int, dtype: torch.dtype, dev: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows drawn in float64 on dev (global RNG), then cast to dtype."""
    a = torch.nn.functional.normalize(torch.randn(m, d, device=dev, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, device=dev, dtype=torch.float64), dim=1)
    return a.to(dtype), b.to(dtype)


def fwd_bwd(fn, a, b, s, g_row, g_col, cols: bool) -> list[torch.Tensor]:
    """[row, col, grad a, grad b, grad scale]: tests/tolerances.simlse_fwd_bwd as a list."""
    from tolerances import simlse_fwd_bwd

    return list(simlse_fwd_bwd(fn, a, b, s, g_row, g_col, cols))


def simlse_case(
    backend: str,
    dtype: torch.dtype,
    n: int,
    d: int,
    *,
    offset: int = 0,
    exclude: bool = False,
    cols: bool = True,
    scale: float = 14.3,
    strided: bool = False,
    nan_free: bool = False,
    dev: str = "cuda",
) -> Callable[[], str]:
    """A check of simlse(backend=...) on [n, d] x [n, d] features against reference.simlse: fp64
    within rtol 1e-9, lower precision by assert_close_dtype (2 x torch's own error in the dtype
    + TOL[dtype]). strided: rows 2D + 8 elements apart. nan_free: also fail on a NaN where the
    reference is +-inf (the rule compares the finite entries only). Returns max|err| per output."""
    from tolerances import assert_close_dtype, assert_close_fp64

    from gammacl import reference
    from gammacl.ops.simlse import simlse

    def run() -> str:
        torch.manual_seed(n * 1000 + d)
        a, b = feats(n, n, d, dtype, dev)
        if strided:  # row stride 2D + 8: the GEMMs take it as their leading dimension
            a = torch.cat([a, a, a[:, :8]], dim=1)[:, :d]
            b = torch.cat([b, b, b[:, :8]], dim=1)[:, :d]
        s = torch.tensor(scale, dtype=acc(dtype), device=dev)
        g_row = torch.randn(n, dtype=torch.float64, device=dev) / n
        g_col = torch.randn(n, dtype=torch.float64, device=dev) / n
        kw = dict(offset=offset, exclude_pos=exclude, cols=cols)
        ours = fwd_bwd(
            lambda a, b, s: simlse(a, b, s, backend=backend, **kw), a, b, s, g_row, g_col, cols
        )
        ref = fwd_bwd(
            lambda a, b, s: reference.simlse(a, b, s, upcast=True, **kw),
            a.double(), b.double(), s.double(), g_row, g_col, cols,
        )  # fmt: skip
        if dtype == torch.float64:
            for nm, x, y in zip(NAMES, ours, ref, strict=True):
                assert_close_fp64(x, y, nm)
        else:
            same = fwd_bwd(
                lambda a, b, s: reference.simlse(a, b, s, upcast=False, **kw),
                a, b, s, g_row, g_col, cols,
            )  # fmt: skip
            for nm, x, y, z in zip(NAMES, ours, ref, same, strict=True):
                assert_close_dtype(x, y, z, dtype, nm)
        errs = []
        for nm, x, y in zip(NAMES, ours, ref, strict=True):
            if nan_free:
                assert not torch.isnan(x).any(), f"{nm} has NaN"
            fin = torch.isfinite(y)
            if fin.any():
                errs.append(f"{nm} {float((x.double() - y)[fin].abs().max()):.1e}")
        return "max|err| " + ", ".join(errs)

    return run


ONEPASS_NAMES = ("row_lse", "col_lse", "row_term", "col_term", "da_raw", "db_raw")


def onepass_case(
    backend: str,
    dtype: torch.dtype,
    n: int,
    d: int,
    *,
    clamp: float = 30.0,
    offset: int = 0,
    dev: str = "cuda",
) -> Callable[[], str]:
    """A check of the gamma_onepass backend function (gammacl.ops.gamma_onepass._backend_impl:
    row / column LSE, row / column terms, da_raw, db_raw) on [n, d] x [n, d] features against
    reference.gamma.gamma_onepass, with the test suite's rule. Scale 14.3, alphas ~ N(-log n, 1)
    (weights ~ 1/n, as the gamma loss makes them); clamp < 30 makes the cap bite."""
    import math

    from tolerances import assert_close_dtype, assert_close_fp64

    from gammacl.ops.gamma_onepass import _backend_impl
    from gammacl.reference import gamma as ref

    def run() -> str:
        torch.manual_seed(n * 1000 + d + 7)
        a, b = feats(n, n, d, dtype, dev)
        s = torch.tensor(14.3, dtype=acc(dtype), device=dev)
        ar = (torch.randn(n, device=dev, dtype=torch.float64) - math.log(n)).to(acc(dtype))
        ac = (torch.randn(n, device=dev, dtype=torch.float64) - math.log(n)).to(acc(dtype))
        args = (s, ar, ac, 0.3, 0.7, clamp, offset)
        ours = _backend_impl(backend)(a, b, *args, True)
        r64 = ref.gamma_onepass(a, b, *args, upcast=True)
        errs = []
        if dtype == torch.float64:
            for nm, x, y in zip(ONEPASS_NAMES, ours, r64, strict=True):
                assert_close_fp64(x, y, nm)
        else:
            same = ref.gamma_onepass(a, b, *args, upcast=False)
            for nm, x, y, z in zip(ONEPASS_NAMES, ours, r64, same, strict=True):
                assert_close_dtype(x, y, z, dtype, nm)
        for nm, x, y in zip(ONEPASS_NAMES, ours, r64, strict=True):
            assert not torch.isnan(x).any(), f"{nm} has NaN"
            errs.append(f"{nm} {float((x.double() - y.double()).abs().max()):.1e}")
        return "max|err| " + ", ".join(errs)

    return run


def clip_case(
    backend: str, dtype: torch.dtype, n: int, d: int, dev: str = "cuda"
) -> Callable[[], str]:
    """A check of gammacl.clip_loss(backend=...) value and grads (a, b, scale 30) against
    reference.clip_loss, by assert_close_dtype."""
    from tolerances import assert_close_dtype

    import gammacl
    from gammacl import reference

    def run() -> str:
        torch.manual_seed(n + d)
        a, b = feats(n, n, d, dtype, dev)
        s = torch.tensor(30.0, dtype=acc(dtype), device=dev)
        args = [x.clone().requires_grad_() for x in (a, b, s)]
        loss = gammacl.clip_loss(*args, backend=backend)
        grads = torch.autograd.grad(loss, args)
        args64 = [x.detach().double().requires_grad_() for x in (a, b, s)]
        ref = reference.clip_loss(*args64)
        ref_g = torch.autograd.grad(ref, args64)
        argsd = [x.detach().clone().requires_grad_() for x in (a, b, s)]
        same = reference.clip_loss(*argsd, upcast=False)
        same_g = torch.autograd.grad(same, argsd)
        assert_close_dtype(loss.detach(), ref.detach(), same.detach(), dtype, "loss")
        for nm, x, y, z in zip(("da", "db", "dscale"), grads, ref_g, same_g, strict=True):
            assert_close_dtype(x, y, z, dtype, nm)
        return f"loss {float(loss.detach()):.6f} ref {float(ref.detach()):.6f}"

    return run
