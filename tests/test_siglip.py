"""siglip (issue 18): the fused SigLIP loss on every CPU backend (torch, cpp, triton under the
interpreter, cuda under the CPU emulator) against open_clip's SigLipLoss formula evaluated in
float64 (gammacl.reference.siglip); the op's outputs, gradcheck, opcheck, torch.compile,
autocast, the one-pass / chunked / deterministic Triton structures, 2-rank gloo and peak RSS."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

import gammacl
from gammacl.ops.siglip import _backend_impl, _siglip_op
from gammacl.reference import siglip as ref

ALL = cpu_backends()
NOT_TRITON = cpu_backends(include_triton=False)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DT_IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731
OUTPUTS = ("row_loss", "row_wsum", "row_wdot", "da_raw", "db_raw")
NAMES5 = ("loss", "d_image", "d_text", "d_scale", "d_bias")
SLOW_D = {"triton", "cuda"}  # D = 1000 under the interpreter / emulator: @slow


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _feats(m, n, d, dtype, seed=0, corr=True):
    """L2-normalised features, text_i correlated with image_i (positives score higher)."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    if corr:
        k = min(m, n)
        b[:k] += 2.0 * a[:k]
    return a.to(dtype), F.normalize(b, dim=1).to(dtype)


def _sb(dtype, scale=10.0, bias=-10.0):
    """open_clip's SigLIP init: logit_scale = exp(log 10) = 10, logit_bias = -10."""
    acc = _acc(dtype)
    return torch.tensor(scale, dtype=acc), torch.tensor(bias, dtype=acc)


def _grads(fn, a, b, s, bias):
    a, b, s, bias = (x.detach().clone().requires_grad_() for x in (a, b, s, bias))
    loss = fn(a, b, s, bias)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, s, bias)))


def _ref64(a, b, s, bias, offset=0):
    return _grads(lambda *x: ref.siglip_loss(*x, offset=offset), a, b, s, bias)


def _ref_same(a, b, s, bias, offset=0):
    return _grads(lambda *x: ref.siglip_loss(*x, offset=offset, upcast=False), a, b, s, bias)


def _skip_16bit_torch(backend, dtype):
    if dtype in (torch.float16, torch.bfloat16) and backend == "torch":
        pytest.skip("the torch backend up-casts to fp32 first: 16-bit adds nothing over fp32")


# ---------------------------------------------------------------------------------------------
# the op's outputs

# (M, N, D, offset): no size a multiple of the 32-wide interpreter tiles, D = 1 and several D
# chunks (D > 32), rectangular with positive / negative / out-of-range offsets
SHAPES = [(7, 7, 1, 0), (37, 37, 40, 0), (10, 13, 4, 3), (40, 35, 20, -2), (5, 9, 3, 7)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_outputs_match_reference(backend, dtype, shape):
    _skip_16bit_torch(backend, dtype)
    m, n, d, off = shape
    a, b = _feats(m, n, d, dtype)
    s, bias = _sb(dtype)
    out = _backend_impl(backend)(a, b, s, bias, off, True)
    r64 = ref.siglip(a, b, s, bias, off, upcast=True)
    same = ref.siglip(a, b, s, bias, off, upcast=False)
    for name, x, y, z in zip(OUTPUTS, out, r64, same, strict=True):
        assert x.dtype == _acc(dtype), name
        assert_close_dtype(x, y, z, dtype, f"{backend} {dtype} {shape} {name}")


@pytest.mark.parametrize("backend", ALL)
def test_op_no_grad_skips_gradients(backend):
    a, b = _feats(9, 11, 20, torch.float64)
    s, bias = _sb(torch.float64)
    full = _backend_impl(backend)(a, b, s, bias, 1, True)
    stats = _backend_impl(backend)(a, b, s, bias, 1, False)
    assert stats[2].shape == (0,) and stats[3].shape == (0, 20) and stats[4].shape == (0, 20)
    for name, x, y in zip(OUTPUTS[:2], stats[:2], full[:2], strict=True):
        assert_close_fp64(x, y, name)


# ---------------------------------------------------------------------------------------------
# the public loss: value and gradients (a, b, logit_scale, logit_bias) vs the float64 formula


def _public_case(backend, dtype, d, n=37):
    _skip_16bit_torch(backend, dtype)
    a, b = _feats(n, n, d, dtype, seed=d)
    s, bias = _sb(dtype)
    ours = _grads(lambda *x: gammacl.siglip_loss(*x, backend=backend), a, b, s, bias)
    assert ours[0].dtype == _acc(dtype) and ours[0].ndim == 0
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    r64, same = _ref64(a, b, s, bias), _ref_same(a, b, s, bias)
    for name, x, y, z in zip(NAMES5, ours, r64, same, strict=True):
        assert_close_dtype(x, y, z, dtype, f"{backend} {dtype} D={d} {name}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [1, 64])
def test_loss_and_grads_match_formula(backend, dtype, d):
    _public_case(backend, dtype, d)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow])
        if p.values[0] in SLOW_D
        else p
        for p in ALL
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DT_IDS)
def test_loss_and_grads_match_formula_d1000(backend, dtype):
    """D = 1000: the Triton chunked (large-D) structure; 16-bit only over 128."""
    _public_case(backend, dtype, 1000, n=37)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS)
@pytest.mark.parametrize("d", [1, 64, 160], ids=["d1", "one-pass", "chunked"])
def test_dscale_16bit_from_the_unrounded_weights(backend, dtype, d):
    """d loss / d logit_scale = (1/M) sum_ij W_ij S_ij: the fused paths round W to the 16-bit
    operand dtype for their gradient GEMMs, and <a, W b> from that W was 2.5e-3 relative off in
    bf16 (triton; 9e-5 cuda) where torch's fp32 W is 5e-8 off. row_wdot sums the fp32 W: within
    10x of the torch backend's error against float64, plus the fp32 summation floor
    log2(#terms) eps32 sum_ij |W_ij S_ij| / M (positive and negative terms cancel in part)."""
    n = 33
    a, b = _feats(n, n, d, dtype, seed=d, corr=False)
    s, bias = _sb(dtype, scale=3.0, bias=-2.0)
    want = _ref64(a, b, s, bias)[3]
    base = _grads(lambda *x: gammacl.siglip_loss(*x, backend="torch"), a, b, s, bias)[3]
    got = _grads(lambda *x: gammacl.siglip_loss(*x, backend=backend), a, b, s, bias)[3]
    s64 = a.double() @ b.double().T
    y = 3.0 * s64 - 2.0
    y.diagonal().neg_()
    w = torch.sigmoid(y)
    floor = math.log2(n * n) * torch.finfo(torch.float32).eps * float((w * s64.abs()).sum() / n)
    bound = 10 * abs(float(base) - float(want)) + floor
    assert abs(float(got) - float(want)) <= bound, (
        f"{backend}: dscale {float(got):.6e}, float64 {float(want):.6e}, torch {float(base):.6e}"
    )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DT_IDS)
def test_extreme_logits(backend, dtype):
    """|l| up to ~1e4 (logit_scale 1e4): softplus / sigmoid from e^{-|y|} never overflow; the
    loss (~ sum of the wrong-sign |l|) and every gradient match the float64 formula."""
    a, b = _feats(21, 21, 8, dtype, corr=False)
    s, bias = _sb(dtype, scale=1.0e4, bias=-10.0)
    assert float((s.double() * (a.double() @ b.double().T)).abs().max()) > 5e3
    ours = _grads(lambda *x: gammacl.siglip_loss(*x, backend=backend), a, b, s, bias)
    r64, same = _ref64(a, b, s, bias), _ref_same(a, b, s, bias)
    assert float(r64[0]) > 1e3
    for name, x, y, z in zip(NAMES5, ours, r64, same, strict=True):
        assert torch.isfinite(x).all(), name
        assert_close_dtype(x, y, z, dtype, f"{backend} extreme {name}")


@pytest.mark.parametrize("backend", ALL)
def test_bias_minus_ten_small_softplus(backend):
    """bias = -10, logit_scale 1, no positive in range (offset past N): every entry is a negative
    with softplus(l) ~ 4.5e-5, where log(1 + e) in fp32 loses ~3 digits (1 + e rounds at 6e-8);
    log1p keeps each fp32 row sum to a few fp32 roundings."""
    a, b = _feats(33, 33, 16, torch.float32)
    s, bias = _sb(torch.float32, scale=1.0, bias=-10.0)
    row_loss, row_wsum, *_ = _backend_impl(backend)(a, b, s, bias, 40, False)
    want, want_w, *_ = ref.siglip(a, b, s, bias, 40)
    rel = ((row_loss.double() - want) / want).abs().max()
    assert rel < 2e-6, f"{backend}: row loss relative error {float(rel):.2e}"
    assert ((row_wsum.double() - want_w) / want_w).abs().max() < 2e-6
    # and the public loss with the positives, against the float64 formula
    loss = gammacl.siglip_loss(a, b, s, bias, backend=backend)
    assert abs(float(loss) - float(ref.siglip_loss(a, b, s, bias))) <= 1e-6 * float(loss)


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck(backend):
    a, b = _feats(6, 6, 5, torch.float64)
    s, bias = _sb(torch.float64, scale=3.0, bias=-2.0)
    args = tuple(x.clone().requires_grad_() for x in (a, b, s, bias))
    fn = lambda *x: gammacl.siglip_loss(*x, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, args, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=backend == "triton"
    )


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    if backend == "cpp" and not gammacl._ext.available()[0]:
        pytest.skip("C++ extension unavailable")
    a, b = _feats(6, 5, 16, torch.float32)
    s, bias = _sb(torch.float32)
    torch.library.opcheck(_siglip_op, (a, b, s, bias, 1, False, backend))
    args = [x.clone().requires_grad_() for x in (a, b, s, bias)]
    torch.library.opcheck(_siglip_op, (*args, 1, True, backend))


def test_no_grad_and_frozen_inputs():
    a, b = _feats(6, 6, 16, torch.float64)
    s, bias = _sb(torch.float64)
    with torch.no_grad():
        l0 = gammacl.siglip_loss(a, b, s, bias, backend="torch")
    l1 = gammacl.siglip_loss(a, b, s, bias, backend="torch")
    assert not l0.requires_grad and not l1.requires_grad
    assert_close_fp64(l0, ref.siglip_loss(a, b, s, bias), "loss")
    # only the bias trains: its gradient alone
    bb = bias.clone().requires_grad_()
    (g,) = torch.autograd.grad(gammacl.siglip_loss(a, b, s, bb, backend="torch"), (bb,))
    assert_close_fp64(g, _ref64(a, b, s, bias)[4], "d_bias")


def test_python_scalars_and_validation():
    a, b = _feats(5, 5, 4, torch.float32)
    got = gammacl.siglip_loss(a, b, 10.0, -10.0, backend="torch")
    assert abs(float(got) - float(ref.siglip_loss(a, b, 10.0, -10.0))) < 1e-5
    with pytest.raises(ValueError, match="logit_bias"):
        gammacl.siglip_loss(a, b, 10.0, torch.zeros(2))
    with pytest.raises(ValueError, match="same batch size"):
        gammacl.siglip_loss(a, b[:4], 10.0, -10.0)
    with pytest.raises(ValueError, match="dist_impl"):
        gammacl.SigLipLoss(dist_impl="ring")


# ---------------------------------------------------------------------------------------------
# loops and merges at more than one trip


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_many_row_chunks(backend, monkeypatch):
    """Chunked CPU backends with 4-row chunks (the torch budget) / 8-row chunks (cpp's)."""
    if backend == "cpp" and not gammacl._ext.available()[0]:
        pytest.skip("C++ extension unavailable")
    simlse_mod = importlib.import_module("gammacl.ops.simlse")  # the torch backends' budget
    monkeypatch.setattr(simlse_mod, "_CHUNK_BYTES", 4 * 35 * 2 * 8)  # 4 rows of two fp64 buffers
    monkeypatch.setenv("GAMMACL_CPU_CHUNK_MIB", str(8 * 35 * 8 / 2**20))
    a, b = _feats(37, 35, 20, torch.float64)
    s, bias = _sb(torch.float64)
    out = _backend_impl(backend)(a, b, s, bias, 2, True)
    for name, x, y in zip(OUTPUTS, out, ref.siglip(a, b, s, bias, 2), strict=True):
        assert_close_fp64(x, y, name)


def test_cpp_threads_one_and_two_bitwise():
    """The cpp epilogue parallelises over rows (each row summed by one thread): 1 and 2 OpenMP
    threads give bitwise equal outputs, equal to the reference."""
    if not gammacl._ext.available()[0]:
        pytest.skip("C++ extension unavailable")
    a, b = _feats(70, 50, 24, torch.float32)
    s, bias = _sb(torch.float32)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_backend_impl("cpp")(a, b, s, bias, 0, True))
    finally:
        torch.set_num_threads(old)
    for name, x, y in zip(OUTPUTS, *outs, strict=True):
        assert torch.equal(x, y), name
    same = ref.siglip(a, b, s, bias, upcast=False)
    for name, x, y, z in zip(OUTPUTS, outs[0], ref.siglip(a, b, s, bias), same, strict=True):
        assert_close_dtype(x, y, z, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_triton_chunked_structure_many_chunks(dtype, monkeypatch):
    """The large-D structure forced at D = 40: 3 row chunks of 32 (the dB GEMM accumulates),
    2 column tiles per chunk, 2 K steps per GEMM."""
    if not (gammacl.dispatch.interpreter_on() and gammacl.dispatch.triton_importable()):
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    k = importlib.import_module("gammacl.kernels.siglip")
    monkeypatch.setitem(k._ONEPASS_MAX_D, dtype, 0)
    per_row = 37 * dtype.itemsize + 2 * 2 * 8  # W row + two partials over 2 column tiles
    monkeypatch.setenv("GAMMACL_TRITON_CHUNK_MIB", str(32 * per_row / 2**20))
    assert k._chunks(70, 37, dtype).size == 32
    a, b = _feats(70, 37, 40, dtype)
    s, bias = _sb(dtype)
    out = k.siglip_fwd(a, b, s, bias, 3, True)
    r64, same = ref.siglip(a, b, s, bias, 3), ref.siglip(a, b, s, bias, 3, upcast=False)
    for name, x, y, z in zip(OUTPUTS, out, r64, same, strict=True):
        assert_close_dtype(x, y, z, dtype, f"chunked {dtype} {name}")


def test_triton_deterministic_path_matches():
    """Under torch.use_deterministic_algorithms the one-pass kernel runs twice without atomics
    (the second launch on the transposed problem): same outputs as the reference."""
    if not (gammacl.dispatch.interpreter_on() and gammacl.dispatch.triton_importable()):
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    k = importlib.import_module("gammacl.kernels.siglip")
    a, b = _feats(40, 35, 20, torch.float64)
    s, bias = _sb(torch.float64)
    torch.use_deterministic_algorithms(True)
    try:
        assert k.use_deterministic_path()
        out = k.siglip_fwd(a, b, s, bias, -2, True)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, x, y in zip(OUTPUTS, out, ref.siglip(a, b, s, bias, -2), strict=True):
        assert_close_fp64(x, y, name)


def test_triton_aot_launches_runs():
    """aot_launches (the AOT compile check's entry) runs every launcher under the interpreter."""
    if not (gammacl.dispatch.interpreter_on() and gammacl.dispatch.triton_importable()):
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    k = importlib.import_module("gammacl.kernels.siglip")
    for dtype in (torch.float32, torch.bfloat16):
        k.aot_launches(dtype, 16)


# ---------------------------------------------------------------------------------------------
# the module: open_clip drop-in, torch.compile, autocast


def _open_clip_siglip(image, text, logit_scale, logit_bias):
    """open_clip SigLipLoss._loss (single process): labels 2 eye - 1, -logsigmoid(labels *
    logits).sum() / N, logits = logit_scale * image @ text.T + logit_bias."""
    logits = logit_scale * image @ text.T + logit_bias
    n = image.shape[0]
    labels = 2 * torch.eye(n, dtype=image.dtype) - torch.ones(n, n, dtype=image.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def test_module_matches_open_clip_formula():
    a, b = _feats(9, 9, 12, torch.float64)
    s, bias = _sb(torch.float64)
    mod = gammacl.SigLipLoss(backend="torch")
    ours = _grads(lambda *x: mod(*x), a, b, s, bias)
    want = _grads(_open_clip_siglip, a, b, s, bias)
    for name, x, y in zip(NAMES5, ours, want, strict=True):
        assert_close_fp64(x, y, name)
    out = mod(a, b, s, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close_fp64(out["contrastive_loss"], want[0], "output_dict")
    # open_clip's helpers, for subclasses
    lg = mod.get_logits(a, b, s, bias)
    gt = mod.get_ground_truth(a.device, a.dtype, 9)
    assert_close_fp64(-F.logsigmoid(gt * lg).sum() / 9, want[0], "get_logits / get_ground_truth")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True): one graph, no break (the op is one opaque custom-op node);
    forward and backward equal to eager, no recompile for new values."""
    if backend == "cpp" and not gammacl._ext.available()[0]:
        pytest.skip("C++ extension unavailable")
    torch._dynamo.reset()
    mod = gammacl.SigLipLoss(backend=backend)
    a, b = _feats(11, 11, 8, torch.float64)
    s, bias = _sb(torch.float64)
    explain = torch._dynamo.explain(mod)(a, b, s, bias)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    compiled = torch.compile(mod, fullgraph=True)
    for seed in (0, 1):
        a, b = _feats(11, 11, 8, torch.float64, seed=seed)
        s, bias = _sb(torch.float64, scale=10.0 + seed, bias=-10.0 + seed)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            got = _grads(compiled, a, b, s, bias)
        want = _grads(mod, a, b, s, bias)
        for name, x, y in zip(NAMES5, got, want, strict=True):
            assert_close_fp64(x, y, f"compiled {name}")


def test_autocast_rules():
    """Under CPU bf16 autocast: fp32 features stay fp32 (same loss as without autocast, fp32
    grads); bf16 features give an fp32 loss and bf16 grads."""
    a, b = _feats(10, 10, 8, torch.float32)
    s, bias = _sb(torch.float32)
    plain = _grads(lambda *x: gammacl.siglip_loss(*x, backend="torch"), a, b, s, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _grads(lambda *x: gammacl.siglip_loss(*x, backend="torch"), a, b, s, bias)
        half = _grads(
            lambda *x: gammacl.siglip_loss(*x, backend="torch"), a.bfloat16(), b.bfloat16(), s, bias
        )
    for x, y in zip(plain, auto, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert half[0].dtype == torch.float32 and half[1].dtype == torch.bfloat16
    assert half[3].dtype == torch.float32 and half[4].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# no N x N: peak RSS of one forward+backward at N = 8192, D = 64 (bound as tests/test_memory.py)

N_MEM, D_MEM = 8192, 64
NN_MIB = N_MEM * N_MEM * 4 / 2**20

PROBE = r"""
import sys, torch, gammacl
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
backend, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
sc = torch.tensor(10.0, requires_grad=True); bias = torch.tensor(-10.0, requires_grad=True)
fn = (lambda a, b: gammacl.reference.siglip.siglip_loss(a, b, sc, bias)) if backend == "naive" \
    else (lambda a, b: gammacl.siglip_loss(a, b, sc, bias, backend=backend))
fn(*[torch.randn(64, d, requires_grad=True) for _ in range(2)]).backward()   # warm up
a = torch.randn(n, d, requires_grad=True); b = torch.randn(n, d, requires_grad=True)
base = hwm()
fn(a, b).backward()
print(hwm() - base)
"""


def _peak_growth_mib(backend: str) -> float:
    env = dict(
        os.environ, GAMMACL_CHUNK_MIB="16", OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="1048576"
    )
    out = subprocess.run(
        [sys.executable, "-c", PROBE, backend, str(N_MEM), str(D_MEM)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "backend",
    [
        *cpu_backends(include_triton=False, include_cuda_emu=False),
        "naive",  # the probe sees an N x N buffer
    ],
)
@pytest.mark.slow  # ~15-20 s per backend on the shared 2-core box (a subprocess at N = 8192)
def test_no_nxn_allocation(backend):
    grow = _peak_growth_mib(backend)
    if backend == "naive":  # the probe can see an N x N buffer
        assert grow > NN_MIB, f"the materialised reference grew only {grow:.0f} MiB"
    else:
        assert grow < 0.4 * NN_MIB, f"{backend}: peak RSS grew {grow:.0f} MiB (N x N = 256 MiB)"


# ---------------------------------------------------------------------------------------------
# 2-rank gloo: open_clip's distributed SigLipLoss semantics, equal to one process

N_LOCAL, DIM, WORLD = 5, 7, 2


def _oracle_gather(image, text, logit_scale, logit_bias, rank, world):
    """open_clip's SigLipLoss over ranks written with a gather (its dist_impl="gather" loss):
    local images against every rank's texts, positives only in the own block, / n."""
    import torch.distributed.nn

    all_text = torch.cat(torch.distributed.nn.all_gather(text), dim=0)
    n = image.shape[0]
    logits = logit_scale * image @ all_text.T + logit_bias
    labels = -torch.ones_like(logits)
    labels[:, rank * n : (rank + 1) * n] += 2 * torch.eye(n, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


def _check_dist(rank, world, report):
    import torch.distributed as dist

    img, txt = _feats(world * N_LOCAL, world * N_LOCAL, DIM, torch.float64)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    s, bias = _sb(torch.float64, scale=4.0, bias=-3.0)
    full = _ref64(img, txt, s, bias)

    for backend in ("torch", "cpp"):
        for impl in ("bidir", "gather"):

            def run(backend=backend, impl=impl):
                if backend == "cpp" and not gammacl._ext.available()[0]:
                    return "skipped: no C++ extension"
                mod = gammacl.SigLipLoss(rank=rank, world_size=world, dist_impl=impl,
                                         backend=backend)  # fmt: skip
                ours = _grads(mod, img[sl], txt[sl], s, bias)
                orc = _grads(lambda *x: _oracle_gather(*x, rank, world), img[sl], txt[sl], s, bias)
                for name, x, y in zip(NAMES5, ours, orc, strict=True):
                    assert_close_fp64(x, y, f"{backend} {impl} {name} vs open_clip")
                # single process on the concatenated batch: mean_r loss_r = L, features W dL,
                # mean_r dscale_r / dbias_r = dL/dscale, dL/dbias (DDP's average)
                red = torch.stack([ours[0], ours[3], ours[4]])
                dist.all_reduce(red)
                red = red / world
                assert_close_fp64(red[0], full[0], "mean loss = full-batch loss")
                assert_close_fp64(red[1], full[3], "mean d_scale = full-batch")
                assert_close_fp64(red[2], full[4], "mean d_bias = full-batch")
                assert_close_fp64(ours[1], world * full[1][sl], "d_image = W dL")
                assert_close_fp64(ours[2], world * full[2][sl], "d_text = W dL")
                return float(ours[0])

            report(f"siglip {backend} {impl}", run)

    def fail_fast():
        bad = txt[sl][:, :-1] if rank == 1 else txt[sl]
        try:
            gammacl.SigLipLoss(rank=rank, world_size=world, backend="torch")(img[sl], bad, s, bias)
        except ValueError as e:
            return str(e)
        raise AssertionError("no error raised")

    report("siglip fail-fast", fail_fast)


@pytest.mark.slow  # ~25 s: two spawned processes importing torch
def test_two_rank_gloo_equals_one_process():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from test_distributed import _ok, _run_world

    run = (WORLD, _run_world(WORLD, (_check_dist,)))
    for be in ("torch", "cpp"):
        for impl in ("bidir", "gather"):
            _ok(run, f"siglip {be} {impl}")
    msgs = _ok(run, "siglip fail-fast")
    assert msgs[0] == msgs[1] and "text_features differs between ranks" in msgs[0], msgs


# ---------------------------------------------------------------------------------------------
# the CUDA backend under the CPU emulator: many chunks, several row / column tiles per chunk,
# strided features, schedule independence (racecheck analogue, as tests/test_cuda_emu.py)


def _emu_ok():
    from cuda_emu.routing import available

    return available()


_EMU_OK = _emu_ok()
needs_emu = pytest.mark.skipif(not _EMU_OK[0], reason=f"CUDA emulation unavailable: {_EMU_OK[1]}")


@pytest.fixture
def emu():
    from cuda_emu.routing import routed

    with routed() as ops:
        yield ops


@pytest.mark.emu
@needs_emu
@pytest.mark.parametrize("chunk", ["default", "0.2"])  # 0.2 MiB: ~100-row chunks at N = 300
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(230, 300, 24, 1), (70, 257, 16, -3)], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_cuda_emu_chunks_tiles_strides(emu, monkeypatch, shape, dtype, chunk, strided):
    """At 0.2 MiB, 230 rows run as 2 chunks (128 + 102 rows in place for fp32, 115 + 115 with a
    16-bit W), 2 row tiles of 64 per chunk; N = 300 / 257: two column tiles of 256."""
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", chunk)
    m, n, d, off = shape
    a, b = _feats(m, n, d + 5 if strided else d, dtype)
    if strided:  # row stride d + 5, unit column stride (GEMM operand views, no copy)
        a, b = a[:, :d], b[:, :d]
    s, bias = _sb(dtype)
    out = emu.siglip_fwd(a, b, s, bias, off, True)
    r64, same = ref.siglip(a, b, s, bias, off), ref.siglip(a, b, s, bias, off, upcast=False)
    for name, x, y, z in zip(OUTPUTS, out, r64, same, strict=True):
        assert_close_dtype(x, y, z, dtype, f"cuda-emu {dtype} {shape} chunk={chunk} {name}")
    stats = emu.siglip_fwd(a, b, s, bias, off, False)
    assert stats[2].shape == (0,) and stats[3].shape == (0, d) and stats[4].shape == (0, d)
    for name, x, y in zip(OUTPUTS[:2], stats[:2], out[:2], strict=True):
        assert torch.equal(x, y), name


@pytest.mark.emu
@needs_emu
@pytest.mark.parametrize("chunk", ["default", "0.2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_emu_siglip_does_not_depend_on_schedule(emu, monkeypatch, dtype, chunk):
    """Every launch again with blocks and threads in reverse order (GAMMACL_EMU_ORDER=reverse):
    no atomics, one writer per output, so the outputs must be bitwise identical."""
    if chunk != "default":
        monkeypatch.setenv("GAMMACL_CUDA_CHUNK_MIB", chunk)
    a, b = _feats(230, 300, 24, dtype)
    s, bias = _sb(dtype)
    forward = emu.siglip_fwd(a, b, s, bias, 1, True)
    monkeypatch.setenv("GAMMACL_EMU_ORDER", "reverse")
    backward = emu.siglip_fwd(a, b, s, bias, 1, True)
    for name, x, y in zip(OUTPUTS, forward, backward, strict=True):
        assert torch.equal(x, y), f"{name} depends on the schedule"


@pytest.mark.emu
@needs_emu
def test_cuda_emu_binding_validates_arguments(emu):
    a, b = _feats(4, 4, 3, torch.float32)
    s, bias = _sb(torch.float32)
    with pytest.raises(RuntimeError, match=r"siglip_fwd \(cuda\): bias must be Float"):
        emu.siglip_fwd(a, b, s, bias.double(), 0, True)
    with pytest.raises(RuntimeError, match=r"siglip_fwd \(cuda\): bias must have one element"):
        emu.siglip_fwd(a, b, s, torch.zeros(2), 0, True)
