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
