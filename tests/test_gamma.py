"""GammaClipLoss / SogCLRLoss / gamma_step_loss / LogRateState against gammacl.reference.gamma:
backend parity (two-pass and one-pass paths), gradcheck, the rate state (update rule, visits,
duplicates, non-finite guard, checkpoints), the K.4 oracles, and small-batch convergence to the
optimum of the full-data objective."""

import copy
import io
import math

import pytest
import torch
from conftest import cpu_backends
from tolerances import assert_close_dtype, assert_close_fp64

from gammacl.gamma import (
    GammaClipLoss,
    LogRateState,
    SogCLRLoss,
    draw_log_weights,
    gamma_step_loss,
)
from gammacl.reference import gamma as ref

ALL = cpu_backends()


def _pairs(n, d, dtype=torch.float64, seed=0, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(
        img + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1
    )
    return img.to(dtype), txt.to(dtype)


def _leaf(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _grads(loss, xs):
    return [g.detach() for g in torch.autograd.grad(loss, xs)]


def _scale(value, dtype):
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------------------
# the reference itself: its autograd gradient is the decomposable gradient of math.md §A.5
# ------------------------------------------------------------------------------------------------
def test_reference_gradient_is_the_decomposable_gradient():
    b, d, t = 6, 4, 5.0
    img, txt = _pairs(b, d)
    log_w = draw_log_weights(2.0, b, generator=torch.Generator().manual_seed(3)).double()
    log_r = torch.stack(ref.log_zhat(img, txt, t)) + 0.3 * torch.randn(2, b, dtype=torch.float64)
    a, c, s = _leaf(img, txt, torch.tensor(t, dtype=torch.float64))
    grads = _grads(ref.gamma_step_loss(a, c, s, log_w, log_r), (a, c, s))
    l = t * img @ txt.T
    alpha = log_w - log_r - math.log(b - 1)
    dl = (torch.exp(l + alpha[0][:, None]) + torch.exp(l + alpha[1][None, :])) / (2 * b)
    dl.fill_diagonal_(-1.0 / b)
    want = (t * dl @ txt, t * dl.T @ img, (dl * (img @ txt.T)).sum())
    for name, x, y in zip("abs", grads, want, strict=True):
        assert_close_fp64(x, y, f"reference grad {name}")


# ------------------------------------------------------------------------------------------------
# gamma_step_loss (the M-step for given draws and rates) on every backend, both paths
# ------------------------------------------------------------------------------------------------
def _step_case(b, d, dtype, shape, seed=0):
    img, txt = _pairs(b, d, dtype, seed)
    log_w = draw_log_weights(shape, b, generator=torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed + 2)
    lz = torch.stack(ref.log_zhat(img, txt, 6.0))
    log_r = lz + 0.5 * torch.randn(2, b, generator=g, dtype=torch.float64)
    return img, txt, _scale(6.0, dtype), log_w.double(), log_r


def _check_step(ours_fn, ref_kw, img, txt, s, log_w, log_r, dtype, what):
    a, c, sc = _leaf(img, txt, s)
    loss = ours_fn(a, c, sc)
    grads = _grads(loss, (a, c, sc))
    a64, c64, s64 = _leaf(img.double(), txt.double(), s.double())
    r64 = ref.gamma_step_loss(a64, c64, s64, log_w, log_r, **ref_kw)
    g64 = _grads(r64, (a64, c64, s64))
    a2, c2, s2 = _leaf(img, txt, s)
    same = ref.gamma_step_loss(a2, c2, s2, log_w, log_r, upcast=False, **ref_kw)
    gsame = _grads(same, (a2, c2, s2))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_dtype(loss.detach(), r64.detach(), same.detach(), dtype, f"{what} loss")
    for name, x, y, z in zip("abs", grads, g64, gsame, strict=True):
        assert_close_dtype(x, y, z, dtype, f"{what} grad {name}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("one_pass", [False, True], ids=["two_pass", "one_pass"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("size", [(5, 3), (37, 19)], ids=["5x3", "37x19"])
def test_step_loss_parity(backend, one_pass, dtype, shape, size):
    b, d = size
    img, txt, s, log_w, log_r = _step_case(b, d, dtype, shape)
    _check_step(
        lambda a, c, sc: gamma_step_loss(
            a, c, sc, log_w, log_r, one_pass=one_pass, backend=backend
        ),
        {},
        img,
        txt,
        s,
        log_w,
        log_r,
        dtype,
        f"{backend} one_pass={one_pass} a={shape} {size}",
    )


@pytest.mark.parametrize("backend", ALL)
def test_step_loss_one_pass_cap(backend):
    """With the cap biting, the one-pass path matches the reference with the same cap (value
    min(l + alpha, clamp), gradient weight e^{min(l + alpha, clamp)})."""
    img, txt, s, log_w, log_r = _step_case(9, 5, torch.float64, 1.0)
    log_r = log_r - 3.0  # pretend stale (too small) rates: weights up to e^4
    _check_step(
        lambda a, c, sc: gamma_step_loss(
            a, c, sc, log_w, log_r, one_pass=True, clamp=1.0, backend=backend
        ),
        {"clamp": 1.0},
        img,
        txt,
        s,
        log_w,
        log_r,
        torch.float64,
        f"{backend} capped",
    )


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("one_pass", [False, True], ids=["two_pass", "one_pass"])
def test_step_loss_gradcheck(backend, one_pass):
    """float64 gradcheck of the whole step loss with the gamma draws and rates held fixed."""
    img, txt, s, log_w, log_r = _step_case(4, 3, torch.float64, 0.5, seed=4)
    a, c, sc = _leaf(img, txt, torch.tensor(3.0, dtype=torch.float64))
    fn = lambda a, c, sc: gamma_step_loss(
        a, c, sc, log_w, log_r, one_pass=one_pass, backend=backend
    )
    assert torch.autograd.gradcheck(
        fn, (a, c, sc), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=backend == "triton"
    )


# ------------------------------------------------------------------------------------------------
# the module: multi-step runs against the reference step (draws replayed from the same seed)
# ------------------------------------------------------------------------------------------------
# index schedule over n = 10 samples, B = 5: first visits, a mixed batch, a fully seen batch
# (one-pass path under update="after"), and a batch with a duplicated index
SCHEDULE = [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [8, 9, 5, 6, 7], [4, 0, 2, 1, 3], [2, 7, 2, 9, 0]]


def _run_against_reference(make, backend, update, shape, sogclr=False, d=4, steps=SCHEDULE):
    n = 10
    img_all, txt_all = _pairs(n + 3, d)  # extra rows give duplicated indices their own features
    mod = make()
    replay = torch.Generator().manual_seed(7)
    state = tuple((torch.zeros(n), torch.zeros(n, dtype=torch.bool)) for _ in range(2))
    paths = []
    for k, idx in enumerate(steps):
        index = torch.tensor(idx)
        rows = torch.arange(len(idx)) + k % 3  # distinct feature rows per position
        img, txt = img_all[rows], txt_all[rows]
        s = torch.tensor(4.0 + k, dtype=torch.float64)
        a, c, sc = _leaf(img, txt, s)
        loss = mod(a, c, sc, index)
        grads = _grads(loss, (a, c, sc))
        paths.append(mod.last_path)
        log_w = (
            torch.zeros(2, len(idx), dtype=torch.float64)
            if sogclr
            else draw_log_weights(shape, len(idx), generator=replay).double()
        )
        a2, c2, s2 = _leaf(img, txt, s)
        want, state = ref.gamma_clip_step(
            a2,
            c2,
            s2,
            index,
            log_w,
            state,
            ema=mod.ema,
            update=update,
            clamp=mod.clamp if update == "after" else None,
        )
        what = f"{backend} {update} a={shape} step {k}"
        assert_close_fp64(mod.last_surrogate, want, f"{what} surrogate")
        assert torch.equal(loss.detach(), mod.global_loss_estimate)  # the value returned
        for name, x, y in zip("abs", grads, _grads(want, (a2, c2, s2)), strict=True):
            assert_close_fp64(x, y, f"{what} grad {name}")
        for st, (rate, vis) in zip((mod.image_rate, mod.text_rate), state, strict=True):
            assert st.log_rate.dtype == torch.float32 and st.log_rate.device == img.device
            torch.testing.assert_close(st.log_rate, rate, rtol=0, atol=0)
            assert torch.equal(st.visited, vis)
    return paths


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("update", ["before", "after"])
@pytest.mark.parametrize("shape", [0.5, 1.0, 3.0])
def test_gamma_module_matches_reference(backend, update, shape):
    make = lambda: GammaClipLoss(
        10,
        shape=shape,
        ema=0.3,
        update=update,
        generator=torch.Generator().manual_seed(7),
        backend=backend,
    )
    paths = _run_against_reference(make, backend, update, shape)
    if update == "before":
        assert set(paths) == {"two_pass"}
    else:
        assert paths == ["lse+one_pass", "lse+one_pass", "lse+one_pass", "one_pass", "one_pass"]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("update", ["before", "after"])
def test_sogclr_module_matches_reference(backend, update):
    make = lambda: SogCLRLoss(10, ema=0.5, update=update, backend=backend)
    _run_against_reference(make, backend, update, 1.0, sogclr=True)


def test_module_float32_runs_close_to_reference():
    img, txt = _pairs(12, 7, torch.float32)
    mod = GammaClipLoss(
        12, ema=0.2, update="after", backend="torch", generator=torch.Generator().manual_seed(0)
    )
    replay = torch.Generator().manual_seed(0)
    state = tuple((torch.zeros(12), torch.zeros(12, dtype=torch.bool)) for _ in range(2))
    for idx in ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5]):
        index = torch.tensor(idx)
        a, c, sc = _leaf(img[index], txt[index], torch.tensor(10.0))
        loss = mod(a, c, sc, index)
        grads = _grads(loss, (a, c, sc))
        log_w = draw_log_weights(mod.shape, 6, generator=replay).double()
        a2, c2, s2 = _leaf(img[index].double(), txt[index].double(), torch.tensor(10.0).double())
        want, state = ref.gamma_clip_step(
            a2, c2, s2, index, log_w, state, ema=0.2, update="after", clamp=mod.clamp
        )
        assert loss.dtype == torch.float32
        assert_close_dtype(mod.last_surrogate, want.detach(), None, torch.float32, "surrogate")
        for x, y in zip(grads, _grads(want, (a2, c2, s2)), strict=True):
            assert_close_dtype(x, y, None, torch.float32, "grad")
        torch.testing.assert_close(mod.image_rate.log_rate, state[0][0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# K.4 oracles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_ema1_g1_gradient_equals_batch_infonce_without_positive(backend):
    """ema = 1 and G = 1 (SogCLR, update before use): R = Zhat of the batch, so the two-pass
    gradient is that of the batch InfoNCE with the positive left out of the denominator, and the
    loss value is -mean(l_ii) + 1."""
    img_all, txt_all = _pairs(9, 5)
    mod = SogCLRLoss(9, ema=1.0, backend=backend)
    for idx in ([0, 1, 2, 3], [2, 3, 4, 5, 6], [8, 0, 2, 7]):  # revisits included
        index = torch.tensor(idx)
        a, c, sc = _leaf(img_all[index], txt_all[index], torch.tensor(7.0, dtype=torch.float64))
        loss = mod(a, c, sc, index)
        grads = _grads(loss, (a, c, sc))
        a2, c2, s2 = _leaf(a, c, sc)
        want = ref.global_contrastive_loss(a2, c2, s2)
        for name, x, y in zip("abs", grads, _grads(want, (a2, c2, s2)), strict=True):
            assert_close_fp64(x, y, f"grad {name}")
        pos = 7.0 * (a * c).sum(1)
        assert_close_fp64(mod.last_surrogate, 1.0 - pos.mean(), "surrogate value")
        assert_close_fp64(mod.global_loss_estimate, want, "global loss estimate")


@pytest.mark.parametrize("update", ["before", "after"])
def test_frozen_model_log_rate_tends_to_log_z(update):
    """Frozen features and scale: the moving average of the unbiased Zhat settles at the data-set
    partition function, log R -> log Z (closer for smaller ema)."""
    n, b, t = 32, 8, 5.0
    img, txt = _pairs(n, 8, seed=5, noise=0.9)
    l = (t * img @ txt.T).fill_diagonal_(float("-inf"))
    log_z = (torch.logsumexp(l, 1) - math.log(n - 1), torch.logsumexp(l, 0) - math.log(n - 1))
    errs = {}
    for ema in (1.0, 0.05):
        mod = SogCLRLoss(n, ema=ema, update=update, backend="torch")
        g = torch.Generator().manual_seed(1)
        for _ in range(400):  # a training forward (grad enabled; no input needs a grad)
            index = torch.randperm(n, generator=g)[:b]
            mod(img[index], txt[index], t, index)
        errs[ema] = [
            (st.log_rate.double() - lz).abs()
            for st, lz in zip((mod.image_rate, mod.text_rate), log_z, strict=True)
        ]
    for e in errs[0.05]:
        assert e.mean() < 0.12 and e.max() < 0.4, e
    for e in errs[1.0]:  # without averaging the state is just the last batch estimate
        assert e.mean() > 0.3, e


@pytest.mark.slow
def test_small_batch_training_reaches_the_full_objective_optimum():
    """Learn only the logit scale t on fixed features (n = 64) with batch 8: the optimum t* of
    the full-data objective G is known (Newton on the float64 reference). Plain minibatch
    training (the batch estimate of log Z, i.e. SogCLR with ema = 1) converges elsewhere; the
    gamma estimator with the exact rate, or with the moving-average state in either update
    mode, lands near t*."""
    n, b = 64, 8
    img, txt = _pairs(n, 8, seed=123, noise=0.9)
    sim = img @ txt.T

    def log_z(t):
        l = (t * sim).fill_diagonal_(float("-inf"))
        return torch.logsumexp(l, 1) - math.log(n - 1), torch.logsumexp(l, 0) - math.log(n - 1)

    t = torch.tensor(3.0, dtype=torch.float64)
    for _ in range(30):  # Newton on G'(t) = 0 (G is convex in t)
        tt = t.clone().requires_grad_()
        (g1,) = torch.autograd.grad(
            ref.global_contrastive_loss(img, txt, tt), tt, create_graph=True
        )
        (g2,) = torch.autograd.grad(g1, tt)
        t = (t - g1 / g2).detach()
    t_star = float(t)
    assert abs(float(g1.detach())) < 1e-10 and 2.0 < t_star < 5.0

    def train(mod, oracle=False, steps=800, lr=3.0):
        order = torch.Generator().manual_seed(0)
        t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        for k in range(1, steps + 1):
            index = torch.randperm(n, generator=order)[:b]
            if oracle:
                mod.set_log_rates(*(x.float() for x in log_z(t.detach())))
            (gt,) = torch.autograd.grad(mod(img[index], txt[index], t, index), t)
            with torch.no_grad():
                t -= lr / math.sqrt(k) * gt
        return float(t.detach())

    gen = lambda: torch.Generator().manual_seed(1)
    plain = train(SogCLRLoss(n, ema=1.0, backend="torch"))
    exact = train(GammaClipLoss(n, rate="fixed", generator=gen(), backend="torch"), oracle=True)
    before = train(GammaClipLoss(n, ema=0.05, generator=gen(), backend="torch"))
    after = train(GammaClipLoss(n, ema=0.05, update="after", generator=gen(), backend="torch"))
    assert plain - t_star > 0.7, (plain, t_star)
    for name, got in (("exact", exact), ("ema before", before), ("ema after", after)):
        assert abs(got - t_star) < 0.3, (name, got, t_star)


# ------------------------------------------------------------------------------------------------
# rate state: update rule, duplicates, non-finite guard, checkpoints
# ------------------------------------------------------------------------------------------------
def test_state_update_matches_reference_with_duplicates_and_nonfinite():
    st = LogRateState(8, ema=0.25)
    rate, vis = torch.zeros(8), torch.zeros(8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    batches = [
        [1, 2, 3, 1],  # duplicate on a first visit: the last occurrence is stored
        [0, 1, 1, 7, 3, 3, 5, 1],  # "gathered" from several ranks: longer than any batch
        [2, 2, 6, 4],
    ]
    for k, idx in enumerate(batches):
        index = torch.tensor(idx)
        lz = torch.randn(len(idx), generator=g, dtype=torch.float64)
        if k == 1:
            lz[2] = float("nan")  # a later duplicate of 1 is non-finite: the finite one wins
            lz[5] = float("inf")
        if k == 2:
            lz[1] = float("nan")
        got = st.update(index, lz)
        rate, vis, want = ref.update_log_rate(rate, vis, index, lz, 0.25)
        fin = torch.isfinite(lz)
        assert_close_fp64(got[fin], want[fin], f"updated values, batch {k}")
        torch.testing.assert_close(st.log_rate, rate, rtol=0, atol=0)
        assert torch.equal(st.visited, vis)
    assert int(st.nonfinite) == 3
    assert st.log_rate.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("update", ["before", "after"])
def test_nonfinite_features_never_corrupt_the_state(backend, update):
    n, b = 8, 4
    img, txt = _pairs(n, 16)
    mod = GammaClipLoss(
        n, update=update, backend=backend, ema=0.5, generator=torch.Generator().manual_seed(0)
    )
    index = torch.tensor([0, 1, 2, 3])
    mod(img[index], txt[index], 4.0, index)
    mod(img[index], txt[index], 4.0, index)
    before = [(st.log_rate.clone(), st.visited.clone()) for st in (mod.image_rate, mod.text_rate)]
    # NaN in image 1: image anchor 1 and every text anchor but 1 see it; the other image anchors
    # have a valid Zhat and are updated as usual
    bad = img[index].clone()
    bad[1, 0] = float("nan")
    loss = mod(bad, txt[index], 5.0, index)
    assert torch.isnan(loss)
    img_st, txt_st = mod.image_rate, mod.text_rate
    assert img_st.log_rate[1] == before[0][0][1] and txt_st.log_rate[0] == before[1][0][0]
    assert (txt_st.log_rate[[0, 2, 3]] == before[1][0][[0, 2, 3]]).all()
    assert (img_st.log_rate[[0, 2, 3]] != before[0][0][[0, 2, 3]]).all()
    assert torch.isfinite(img_st.log_rate).all() and torch.isfinite(txt_st.log_rate).all()
    assert int(img_st.nonfinite) == 1 and int(txt_st.nonfinite) == b - 1
    # an all-inf batch: nothing stored anywhere, every row counted
    snap = [st.log_rate.clone() for st in (img_st, txt_st)]
    mod(torch.full_like(bad, float("inf")), txt[index], 5.0, index)
    assert torch.equal(img_st.log_rate, snap[0]) and torch.equal(txt_st.log_rate, snap[1])
    assert int(img_st.nonfinite) == 1 + b and int(txt_st.nonfinite) == 2 * b - 1
    # training goes on normally afterwards
    assert torch.isfinite(mod(img[index], txt[index], 5.0, index))


def _steps(mod, img, txt, schedule):
    out = []
    for k, idx in enumerate(schedule):
        index = torch.tensor(idx)
        s = torch.tensor(3.0 + k, dtype=torch.float64)
        mod(img[index], txt[index], s, index)
        out.append(mod.last_surrogate)  # depends on the draws (the returned estimate does not)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["gamma-before", "gamma-after", "sogclr"])
def test_checkpoint_round_trip_restores_training_exactly(kind):
    n = 10
    img, txt = _pairs(n, 6)

    def make(seed):
        if kind == "sogclr":
            return SogCLRLoss(n, ema=0.3, backend="torch")
        return GammaClipLoss(
            n,
            shape=0.5,
            ema=0.3,
            update=kind.split("-")[1],
            generator=torch.Generator().manual_seed(seed),
            backend="torch",
        )

    first, second = SCHEDULE[:3], SCHEDULE[3:] + SCHEDULE[:2]
    mod = make(0)
    _steps(mod, img, txt, first)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    cont = _steps(mod, img, txt, second)
    buf.seek(0)
    fresh = make(99)  # a different seed: the checkpoint restores the generator too
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    resumed = _steps(fresh, img, txt, second)
    assert torch.equal(cont, resumed)
    for a, b in zip(mod.state_dict().values(), fresh.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    keys = set(mod.state_dict())
    assert {
        "image_rate.log_rate",
        "image_rate.visited",
        "text_rate.log_rate",
        "text_rate.visited",
    } <= keys
    with pytest.raises(RuntimeError, match="size mismatch"):
        type(mod)(n + 1).load_state_dict(mod.state_dict())


# ------------------------------------------------------------------------------------------------
# other rates, API, validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_fixed_rates(backend):
    n, b = 9, 5
    img, txt = _pairs(n, 5)
    mod = GammaClipLoss(
        n, rate="fixed", shape=3.0, backend=backend, generator=torch.Generator().manual_seed(2)
    )
    index = torch.tensor([8, 1, 4, 0, 6])
    with pytest.raises(RuntimeError, match="set_log_rates"):
        mod(img[index], txt[index], 4.0, index)
    rates = torch.randn(2, n)
    mod.set_log_rates(rates[0], rates[1])
    a, c, sc = _leaf(img[index], txt[index], torch.tensor(4.0, dtype=torch.float64))
    loss = mod(a, c, sc, index)
    assert mod.last_path == "one_pass"
    log_w = draw_log_weights(3.0, b, generator=torch.Generator().manual_seed(2)).double()
    a2, c2, s2 = _leaf(a, c, sc)
    want = ref.gamma_step_loss(a2, c2, s2, log_w, rates[:, index].double(), clamp=mod.clamp)
    assert_close_fp64(mod.last_surrogate, want, "surrogate")
    for x, y in zip(_grads(loss, (a, c, sc)), _grads(want, (a2, c2, s2)), strict=True):
        assert_close_fp64(x, y, "grad")
    assert torch.equal(mod.image_rate.log_rate, rates[0])  # never updated
    with pytest.raises(ValueError, match="finite"):
        mod.set_log_rates(torch.full((n,), float("nan")), rates[1])
    with pytest.raises(ValueError, match=r"shape \(9,\)"):
        mod.set_log_rates(rates[0][:3], rates[1])
    with pytest.raises(RuntimeError, match="rate='fixed'"):
        GammaClipLoss(n).set_log_rates(rates[0], rates[1])


@pytest.mark.parametrize("backend", ALL)
def test_batch_rate(backend):
    img, txt = _pairs(7, 5)
    mod = GammaClipLoss(
        7, rate="batch", backend=backend, generator=torch.Generator().manual_seed(4)
    )
    assert mod.image_rate is None and len(mod.state_dict()) == 1  # only the generator state
    a, c, sc = _leaf(img, txt, torch.tensor(6.0, dtype=torch.float64))
    out = mod(a, c, sc, None, output_dict=True)
    assert set(out) == {"contrastive_loss"} and mod.last_path == "two_pass"
    log_w = draw_log_weights(mod.shape, 7, generator=torch.Generator().manual_seed(4)).double()
    a2, c2, s2 = _leaf(a, c, sc)
    log_r = torch.stack(ref.log_zhat(img, txt, 6.0))
    want = ref.gamma_step_loss(a2, c2, s2, log_w, log_r)
    assert_close_fp64(mod.last_surrogate, want, "surrogate")
    got = _grads(out["contrastive_loss"], (a, c, sc))
    for x, y in zip(got, _grads(want, (a2, c2, s2)), strict=True):
        assert_close_fp64(x, y, "grad")
    assert_close_fp64(
        mod.global_loss_estimate, ref.global_contrastive_loss(img, txt, 6.0), "estimate"
    )


def test_draws_and_reproducibility():
    for a in (0.5, 1.0, 3.0):
        w = draw_log_weights(a, 100_000, generator=torch.Generator().manual_seed(0)).double().exp()
        assert abs(float(w.mean()) - 1.0) < 0.01, a  # G / a has mean 1
        assert abs(float(w.var()) * a - 1.0) < 0.05, a  # and variance 1 / a
    img, txt = _pairs(10, 4)

    def losses(seed):
        mod = GammaClipLoss(10, backend="torch", generator=torch.Generator().manual_seed(seed))
        return _steps(mod, img, txt, SCHEDULE[:3])

    assert torch.equal(losses(5), losses(5))
    assert not torch.equal(losses(5), losses(6))


def test_update_state_method():
    mod = GammaClipLoss(6, ema=0.5)
    index = torch.tensor([0, 5, 5, 2])  # e.g. gathered from two ranks
    lz = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    mod.update_state(index, lz[0], lz[1])
    assert torch.equal(mod.image_rate.log_rate, torch.tensor([0.1, 0, 0.4, 0, 0, 0.3]))
    assert torch.equal(mod.text_rate.visited, torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        mod.update_state(torch.tensor([6]), lz[0, :1], lz[1, :1])
    with pytest.raises(RuntimeError, match="rate='ema'"):
        GammaClipLoss(6, rate="batch").update_state(index, lz[0], lz[1])


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.arange(6), torch.ones(6), torch.ones(5)), ValueError, "log_zhat_text"),
        ((torch.arange(6), torch.ones(6), torch.ones(6, dtype=torch.long)), TypeError, "text"),
        ((torch.arange(6), torch.ones(5), torch.ones(6)), ValueError, "log_zhat_image"),
        ((torch.tensor([0, 6]), torch.ones(2), torch.ones(2)), ValueError, r"\[0, 5\]"),
    ],
    ids=["short-text", "int-text", "short-image", "range"],
)
def test_update_state_is_atomic(args, err, match):
    """A call that raises writes nothing: neither direction's values, visits nor counters."""
    mod = GammaClipLoss(6, ema=0.5)
    mod.update_state(torch.tensor([1, 3]), torch.tensor([0.5, 0.7]), torch.tensor([0.2, 0.4]))
    before = {k: v.clone() for k, v in mod.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(err, match=match):
        mod.update_state(*args)
    after = mod.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_set_log_rates_is_atomic():
    mod = GammaClipLoss(4, rate="fixed")
    with pytest.raises(ValueError, match="text_log_rate must be finite"):
        mod.set_log_rates(torch.ones(4), torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    assert not mod.image_rate.visited.any() and not mod.image_rate.log_rate.any()
    with pytest.raises(RuntimeError, match="set_log_rates"):
        mod(*_pairs(2, 3), 3.0, torch.tensor([0, 1]))


def test_checkpoint_generator_restored_into_a_module_built_without_one():
    """The docstring's promise: a checkpoint resumes the same draws, also when the loading module
    was constructed with generator=None (it gets a generator in the checkpoint's state)."""
    n = 10
    img, txt = _pairs(n, 6)
    mod = GammaClipLoss(n, shape=0.5, generator=torch.Generator().manual_seed(3), backend="torch")
    _steps(mod, img, txt, SCHEDULE[:2])
    state = copy.deepcopy(mod.state_dict())  # state_dict() holds the live buffers
    cont = _steps(mod, img, txt, SCHEDULE[2:5])
    fresh = GammaClipLoss(n, shape=0.5, backend="torch")
    fresh.load_state_dict(state)
    assert isinstance(fresh.generator, torch.Generator)
    torch.manual_seed(12345)  # the global RNG must not be what the resumed run draws from
    assert torch.equal(_steps(fresh, img, txt, SCHEDULE[2:5]), cont)
    # and a checkpoint without a generator leaves a generator-less module on the global RNG
    plain = GammaClipLoss(n, backend="torch")
    plain.load_state_dict(GammaClipLoss(n).state_dict())
    assert plain.generator is None


def test_meta_index_and_numpy_num_samples():
    np = pytest.importorskip("numpy")
    mod = GammaClipLoss(np.int64(10), backend="torch")
    assert mod.num_samples == 10 and type(mod.num_samples) is int
    img, txt = _pairs(4, 3)
    with pytest.raises(ValueError, match="index is on the meta device"):
        mod(img, txt, 3.0, torch.arange(4, device="meta"))
    with pytest.raises(ValueError, match="index is on the meta device"):
        mod.update_state(torch.arange(4, device="meta"), torch.ones(4), torch.ones(4))
    assert not mod.image_rate.visited.any()
    with pytest.raises(ValueError, match="num_samples"):
        GammaClipLoss(np.float64(10.0))


@pytest.mark.parametrize(
    "index, err, match",
    [
        (torch.tensor([0, 1, 2, 10]), ValueError, r"\[0, 9\].*\[0, 10\]"),
        (torch.tensor([0, -1, 2, 3]), ValueError, r"\[-1, 3\]"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "integer"),
        (torch.tensor([True, False, True, False]), TypeError, "integer"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(4,\)"),
        (torch.tensor([[0, 1], [2, 3]]), ValueError, r"shape \(4,\)"),
        ([0, 1, 2, 3], TypeError, "tensor"),
        (None, TypeError, "tensor"),
    ],
    ids=["too-large", "negative", "float", "bool", "short", "2d", "list", "none"],
)
def test_index_validation(index, err, match):
    img, txt = _pairs(4, 3)
    for mod in (GammaClipLoss(10, backend="torch"), SogCLRLoss(10, update="after")):
        with pytest.raises(err, match=match):
            mod(img, txt, 3.0, index)
        assert not mod.image_rate.visited.any()  # nothing was stored


def test_int32_index_accepted_and_batch_of_one_rejected():
    img, txt = _pairs(4, 3)
    mod = GammaClipLoss(10, backend="torch")
    mod(img, txt, 3.0, torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    assert mod.image_rate.visited.sum() == 4
    with pytest.raises(ValueError, match="at least 2 pairs"):
        mod(img[:1], txt[:1], 3.0, torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        gamma_step_loss(img[:1], txt[:1], 3.0, torch.zeros(2, 1), torch.zeros(2, 1))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"shape": 0.0}, ValueError, "shape"),
        ({"shape": float("nan")}, ValueError, "shape"),
        ({"rate": "queue"}, ValueError, "rate"),
        ({"ema": 0.0}, ValueError, "ema"),
        ({"ema": 1.5}, ValueError, "ema"),
        ({"update": "during"}, ValueError, "update"),
        ({"generator": 3}, TypeError, "generator"),
        ({"backend": "numpy"}, ValueError, "backend"),
        ({"clamp": float("inf")}, ValueError, "clamp"),
    ],
)
def test_constructor_validation(kwargs, err, match):
    kw = {"num_samples": 10, **kwargs}
    with pytest.raises(err, match=match):
        GammaClipLoss(kw.pop("num_samples"), **kw)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("update", ["before", "after"])
def test_nonfinite_text_row_stores_exactly_the_valid_anchors(backend, update):
    """NaN in text 2. Image anchor i needs every text j != i finite: only image anchor 2 (its
    negatives are texts 0, 1, 3) is stored. Text anchor j needs text_j finite: 0, 1, 3 are
    stored, 2 is not. Kills a mask that forgets to leave out the anchor's own positive
    (bad_t.sum() instead of bad_t.sum() - bad_t[i]); NaN only in image rows never sees it."""
    n, b = 8, 4
    img, txt = _pairs(n, 16)
    mod = GammaClipLoss(
        n, update=update, backend=backend, ema=0.5, generator=torch.Generator().manual_seed(0)
    )
    index = torch.tensor([0, 1, 2, 3])
    mod(img[index], txt[index], 4.0, index)
    before = [st.log_rate.clone() for st in (mod.image_rate, mod.text_rate)]
    bad = txt[index].clone()
    bad[2, 3] = float("nan")
    assert torch.isnan(mod(img[index], bad, 5.0, index))
    img_st, txt_st = mod.image_rate, mod.text_rate
    changed_img = img_st.log_rate[index] != before[0][index]
    changed_txt = txt_st.log_rate[index] != before[1][index]
    assert changed_img.tolist() == [False, False, True, False]
    assert changed_txt.tolist() == [True, True, False, True]
    assert int(img_st.nonfinite) == b - 1 and int(txt_st.nonfinite) == 1
    assert torch.isfinite(img_st.log_rate).all() and torch.isfinite(txt_st.log_rate).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL)
def test_all_seen_needs_both_image_and_text_visited(backend):
    """Image anchors all visited while two text anchors are not: the next update-after step must
    take the LSE pass for them ("lse+one_pass"), never the one-pass path on unvisited text
    rates. NaN in image 0 then image 1 stores image {1, 2, 3} then {0, 2, 3}, text {0} then {1}."""
    n = 4
    img, txt = _pairs(n, 16, seed=3)
    mod = GammaClipLoss(
        n, update="after", backend=backend, ema=0.5, generator=torch.Generator().manual_seed(0)
    )
    index = torch.arange(n)
    for k in (0, 1):
        bad = img.clone()
        bad[k, 0] = float("nan")
        mod(bad, txt, 4.0, index)
    assert mod.image_rate.visited.tolist() == [True] * 4
    assert mod.text_rate.visited.tolist() == [True, True, False, False]
    text_before = mod.text_rate.log_rate.clone()
    loss = mod(img, txt, 4.0, index)
    assert mod.last_path == "lse+one_pass"
    assert mod.text_rate.visited.all()
    assert torch.isfinite(loss)
    assert (mod.text_rate.log_rate[2:] != text_before[2:]).all()


def test_default_clamp_bounds_the_one_pass_weights_at_one_over_ema():
    """clamp=None: log(1/ema) for update="after" on EMA rates (docs/experiments.md), 30 (the
    numerical guard) otherwise; an explicit clamp always wins."""
    from gammacl.gamma import DEFAULT_CLAMP

    assert GammaClipLoss(4, update="after", ema=0.5).clamp == pytest.approx(math.log(2.0))
    assert SogCLRLoss(4, update="after", ema=0.25).clamp == pytest.approx(math.log(4.0))
    assert GammaClipLoss(4, update="after", ema=1.0).clamp == DEFAULT_CLAMP
    assert GammaClipLoss(4, update="after", rate="fixed").clamp == DEFAULT_CLAMP
    assert GammaClipLoss(4, update="before").clamp == DEFAULT_CLAMP
    assert GammaClipLoss(4, update="after", clamp=7.0).clamp == 7.0
