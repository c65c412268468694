"""The cuda backend (csrc/*_cuda.cpp + csrc/*.cu) run on the CPU by the emulator in tests/cuda_emu:
the real kernel and binding source, compiled by the host compiler, with blocks of fibers for the
threads, barriers and warp shuffles emulated, and cuBLAS replaced by a checker of its documented
argument rules (tests/cuda_emu/cuda_emu_torch.h).

This file covers what the backend-parametrised suites (backend id "cuda-emu" in test_simlse,
test_clip, test_gamma*, test_modality, test_opcheck_compile_autocast, test_compile_losses) do not:
many row chunks (a tiny GAMMACL_CUDA_CHUNK_MIB: first / middle / last column merges, dB
accumulation), several 64 x 256 tiles per chunk, the 16-byte vector and the scalar epilogue paths
(N % 4), row strides > D (cuBLAS leading dimensions), every dtype (bf16 weight buffers, the fp16
power-of-two weight scale, the fp16 -> fp32 one-pass path), and the bindings' argument checks.

What it cannot show: GPU timing, inter-block races (blocks run one after another), int64 paths at
N*N > 2^31 (too large to emulate), real cuBLAS numerics (TF32). Those are tests/test_gpu.py's
(marker gpu).
"""

import os
from pathlib import Path

import pytest
import torch
from cuda_emu.routing import available, routed
from test_simlse_cpp import EMPTY_SHAPES, check_empty_simlse
from tolerances import assert_close_dtype, assert_close_fp64, simlse_fwd_bwd

import gammacl
from gammacl import reference
from gammacl.ops.gamma_onepass import gamma_onepass
from gammacl.ops.simlse import simlse
from gammacl.reference import gamma as ref_gamma

OK, WHY = available()
pytestmark = [
    pytest.mark.emu,
    pytest.mark.skipif(not OK, reason=f"CUDA emulation unavailable: {WHY}"),
]

TINY_CHUNK = "0.02"  # MiB: ~20 KiB -> a handful of rows per chunk at these widths
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (M, N, D, offset): 3 row tiles x 2 column tiles (N % 4 == 0: vector path); N odd (scalar
# path); N % 4 == 2 (scalar for fp32, vector for fp64); a single short row
SHAPES = [(130, 300, 24, 1), (70, 257, 16, -3), (9, 1030, 8, 2), (1, 5, 3, 0)]


@pytest.fixture
def emu():
    with routed() as ops:
        yield ops


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _feats(m, n, d, dtype, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = 5 if strided else 0
    a = torch.nn.functional.normalize(
        torch.randn(m, d + pad, generator=g, dtype=torch.float64), dim=1
    )
    b = torch.nn.functional.normalize(
        torch.randn(n, d + pad, generator=g, dtype=torch.float64), dim=1
    )
    return a.to(dtype)[:, :d], b.to(dtype)[:, :d]  # row stride d + pad when strided


def _ids(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("chunk", ["default", TINY_CHUNK])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_simlse_cuda_emu(emu, monkeypatch, shape, dtype, chunk):
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", chunk)
    m, n, d, offset = shape
    a, b = _feats(m, n, d, dtype, strided=m > 60)
    assert a.stride(0) == (d + 5 if m > 60 else d)
    s = torch.tensor(14.3, dtype=_acc(dtype))
    g_row, g_col = torch.randn(m, dtype=_acc(dtype)), torch.randn(n, dtype=_acc(dtype))
    for exclude, cols in ((False, True), (True, True), (True, False)):

        def run(x, y, sc, up=None, exclude=exclude, cols=cols):
            if up is None:
                return simlse(
                    x, y, sc, offset=offset, exclude_pos=exclude, cols=cols, backend="cuda"
                )
            return reference.simlse(
                x, y, sc, offset=offset, exclude_pos=exclude, cols=cols, upcast=up
            )

        got = simlse_fwd_bwd(run, a, b, s, g_row, g_col, cols)
        want = simlse_fwd_bwd(
            lambda x, y, sc: run(x, y, sc, True), a.double(), b.double(), s.double(),
            g_row.double(), g_col.double(), cols,
        )  # fmt: skip
        same = simlse_fwd_bwd(lambda x, y, sc: run(x, y, sc, False), a, b, s, g_row, g_col, cols)
        for name, x, y, z in zip(
            ("row", "col", "da", "db", "dscale"), got, want, same, strict=True
        ):
            what = f"{name} exclude={exclude} cols={cols}"
            assert x.dtype == (_acc(dtype) if name in ("row", "col", "dscale") else dtype), what
            assert_close_dtype(x, y, z, dtype, what)


OUTPUTS = ("row_lse", "col_lse", "row_term", "col_term", "da_raw", "db_raw")


@pytest.mark.parametrize("chunk", ["default", TINY_CHUNK])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("clamp", [30.0, 0.5], ids=["cap-idle", "cap-bites"])
def test_gamma_onepass_cuda_emu(emu, monkeypatch, shape, dtype, chunk, clamp):
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", chunk)
    m, n, d, offset = shape
    a, b = _feats(m, n, d, dtype, strided=m > 60, seed=1)
    acc = _acc(dtype)
    s = torch.tensor(6.0, dtype=acc)
    ar = (torch.randn(m, dtype=torch.float64) - 2.0).to(acc)
    ac = (torch.randn(n, dtype=torch.float64) - 2.0).to(acc)
    out = emu.gamma_onepass_fwd(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, True)
    r64 = ref_gamma.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, upcast=True)
    same = ref_gamma.gamma_onepass(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, upcast=False)
    for name, x, y, z in zip(OUTPUTS, out, r64, same, strict=True):
        assert x.dtype == acc, name
        assert_close_dtype(x, y, z, dtype, f"{name} clamp={clamp}")
    stats = emu.gamma_onepass_fwd(a, b, s, ar, ac, 0.3, 0.7, clamp, offset, False)
    assert stats[4].shape == (0, d) and stats[5].shape == (0, d)
    # (grad=False may chunk differently: no W buffer in the budget)
    for name, x, y, z in zip(OUTPUTS[:4], stats[:4], r64, same, strict=False):
        assert_close_dtype(x, y, z, dtype, f"{name} grad=False clamp={clamp}")


def test_gamma_onepass_cuda_emu_autograd(emu, monkeypatch):
    """gamma_onepass(backend='cuda'): neg and the stashed gradients dA = scale W b,
    dB = scale W^T a, dscale = <a, W b> over many chunks, against autograd of the reference."""
    monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", TINY_CHUNK)
    a, b = _feats(70, 70, 12, torch.float64)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    ar, ac = torch.randn(70, dtype=torch.float64) - 3, torch.randn(70, dtype=torch.float64) - 3
    neg = gamma_onepass(a, b, s, ar, ac, w_row=0.25, w_col=0.75, clamp=30.0, backend="cuda")[0]
    got = torch.autograd.grad(2.0 * neg, (a, b, s))
    r = ref_gamma.gamma_onepass(a, b, s, ar, ac, 0.25, 0.75, 30.0, upcast=True)
    want_neg = 0.25 * r[2].sum() + 0.75 * r[3].sum()
    assert_close_fp64(neg, want_neg, "neg")
    want = torch.autograd.grad(2.0 * want_neg, (a, b, s))
    for name, x, y in zip("abs", got, want, strict=True):
        assert_close_fp64(x, y, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_loss_cuda_emu_many_chunks(emu, monkeypatch, dtype):
    """The public loss end to end on the cuda backend: loss and all three gradients."""
    monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", TINY_CHUNK)
    img, txt = _feats(67, 67, 16, dtype)
    outs = []
    for run in ("cuda", "ref64", "ref_same"):
        up = run == "ref64"
        x = (img.double() if up else img).detach().clone().requires_grad_()
        y = (txt.double() if up else txt).detach().clone().requires_grad_()
        sc = torch.tensor(14.3, dtype=torch.float64 if up else _acc(dtype), requires_grad=True)
        if run == "cuda":
            loss = gammacl.clip_loss(x, y, sc, label_smoothing=0.1, backend="cuda")
        else:
            loss = reference.clip_loss(x, y, sc, label_smoothing=0.1, upcast=up)
        outs.append((loss.detach(), *torch.autograd.grad(loss, (x, y, sc))))
    for what, got, want, same in zip(("loss", "dx", "dy", "dscale"), *outs, strict=True):
        assert_close_dtype(got, want, same, dtype, what)


def test_cuda_emu_gradcheck(emu, monkeypatch):
    monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", "0.0001")  # one row per chunk
    img, txt = _feats(6, 6, 3, torch.float64)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda i, t, sc: gammacl.clip_loss(i, t, sc, backend="cuda"), (img, txt, s)
    )


def test_cuda_emu_bindings_validate_arguments(emu):
    a, b = _feats(4, 5, 3, torch.float32)
    s, ar, ac = torch.tensor(2.0), torch.zeros(4), torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"gamma_onepass_fwd \(cuda\): scale must be Float"):
        emu.gamma_onepass_fwd(a, b, s.double(), ar, ac, 0.5, 0.5, 30.0, 0, True)
    with pytest.raises(RuntimeError, match=r"alpha_col must have shape \[5\], got \[4\]"):
        emu.gamma_onepass_fwd(a, b, s, ar, ar, 0.5, 0.5, 30.0, 0, True)
    with pytest.raises(RuntimeError, match=r"same feature dimension, got 3 and 2"):
        emu.simlse_fwd(a, b[:, :2], s, 0, False, True)
    with pytest.raises(RuntimeError, match=r"same dtype, got Float and Double"):
        emu.simlse_fwd(a, b.double(), s, 0, False, True)
    with pytest.raises(RuntimeError, match=r"g_row must have shape \[4\], got \[3\]"):
        emu.simlse_bwd(a, b, s, ar, ac, torch.zeros(3), ac, 0, False, True)


def _libasan() -> str | None:
    import shutil
    import subprocess

    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    lib = path.stdout.strip()
    return lib if os.path.isabs(lib) and os.path.exists(lib) else None


def test_cuda_emu_memcheck():
    """compute-sanitizer memcheck's CPU analogue: tests/cuda_emu/memcheck.py runs every op of the
    cuda backend (kernels + bindings, emulated) under AddressSanitizer in a subprocess."""
    import subprocess
    import sys

    lib = _libasan()
    if lib is None:
        pytest.skip("gcc's libasan.so not found (AddressSanitizer runtime)")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")
    env["PYTHONPATH"] = os.pathsep.join([str(tests), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(tests / "cuda_emu" / "memcheck.py")],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert "AddressSanitizer" not in out.replace("ASan doesn't fully support", ""), out[-6000:]
    assert res.returncode == 0, out[-6000:]
    assert "op calls clean" in res.stdout, out[-6000:]


@pytest.mark.parametrize("chunk", ["default", TINY_CHUNK])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_emu_results_do_not_depend_on_schedule(emu, monkeypatch, dtype, chunk):
    """racecheck's CPU analogue: every launch again with its blocks, and the threads of each block
    between barriers, in reverse order (GAMMACL_EMU_ORDER=reverse). No atomics, one writer per
    output: the results must be bitwise identical; a shared-memory race or a block reading another
    block's output of the same launch would change them."""
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", chunk)
    m, n, d = 130, 300, 24
    a, b = _feats(m, n, d, dtype)
    acc = _acc(dtype)
    s = torch.tensor(9.0, dtype=acc)
    gr, gc = torch.randn(m, dtype=acc), torch.randn(n, dtype=acc)

    def outputs():
        row, col = emu.simlse_fwd(a, b, s, 1, True, True)
        return (
            row, col, *emu.simlse_bwd(a, b, s, row, col, gr, gc, 1, True, True),
            *emu.gamma_onepass_fwd(a, b, s, gr - 3, gc - 3, 0.5, 0.25, 30.0, -1, True),
        )  # fmt: skip

    forward = outputs()
    monkeypatch.setenv("GAMMACL_EMU_ORDER", "reverse")
    backward = outputs()
    for k, (x, y) in enumerate(zip(forward, backward, strict=True)):
        assert torch.equal(x, y), f"output {k} depends on the schedule"


@pytest.fixture(scope="module")
def selftest():
    from cuda_emu.build import load_selftest

    return load_selftest()


def test_emulator_detects_what_the_cuda_tests_rely_on(selftest, monkeypatch):
    """The emulator's checks can fail: a shared-memory read racing another thread's write gives
    schedule-dependent output (the racecheck analogue above keys on that), a barrier reached by
    one warp only and an over-large grid are launch errors, and warp shuffles exchange values."""

    def want(salt):
        return torch.roll(torch.arange(1, 65), -1) + 1000 * salt

    assert torch.equal(selftest.run("no_race", 0), want(0))
    forward = selftest.run("race", 1)  # reads sm before its neighbour wrote it: stale values
    assert not torch.equal(forward, want(1))
    assert torch.equal(selftest.run("no_race", 2), want(2))
    monkeypatch.setenv("GAMMACL_EMU_ORDER", "reverse")
    assert torch.equal(selftest.run("no_race", 1), want(1))
    assert torch.equal(selftest.run("no_race", 2), want(2))
    reverse = selftest.run("race", 1)  # neighbours now run first
    assert not torch.equal(reverse, forward), "race not exposed by the schedule"
    monkeypatch.delenv("GAMMACL_EMU_ORDER")
    assert torch.equal(selftest.run("shuffle"), torch.full((64,), 496))
    with pytest.raises(RuntimeError, match=r"divergent barrier \(32 of 64 threads wait"):
        selftest.run("divergent")
    with pytest.raises(RuntimeError, match=r"invalid configuration: grid \(1, 65536, 1\)"):
        selftest.run("grid_y_too_large")


@pytest.mark.parametrize("vec", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_ids)
def test_simlse_cuda_emu_empty_problems(emu, shape, vec):
    """The CUDA entry points (csrc/checks.h simlse_*_entry) on M, N or D = 0, as the cpp test."""
    check_empty_simlse(emu, *shape, vec)
