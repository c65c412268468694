"""PyTorch integration: custom-op registration (opcheck), torch.compile(fullgraph=True) without
graph breaks, autocast, determinism."""

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_fp64

import gammacl
from gammacl.ops.simlse import _simlse_backward_op
from gammacl.ops.simlse import simlse as _simlse_op

NO_TRITON = cpu_backends(include_triton=False)


def _inputs(n=9, d=16, m=None, dtype=torch.float64):
    a = torch.randn(n if m is None else m, d, dtype=dtype, requires_grad=True)
    b = torch.randn(n, d, dtype=dtype, requires_grad=True)
    s = torch.tensor(
        3.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True
    )
    return a, b, s


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "offset,exclude,cols", [(0, False, True), (1, True, False), (-2, True, True)]
)
def test_opcheck_simlse(backend, offset, exclude, cols):
    a, b, s = _inputs(7, 16, m=5)
    if cols:
        b = b[:5].detach().requires_grad_()
    torch.library.opcheck(_simlse_op, (a, b, s, offset, exclude, cols, backend))
    row, col = _simlse_op(a.detach(), b.detach(), s.detach(), offset, exclude, cols, backend)
    g_row, g_col = torch.rand_like(row), torch.rand_like(col)
    args = (a.detach(), b.detach(), s.detach(), row, col, g_row, g_col, offset, exclude, cols)
    torch.library.opcheck(_simlse_backward_op, (*args, backend))
    torch.library.opcheck(_simlse_backward_op, (*args, backend, None, False))  # no dB


@pytest.mark.parametrize("backend", NO_TRITON)
def test_compile_fullgraph_matches_eager(backend):
    a, b, s = _inputs()
    labels = torch.randperm(9)

    def step(a, b, s):
        return (
            gammacl.clip_loss(a, b, s, label_smoothing=0.1, backend=backend)
            + gammacl.infonce_loss(a, b, s, reduction="sum", backend=backend)
            + gammacl.ClipLoss(backend=backend)(a, b, s)
        )

    explain = torch._dynamo.explain(step)(a, b, s)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(a, b, s)
    grads = torch.autograd.grad(out, (a, b, s))
    ref = step(a, b, s)
    ref_grads = torch.autograd.grad(ref, (a, b, s))
    assert_close_fp64(out, ref, "compiled loss")
    for x, y in zip(grads, ref_grads):
        assert_close_fp64(x, y, "compiled grads")
    del labels


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    img_tower, txt_tower = torch.nn.Linear(16, 8), torch.nn.Linear(12, 8)
    x, y = torch.randn(10, 16), torch.randn(10, 12)
    s = torch.tensor(10.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt = img_tower(x), txt_tower(y)
        img.retain_grad()
        loss = gammacl.clip_loss(img, txt, s, backend="torch")
    assert img.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert img.grad.dtype == torch.bfloat16
    assert img_tower.weight.grad.dtype == torch.float32
    ref = gammacl.reference.clip_loss(img.detach(), txt.detach(), 10.0)
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("backend", NO_TRITON)
def test_deterministic_bitwise(backend):
    torch.use_deterministic_algorithms(True)
    try:
        a, b, s = _inputs(37, 24, dtype=torch.float32)
        runs = []
        for _ in range(3):
            loss = gammacl.clip_loss(a, b, s, backend=backend)
            runs.append((loss.detach(), *torch.autograd.grad(loss, (a, b, s))))
        for other in runs[1:]:
            for x, y in zip(runs[0], other):
                assert torch.equal(x, y)
    finally:
        torch.use_deterministic_algorithms(False)


def test_double_backward_is_a_clear_error():
    a, b, s = _inputs()
    loss = gammacl.clip_loss(a, b, s, backend="torch")
    (ga,) = torch.autograd.grad(loss, (a,), create_graph=True)
    # the backward op has no autograd formula: torch says so and names it (any other
    # RuntimeError, e.g. from inside a kernel, is a different failure)
    with pytest.raises(
        RuntimeError, match=r"backward through gammacl\.simlse_backward.*no autograd formula"
    ):
        torch.autograd.grad(ga.sum(), (b,))


def test_opcheck_cpp_gamma_onepass_and_draw():
    from gammacl import _ext
    from gammacl.gamma import _draw_op

    torch.library.opcheck(_draw_op, ("log_gamma", 2.0, 5, -1, torch.device("cpu"), torch.float32))
    ok, why = _ext.available(cuda=False)
    if not ok:
        pytest.skip(f"C++ extension unavailable: {why}")
    ops = _ext.load()
    # M != N: the fakes beside the op contracts (ops/gamma_onepass.py, ops/siglip.py) must not
    # swap the row and column shapes
    a, b = torch.randn(6, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    ar, ac = torch.randn(6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    for grad in (True, False):
        torch.library.opcheck(
            ops.gamma_onepass_fwd.default, (a, b, s, ar, ac, 0.5, 0.5, 30.0, 0, grad)
        )
        for x in (a, a.float()):
            torch.library.opcheck(
                ops.siglip_fwd.default, (x, b.to(x.dtype), s.to(x.dtype), bias.to(x.dtype), 0, grad)
            )
