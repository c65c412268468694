"""Every LSE merge loop at more than one trip, with the later trips dominating, so that a merge
that forgets to rescale the earlier partials (acc * exp(m_old - m_new)) is off by O(1).

- Triton `_simlse_col_merge_kernel`: its loop over the R = ceil(M / BLOCK_M) row-block partials
  takes BLOCK_R = 4 rows per trip under the interpreter, so M = 300 (R = 5) runs two trips.
- C++ simlse forward: per-thread-block column partials merged at the end (at::get_num_threads()
  blocks: the merge has one trip with 1 thread, two with 2) and the online column update across
  row chunks (GAMMACL_CPU_CHUNK_MIB tiny: many chunks).
- C++ gamma_onepass forward: the running column (max, sum) merged across row chunks.
Both thread counts are run in-process (torch.set_num_threads), whatever OMP_NUM_THREADS says.
"""

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

from gammacl import _ext, reference
from gammacl.ops.gamma_onepass import gamma_onepass
from gammacl.ops.simlse import simlse

OK, WHY = _ext.available(cuda=False)
needs_ext = pytest.mark.skipif(not OK, reason=f"C++ extension unavailable: {WHY}")


def _dominant_tail(m, n, d, tail, dtype, seed=0):
    """Unnormalised features whose rows from `tail` on are 4x larger: every column's maximum
    lies in the last row blocks / chunks."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    a[tail:] *= 4
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("backend", cpu_backends(include_cuda_emu=False))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simlse_column_merge_later_blocks_dominate(backend, dtype, monkeypatch):
    monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", "0.004")  # cpp: 4 KiB -> 16 rows per chunk
    m, n, d = 300, 37, 8
    a, b = _dominant_tail(m, n, d, 256, dtype)
    s = torch.tensor(3.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    row, col = simlse(a, b, s, exclude_pos=True, offset=2, backend=backend)
    ref_row, ref_col = reference.simlse(a, b, s, exclude_pos=True, offset=2)
    if dtype == torch.float64:
        assert_close_fp64(col, ref_col, f"{backend} col")
        assert_close_fp64(row, ref_row, f"{backend} row")
    else:
        same_row, same_col = reference.simlse(a, b, s, exclude_pos=True, offset=2, upcast=False)
        assert_close_dtype(col, ref_col, same_col, dtype, f"{backend} col")
        assert_close_dtype(row, ref_row, same_row, dtype, f"{backend} row")


@needs_ext
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("chunk", ["default", "0.004"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_simlse_thread_block_merge(threads, chunk, dtype, monkeypatch):
    """2 threads: rows [0, 150) and [150, 300) of each chunk are separate column partials; the
    second dominates (rows >= 200 are 4x larger), so the final merge must rescale the first."""
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", chunk)
    assert torch.get_num_threads() == threads
    m, n, d = 300, 29, 6
    a, b = _dominant_tail(m, n, d, 200, dtype, seed=1)
    s = torch.tensor(2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    g_row = torch.randn(m, dtype=torch.float64)
    g_col = torch.randn(n, dtype=torch.float64)
    for exclude in (False, True):
        row, col = simlse(a, b, s, exclude_pos=exclude, backend="cpp")
        ref_row, ref_col = reference.simlse(a, b, s, exclude_pos=exclude)
        a_, b_, s_ = (t.detach().clone().requires_grad_() for t in (a, b, s))
        r, c = simlse(a_, b_, s_, exclude_pos=exclude, backend="cpp")
        ((r * g_row.to(r.dtype)).sum() + (c * g_col.to(c.dtype)).sum()).backward()
        a64, b64, s64 = (t.detach().double().requires_grad_() for t in (a, b, s))
        r64, c64 = reference.simlse(a64, b64, s64, exclude_pos=exclude)
        ((r64 * g_row).sum() + (c64 * g_col).sum()).backward()
        what = f"threads={threads} chunk={chunk} exclude={exclude}"
        if dtype == torch.float64:
            assert_close_fp64(col, ref_col, f"{what} col")
            assert_close_fp64(row, ref_row, f"{what} row")
            for x, y, name in ((a_.grad, a64.grad, "da"), (b_.grad, b64.grad, "db")):
                assert_close_fp64(x, y, f"{what} {name}")
        else:
            same = reference.simlse(a, b, s, exclude_pos=exclude, upcast=False)
            assert_close_dtype(col, ref_col, same[1], dtype, f"{what} col")
            assert_close_dtype(row, ref_row, same[0], dtype, f"{what} row")


@needs_ext
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_cpp_gamma_onepass_chunk_merge(threads, monkeypatch):
    """Column LSE and term sums of gamma_onepass across many row chunks, later chunks dominant."""
    monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", "0.004")
    m = n = 120
    a, b = _dominant_tail(m, n, 5, 90, torch.float64, seed=2)
    s = torch.tensor(2.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    alpha_r = torch.randn(m, generator=g, dtype=torch.float64) - 20
    alpha_c = torch.randn(n, generator=g, dtype=torch.float64) - 20
    kw = dict(w_row=0.5, w_col=0.5, clamp=30.0, offset=0)
    ours = gamma_onepass(a, b, s, alpha_r, alpha_c, backend="cpp", **kw)
    want = gamma_onepass(a, b, s, alpha_r, alpha_c, backend="reference", **kw)
    for name, x, y in zip(("neg", "row_lse", "col_lse", "row_term", "col_term"), ours, want):
        assert_close_fp64(x, y, f"threads={threads} {name}")
