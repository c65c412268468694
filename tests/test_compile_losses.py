"""PyTorch integration of GammaClipLoss / SogCLRLoss and the gammacl.modality losses (issue 8):
torch.compile(fullgraph=True) without graph breaks or host syncs, forward + backward and the
per-sample rate state equal to eager; autocast (CPU bf16); determinism, including the
atomic-free path of the Triton one-pass kernel.

Cost: each compiled step is ONE graph per backend holding every loss of its family (tiny
shapes, fp64 so compiled and eager agree to fp64 rounding)."""

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_fp64

import gammacl.modality as M
from gammacl.gamma import GammaClipLoss, SogCLRLoss, gamma_step_loss
from gammacl.ops.gamma_onepass import gamma_onepass
from gammacl.reference import gamma as ref_gamma

NO_TRITON = cpu_backends(include_triton=False)

# n = 10 samples, B = 5: first visits, a mixed batch, a duplicated index, a fully seen batch
SCHEDULE = [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [8, 9, 5, 6, 9], [4, 0, 2, 1, 3], [2, 7, 5, 9, 0]]


def _batch(k, b=5, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + k)
    a, c = (
        torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64, generator=g), dim=1)
        .to(dtype)
        .requires_grad_()
        for _ in range(2)
    )
    s = torch.tensor(4.0 + k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return a, c, s.requires_grad_()


def _gamma_family(backend):
    """One module per stateful path (the step adds gamma_step_loss): one-pass + LSE pass with
    Gamma draws from a generator, SogCLR two-pass, rate='batch' with global-RNG draws,
    rate='fixed' one-pass."""
    fixed = GammaClipLoss(10, rate="fixed", shape=0.5, backend=backend)
    fixed.set_log_rates(torch.linspace(-1.0, 1.0, 10), torch.linspace(0.5, -0.5, 10))
    return [
        GammaClipLoss(
            10,
            shape=2.0,
            ema=0.3,
            update="after",
            generator=torch.Generator().manual_seed(7),
            backend=backend,
        ),
        SogCLRLoss(10, ema=0.5, update="before", backend=backend),
        GammaClipLoss(10, rate="batch", backend=backend),
        fixed,
    ]


def _state(mods):
    out = []
    for m in mods:
        for st in (m.image_rate, m.text_rate) if m.rate != "batch" else ():
            out += [st.log_rate.clone(), st.visited.clone(), st.nonfinite.clone()]
    return out


def _gamma_run(mods, fn, steps, first=0):
    results = []
    for k, idx in enumerate(steps, start=first):
        a, c, s = _batch(k)
        loss = fn(a, c, s, torch.tensor(idx))
        grads = torch.autograd.grad(loss, (a, c, s))
        est = [m.global_loss_estimate for m in mods]
        results.append((loss.detach(), *grads, *est))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", cpu_backends())  # triton: under the interpreter
def test_gamma_family_compiled_matches_eager(backend):
    torch._dynamo.reset()
    eager_mods, comp_mods = _gamma_family(backend), _gamma_family(backend)
    # re-assigning the generator registers it for gammacl::draw (the compiled draw needs that)
    comp_mods[0].generator = torch.Generator().manual_seed(7)

    log_w = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64).reshape(2, 5)
    log_r = torch.linspace(0.5, 2.0, 10, dtype=torch.float64).reshape(2, 5)

    def make_step(mods):
        def step(a, c, s, idx):
            fixed_draws = gamma_step_loss(a, c, s, log_w, log_r, one_pass=True, backend=backend)
            return fixed_draws + sum(m(a, c, s, idx) for m in mods)

        return step

    a, c, s = _batch(0)
    explain = torch._dynamo.explain(make_step(_gamma_family(backend)))(a, c, s, torch.arange(5))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1

    compiled = torch.compile(make_step(comp_mods), fullgraph=True)
    torch.manual_seed(11)  # the rate='batch' module draws from the global RNG
    got = _gamma_run(comp_mods, compiled, SCHEDULE[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):  # the state is not guarded on
        got += _gamma_run(comp_mods, compiled, SCHEDULE[1:], first=1)
        torch.manual_seed(11)
        want = _gamma_run(eager_mods, make_step(eager_mods), SCHEDULE)
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            for i, (x, y) in enumerate(zip(g, w, strict=True)):
                assert_close_fp64(x, y, f"{backend} step {k} output {i}")
        # the fp32 rate state after compiled steps equals the eager state bitwise
        for x, y in zip(_state(comp_mods), _state(eager_mods), strict=True):
            assert torch.equal(x, y)
        assert comp_mods[0].last_path == "lse+one_pass"  # compiled update="after" (docstring)
        assert eager_mods[0].last_path == "one_pass"
        assert comp_mods[0].image_rate.visited.all()

        # compiled mode trusts the index on the host: out of range -> NaN loss and gradients,
        # nothing stored (every row counted as non-finite), same graph (no recompile)
        before = _state(comp_mods)
        a, c, s = _batch(9)
        loss = compiled(a, c, s, torch.tensor([0, 1, 2, 3, 10]))
        grads = torch.autograd.grad(loss, (a, c, s))
    assert torch.isnan(loss) and all(torch.isnan(g).all() for g in grads)
    after = _state(comp_mods)
    for i, (x, y) in enumerate(zip(after, before, strict=True)):
        if i % 3 == 2 and i < 12:  # nonfinite counters of the two ema modules
            assert int(x) == int(y) + 5
        else:
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):  # eager still raises
        eager_mods[0](a, c, s, torch.tensor([0, 1, 2, 3, 10]))


def _modality_inputs(k, n=6, d=4):
    g = torch.Generator().manual_seed(200 + k)
    xs = [torch.randn(n, d, dtype=torch.float64, generator=g).requires_grad_() for _ in range(6)]
    s = torch.tensor(3.0 + k, dtype=torch.float64, requires_grad=True)
    t = torch.rand(n, dtype=torch.float64, generator=g)
    return xs, s, t


def _modality_family(backend):
    return [
        M.ModalityContrastiveLoss(inmodal="printed", backend=backend),
        M.FeatureSeparationLoss(0.5, t=1.5, backend=backend),
        M.BrownianBridgeLoss(0.3, t="random", generator=torch.Generator().manual_seed(5)),
        M.BrownianBridgeLoss(0.2, t=0.6),
        M.GeometricConsistencyLoss(0.7, form="cyclip", inmodal_weight=0.25),
        M.GeometricConsistencyLoss(0.1),
    ]


def _modality_step(backend, mods):
    def step(xs, s, t):
        v, tx, va, ta, iv, it = xs
        return (
            M.orthogonality_loss(v, iv, tx, it)
            + M.uniformity_loss(iv, it, t=1.5, backend=backend)
            + M.inmodal_infonce_loss(v, va, s, backend=backend)
            + M.feature_separation_loss(
                v, tx, iv, it, va, ta, s, inmodal="printed", backend=backend
            )
            + M.brownian_bridge_loss(v, tx, va, t)
            + M.geometric_consistency_loss(v, tx, va, ta)
            + M.modality_contrastive_loss(v, tx, va, ta, s, backend=backend)
            + mods[0](v, tx, va, ta, s)
            + mods[1](v, tx, iv, it, va, ta, s)
            + mods[2](v, tx, va)
            + mods[3](v, tx, va)
            + mods[4](v, tx)
            + mods[5](v, tx, va, ta)
        )

    return step


@pytest.mark.slow
@pytest.mark.parametrize("backend", NO_TRITON)
def test_modality_family_compiled_matches_eager(backend):
    torch._dynamo.reset()
    xs, s, t = _modality_inputs(0)
    explain = torch._dynamo.explain(_modality_step(backend, _modality_family(backend)))(xs, s, t)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1

    eager_mods, comp_mods = _modality_family(backend), _modality_family(backend)
    compiled = torch.compile(_modality_step(backend, comp_mods), fullgraph=True)
    eager = _modality_step(backend, eager_mods)
    for k in range(2):  # the random-t module draws a fresh t from its generator each call
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            xs, s, t = _modality_inputs(k)
            got = compiled(xs, s, t)
            got_g = torch.autograd.grad(got, (*xs, s))
        want = eager(xs, s, t)
        want_g = torch.autograd.grad(want, (*xs, s))
        assert_close_fp64(got, want, f"{backend} step {k} loss")
        for i, (x, y) in enumerate(zip(got_g, want_g, strict=True)):
            assert_close_fp64(x, y, f"{backend} step {k} grad {i}")

    # compiled: a per-row t outside [0, 1] gives NaN instead of the eager ValueError
    bad_t = t.clone()
    bad_t[1] = 1.5
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.isnan(compiled(xs, s, bad_t))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        eager(xs, s, bad_t)


def _towers():
    torch.manual_seed(0)
    return torch.nn.Linear(16, 8), torch.nn.Linear(12, 8), torch.randn(10, 16), torch.randn(10, 12)


AUTOCAST_CASES = {
    "gamma_after": lambda b: GammaClipLoss(
        20, update="after", shape=2.0, generator=torch.Generator().manual_seed(1), backend=b
    ),
    "gamma_before": lambda b: GammaClipLoss(
        20, shape=0.5, generator=torch.Generator().manual_seed(1), backend=b
    ),
    "sogclr_after": lambda b: SogCLRLoss(20, update="after", backend=b),
}


@pytest.mark.parametrize("backend", NO_TRITON)
@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_autocast_cpu_bf16_gamma(backend, case):
    """Inside autocast the loss is fp32 and the feature gradients bf16, and the loss equals the
    same loss of the same bf16 features outside autocast (autocast changes nothing inside)."""
    img_tower, txt_tower, x, y = _towers()
    index = torch.arange(3, 13)
    outs = []
    for use_autocast in (True, False):
        mod = AUTOCAST_CASES[case](backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt = img_tower(x), txt_tower(y)
        img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
        scale = torch.tensor(5.0, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            losses = [mod(img, txt, scale, index) for _ in range(2)]  # first visit, then seen
            loss = losses[0] + losses[1]
            grads = torch.autograd.grad(loss, (img, txt, scale))
        assert img.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert grads[0].dtype == grads[1].dtype == torch.bfloat16
        assert grads[2].dtype == torch.float32
        outs.append((loss.detach(), *grads, mod.image_rate.log_rate.clone()))
    for x_ac, x_plain in zip(*outs, strict=True):
        assert torch.equal(x_ac, x_plain)


def test_autocast_cpu_bf16_modality():
    img_tower, txt_tower, x, y = _towers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, t = img_tower(x), txt_tower(y)
        v.retain_grad()
        loss = (
            M.ModalityContrastiveLoss(backend="torch")(v, t, t, v, 4.0)
            + M.FeatureSeparationLoss(backend="torch")(v, t, t, v, v, t, 4.0)
            + M.BrownianBridgeLoss(t="random", generator=torch.Generator().manual_seed(2))(v, t, t)
            + M.GeometricConsistencyLoss()(v, t, t, v)
        )
    assert v.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert v.grad.dtype == torch.bfloat16 and img_tower.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic_repeated_steps_bitwise(backend):
    """With deterministic algorithms on, two identical multi-step runs (rate state included)
    give bitwise-equal losses, gradients and states. B = 40 spans two Triton row blocks."""
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            mods = [
                GammaClipLoss(
                    60,
                    update="after",
                    generator=torch.Generator().manual_seed(3),
                    backend=backend,
                ),
                SogCLRLoss(60, backend=backend),
            ]
            out = []
            for k in range(2):
                a, c, s = _batch(k, b=40, d=8, dtype=torch.float32)
                index = torch.arange(40) + 10 * k
                loss = sum(m(a, c, s, index) for m in mods)
                out += [loss.detach(), *torch.autograd.grad(loss, (a, c, s))]
            runs.append(out + _state(mods))
        for x, y in zip(*runs, strict=True):
            assert torch.equal(x, y)
    finally:
        torch.use_deterministic_algorithms(False)


class _LaunchSpy:
    """Stands in for the Triton kernel object; records each launch's COLS flag."""

    def __init__(self, kernel):
        self.kernel, self.cols = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.cols.append(kwargs["COLS"])
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(
    "backend", [p for p in cpu_backends() if p.id == "triton"]
)  # same skip reason as elsewhere
def test_triton_onepass_deterministic_path(backend, monkeypatch):
    """The decision: atomics (one launch, COLS) by default; under deterministic algorithms
    (warn_only too) two atomic-free launches, whose outputs match the reference."""
    from gammacl.kernels import gamma_onepass as k

    spy = _LaunchSpy(k._gamma_onepass_fwd_kernel)
    monkeypatch.setattr(k, "_gamma_onepass_fwd_kernel", spy)
    a, c = (torch.randn(n, 8, dtype=torch.float64) for n in (37, 40))  # 2 row blocks each way
    s = torch.tensor(2.5, dtype=torch.float64)
    ar, ac = torch.randn(37, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    args = (a, c, s, ar, ac, 0.1, 0.2, 3.0, 2, True)
    want = ref_gamma.gamma_onepass(*args[:-1], upcast=True)
    atomic = k.gamma_onepass_fwd(*args)
    assert spy.cols == [True] and not k.use_deterministic_path()
    for warn_only in (False, True):
        spy.cols.clear()
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        try:
            assert k.use_deterministic_path()
            det = k.gamma_onepass_fwd(*args)
        finally:
            torch.use_deterministic_algorithms(False)
        assert spy.cols == [False, False]
        for i, (x, y, z) in enumerate(zip(det, want, atomic, strict=True)):
            assert_close_fp64(x, y, f"deterministic output {i} vs reference")
            assert_close_fp64(x, z, f"deterministic output {i} vs atomic path")
    # through the op and its autograd: dA = s W @ b, dB = s W^T @ a, dscale = <A, W @ b>
    a2, c2, s2 = (x.clone().requires_grad_() for x in (a, c, s))
    torch.use_deterministic_algorithms(True)
    try:
        neg = gamma_onepass(
            a2, c2, s2, ar, ac, w_row=0.1, w_col=0.2, clamp=3.0, offset=2, backend="triton"
        )[0]
        grads = torch.autograd.grad(neg, (a2, c2, s2))
    finally:
        torch.use_deterministic_algorithms(False)
    want_all = (
        0.1 * want[2].sum() + 0.2 * want[3].sum(),
        s * want[4],
        s * want[5],
        (a * want[4]).sum(),
    )
    for i, (x, y) in enumerate(zip((neg, *grads), want_all, strict=True)):
        assert_close_fp64(x, y, f"deterministic op output {i}")


class _NoWeakref:
    """Stands in for torch 2.11's torch.Generator, which cannot be weak-referenced."""

    __slots__ = ()


def test_generator_registry_holds_unweakrefable_and_drops_unused():
    """gammacl::draw's registry takes generators that cannot be weak-referenced (torch 2.11) and
    drops each one again once only the registry refers to it; a registered generator draws the
    same stream as the generator itself."""
    from gammacl import _random

    stand_in = _NoWeakref()
    key = _random._generator_key(stand_in)
    assert _random._GENERATORS[key] is stand_in
    del stand_in
    g = torch.Generator().manual_seed(11)
    _random._register_generator(g)
    assert key not in _random._GENERATORS and _random._GENERATORS[id(g)] is g
    drawn = _random._draw_op("uniform", 1.0, 6, id(g), torch.device("cpu"), torch.float64)
    expect = torch.rand(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(drawn, expect)
