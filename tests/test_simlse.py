"""The simlse op itself, on every CPU backend: non-finite inputs give NaN statistics exactly where
the materialised reference has them (a NaN row never becomes -inf or a number)."""

import pytest
import torch
from conftest import cpu_backends

from gammacl import reference
from gammacl.ops.simlse import _backend_impl


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_pattern_matches_reference(backend, exclude, dtype):
    a, b = torch.randn(7, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype)
    a[1, 0] = float("nan")
    b[3, 2] = float("nan")
    scale = torch.tensor(5.0, dtype=dtype)
    row, col = _backend_impl(backend)[0](a, b, scale, 0, exclude, True)
    ref_row, ref_col = reference.simlse(a, b, scale, exclude_pos=exclude)
    assert torch.equal(torch.isnan(row), torch.isnan(ref_row)), (row, ref_row)
    assert torch.equal(torch.isnan(col), torch.isnan(ref_col)), (col, ref_col)
    fin = ~torch.isnan(ref_row)
    torch.testing.assert_close(row[fin].double(), ref_row[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [*cpu_backends(), "reference"])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("cols", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [24, 160], ids=["fused", "large-d"])
def test_backward_without_db_changes_nothing_else(backend, vector, cols, dtype, d):
    """need_db=False (grad_comm="local", a frozen text side): db_raw is [0, D] and every other
    output is bitwise the need_db=True one (only the dB GEMM / launch is skipped; triton's fused
    vector path keeps its transposed launch for the column-scale gradients)."""
    g = torch.Generator().manual_seed(d)
    m, n = 19, 23
    a = torch.randn(m, d, generator=g).to(dtype)
    b = torch.randn(n, d, generator=g).to(dtype)
    s = torch.tensor(0.3)
    scale, cs = (s * (1 + torch.rand(m, generator=g)), s * (1 + torch.rand(n, generator=g)))
    if not vector:
        scale, cs = s, None
    cs = cs if cols else None
    fwd, _ = _backend_impl(backend)
    row, col = fwd(a, b, scale, 1, True, cols, *(() if cs is None else (cs,)))
    g_row, g_col = torch.rand(m, generator=g), torch.rand(n if cols else 0, generator=g)
    args = (a, b, scale, row, col, g_row, g_col, 1, True, cols, backend, cs)
    full = torch.ops.gammacl.simlse_backward(*args)
    part = torch.ops.gammacl.simlse_backward(*args, False)
    assert full[1].shape == (n, d) and part[1].shape == (0, d)
    assert torch.equal(part[0], full[0]), "da"
    assert torch.equal(part[2], full[2]), "dscale / cat(drs, dcs)"
