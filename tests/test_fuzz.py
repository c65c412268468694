"""Differential fuzz test: every public loss on every CPU backend against a materialised float64
oracle written here (not gammacl.reference), on seeded random cases.

Cases (drawn from one seeded torch.Generator per case, so a failure names its seed): N, M != N
for infonce, D in {1, 2..40, 129, 1000}, dtype in {fp64, fp32, bf16, fp16}, non-contiguous
features (row stride > D, or a transposed copy), |l| up to 1e4 (logit_scale 0.01..1e4 on unit
rows), label smoothing, labels / permutations, reduction "none" with random upstream weights,
and NaN / +inf / -inf entries in one feature row (CLIP, InfoNCE and SigLIP; the gamma family
gets finite features: its non-finite guard keeps the rate state clean and is test_gamma.py's).

Oracle: the N x M logits l = s * A @ B^T formed in float64 from the (rounded) inputs, then
F.cross_entropy (CLIP / InfoNCE, open_clip's formula), -logsigmoid(z * (l + bias)) (SigLIP) or
the gamma M-step expression of docs/math.md (exp(l_ij + alpha_i) over negatives, exponent capped
at `clamp` in value for the one-pass path; GammaClipLoss / SogCLRLoss: the value is the module's
estimate of G from the rates used, the gradient the M-step surrogate's), differentiated by
autograd.

Tolerance rule (tests/tolerances.py): the finite / non-finite pattern of the value and of every
gradient must equal the oracle's. On the finite entries: fp64 inputs within rtol 1e-9 (+ atol
1e-12); lower precision within 2 x the error of the same oracle evaluated in fp32 ("PyTorch's own
error": the materialised formula in the accumulation dtype from the same rounded inputs) plus
(TOL[dtype] + 2 eps32 max|l|) x max|oracle| plus ATOL[dtype]; the max|l| term is the LSE
form's floor: r = l_max + log k is rounded to ulp(|l|), so with ties at |l| ~ 1e3..1e4 every
softmax weight carries a relative error ~ulp(|l|) that a shifted materialised softmax avoids.
SigLIP's d logit_scale on 16-bit inputs may also be off by 2 eps16 sum_ij |W_ij S_ij| / M: its
fused paths round W to 16 bits before <A, W B>, which cancels (tests/tolerances.py).

The default run draws one case per loss and backend; `-m slow` draws 13 more, and
`-m emu` runs the default cases on the CUDA backend's source under the emulator.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from tolerances import ATOL, ATOL_FP64, RTOL_FP64, TOL, _err

import gammacl
from gammacl.gamma import draw_log_weights, gamma_step_loss

BACKENDS = [*cpu_backends(include_cuda_emu=False), "reference"]
EMU = [p for p in cpu_backends() if p.id == "cuda-emu"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GAMMA = ("gamma_step", "SogCLR", "Gamma")
LOSSES = ["clip", "infonce", "ClipLoss", "siglip", "SigLipLoss", *GAMMA]


# ------------------------------------------------------------------------------------------------
# case generation
def _draw(seed: int, kind: str) -> dict:
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    d = pick([1, int(torch.randint(2, 41, (1,), generator=g)), 129, 1000])
    n = int(torch.randint(2 if kind in GAMMA else 1, 24, (1,), generator=g))
    m = n if kind != "infonce" else int(torch.randint(1, 24, (1,), generator=g))
    return {
        "seed": seed,
        "n": n,
        "m": m,
        "d": d,
        "dtype": pick(DTYPES),
        "layout": pick(["contiguous", "row-stride", "transposed"]),
        "scale": math.exp(uniform(math.log(0.01), math.log(1e4))),
        "smoothing": pick([0.0, 0.0, 0.1, 1.0]),
        "labels": pick([False, True]),
        "reduction": pick(["mean", "sum", "none"]),
        # the gamma family: finite features (its non-finite guard is test_gamma.py's)
        "bad": None if kind in GAMMA else pick([None, None, float("nan"), float("inf"), -math.inf]),
        "bad_side": pick([0, 1]),
        "bias": uniform(-10.0, 2.0),
        "one_pass": pick([False, True]),
        "clamp": pick([30.0, 1.0]),
    }


def _features(c: dict, g: torch.Generator):
    def one(rows):
        x = F.normalize(torch.randn(rows, c["d"], generator=g, dtype=torch.float64), dim=1)
        x = x.to(c["dtype"])
        if c["layout"] == "row-stride":  # row stride D + 3
            wide = torch.zeros(rows, c["d"] + 3, dtype=c["dtype"])
            wide[:, 1 : c["d"] + 1] = x
            return wide[:, 1 : c["d"] + 1]
        if c["layout"] == "transposed":  # column-major storage
            return x.t().contiguous().t()
        return x

    a, b = one(c["m"]), one(c["n"])
    if c["bad"] is not None:
        x = a if c["bad_side"] == 0 else b
        row = int(torch.randint(x.shape[0], (1,), generator=g))
        x[row, int(torch.randint(c["d"], (1,), generator=g))] = c["bad"]
    return a, b


# ------------------------------------------------------------------------------------------------
# the losses (ours) and the materialised oracles; each returns a 0-d loss
def _ce(l, labels, eps):
    return F.cross_entropy(l, labels, reduction="none", label_smoothing=eps)


def _reduce(per, c, w):
    if c["reduction"] == "none":
        return (per * w.to(per.dtype)).sum()
    return per.mean() if c["reduction"] == "mean" else per.sum()


def _gamma_oracle(a, b, s, log_w, log_r, clamp):
    bsz = a.shape[0]
    l = s * a @ b.t()
    neg = l.masked_fill(torch.eye(bsz, dtype=torch.bool), float("-inf"))
    alpha = (log_w - log_r).to(l.dtype) - math.log(bsz - 1)

    def capped(x):  # min(x, clamp) in value, slope 1
        return x if clamp is None else torch.where(x > clamp, x - (x - clamp).detach(), x)

    er = capped(neg + alpha[0][:, None]).exp().sum(1).mean()
    ec = capped(neg + alpha[1][None, :]).exp().sum(0).mean()
    return -torch.diagonal(l).mean() + 0.5 * (er + ec)


def _log_zhat_oracle(a, b, s):
    l = (s * a @ b.t()).detach()
    l = l.masked_fill(torch.eye(a.shape[0], dtype=torch.bool), float("-inf"))
    k = math.log(a.shape[0] - 1)
    return torch.stack([torch.logsumexp(l, 1) - k, torch.logsumexp(l, 0) - k])


def _run(kind, c, a, b, s, extra, backend):
    """Our loss with backend; backend=None: the oracle (a, b, s already float64 / fp32)."""
    labels, w, bias, log_w = extra["labels"], extra["w"], extra["bias"], extra["log_w"]
    eps = c["smoothing"]
    if kind in ("clip", "ClipLoss"):
        if backend is None:
            l = s * a @ b.t()
            lab = torch.arange(a.shape[0]) if labels is None else labels
            inv = torch.argsort(lab)
            e = eps if kind == "clip" else 0.0
            per = 0.5 * (_ce(l, lab, e) + _ce(l.t(), inv, e)[lab])
            return _reduce(per, c, w) if kind == "clip" else per.mean()
        if kind == "ClipLoss":
            return gammacl.ClipLoss(backend=backend)(a, b, s, bias)
        per = gammacl.clip_loss(
            a, b, s, labels=labels, reduction="none", label_smoothing=eps, backend=backend
        )
        return _reduce(per, c, w)
    if kind == "infonce":
        if backend is None:
            lab = torch.arange(a.shape[0]) if labels is None else labels
            return _reduce(_ce(s * a @ b.t(), lab, eps), c, w)
        per = gammacl.infonce_loss(
            a, b, s, labels=labels, reduction="none", label_smoothing=eps, backend=backend
        )
        return _reduce(per, c, w)
    if kind in ("siglip", "SigLipLoss"):
        if backend is None:
            l = s * a @ b.t() + bias
            z = 2 * torch.eye(a.shape[0], b.shape[0], dtype=l.dtype) - 1
            return -F.logsigmoid(z * l).sum() / a.shape[0]
        if kind == "SigLipLoss":
            return gammacl.SigLipLoss(backend=backend)(a, b, s, bias)
        return gammacl.siglip_loss(a, b, s, bias, backend=backend)
    # the gamma family: fixed draws log_w; rates = this batch's log Zhat (a first step) or given
    one = c["one_pass"]
    if kind == "gamma_step":
        log_r = extra["log_r"]
        if backend is None:
            return _gamma_oracle(a, b, s, log_w, log_r, c["clamp"] if one else None)
        return gamma_step_loss(
            a, b, s, log_w, log_r, one_pass=one, clamp=c["clamp"], backend=backend
        )
    index = torch.arange(a.shape[0])
    if backend is None:  # first step, update "before": the rates are this batch's log Zhat;
        # the module's value is its estimate of G, 1/2 sum_d mean log R_d - mean_i l_ii, and its
        # gradient the M-step surrogate's
        log_r = _log_zhat_oracle(a, b, s)
        surrogate = _gamma_oracle(a, b, s, log_w, log_r, None)
        estimate = 0.5 * log_r.mean(1).sum() - torch.diagonal(s * a @ b.t()).mean()
        return (surrogate - surrogate.detach()) + estimate.detach()
    if kind == "SogCLR":
        return gammacl.SogCLRLoss(a.shape[0], backend=backend)(a, b, s, index)
    mod = gammacl.GammaClipLoss(
        a.shape[0], shape=3.0, generator=torch.Generator().manual_seed(c["seed"]), backend=backend
    )
    return mod(a, b, s, index)


def _extra(kind, c, g):
    m, n = c["m"], c["n"]
    labels = None
    if c["labels"] and kind == "infonce":
        labels = torch.randint(n, (m,), generator=g)
    elif c["labels"] and kind == "clip":
        labels = torch.randperm(n, generator=g)
    if kind == "infonce" and labels is None and m > n:
        labels = torch.randint(n, (m,), generator=g)
    log_w = torch.zeros(2, n)
    if kind == "Gamma":
        log_w = draw_log_weights(3.0, n, generator=torch.Generator().manual_seed(c["seed"]))
    elif kind == "gamma_step":
        log_w = torch.randn(2, n, generator=g)
    return {
        "labels": labels,
        "w": 0.5 + torch.rand(m, generator=g),
        "bias": torch.tensor(c["bias"]),
        "log_w": log_w.double(),
        "log_r": torch.randn(2, n, generator=g).double(),  # noise around log Zhat (_check_case)
    }


def _value_and_grads(fn, xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


# ------------------------------------------------------------------------------------------------
def _compare(got, ref64, same, dtype, max_logit, what, extra_abs=0.0):
    assert got.shape == ref64.shape, what
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), fin), (
        f"{what}: finite pattern {torch.isfinite(got).tolist()} != oracle {fin.tolist()}"
    )
    if not fin.any():
        return
    x, y = got[fin].double(), ref64[fin]
    if dtype == torch.float64:
        torch.testing.assert_close(
            x, y, rtol=RTOL_FP64, atol=ATOL_FP64, msg=lambda e: f"{what}: {e}"
        )
        return
    top = float(y.abs().max())
    # + the LSE floor: an LSE r = l_max + log k is rounded to ulp(|l|), so every softmax weight
    # exp(l - r) carries a relative error up to ~2 eps32 max|l| (ties at |l| ~ 1e3..1e4)
    floor = 2.0 * torch.finfo(torch.float32).eps * max_logit
    bound = 2.0 * _err(same[fin], y) + (TOL[dtype] + floor) * top + ATOL[dtype] + extra_abs
    err = _err(x, y)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (max|oracle| {top:.3g})"


def _check_case(kind, seed, backend):
    c = _draw(seed, kind)
    dt = c["dtype"]
    g = torch.Generator().manual_seed(seed + 1)
    a, b = _features(c, g)
    extra = _extra(kind, c, g)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    s = torch.tensor(c["scale"], dtype=acc)
    what = f"{kind} {backend} seed={seed} {c}"
    if kind in ("siglip", "SigLipLoss"):
        extra["bias"] = extra["bias"].to(acc)
    xs64 = (a.double(), b.double(), s.double())
    logits = (xs64[2] * xs64[0] @ xs64[1].t()).abs()
    max_logit = float(logits[torch.isfinite(logits)].max()) if torch.isfinite(logits).any() else 0
    if kind == "gamma_step":  # rates near this batch's log Zhat, as the state tracks them
        extra["log_r"] = _log_zhat_oracle(*xs64) + 0.5 * extra["log_r"]
    ours = _value_and_grads(lambda *t: _run(kind, c, *t, extra, backend), (a, b, s))
    e64 = {**extra, "bias": extra["bias"].double()}
    ref64 = _value_and_grads(lambda *t: _run(kind, c, *t, e64, None), xs64)
    e32 = {**extra, "bias": extra["bias"].float(), "log_w": extra["log_w"].float()}
    e32["log_r"] = extra["log_r"].float()
    same = _value_and_grads(
        lambda *t: _run(kind, c, *t, e32, None), (a.float(), b.float(), s.float())
    )
    # SigLIP's fused 16-bit paths form d logit_scale = <A, W B> / M from W rounded to 16 bits
    # (tests/tolerances.py): that costs 2 eps16 of the uncancelled sum sum_ij |W_ij S_ij| / M
    unc = 0.0
    if kind in ("siglip", "SigLipLoss") and dt in (torch.float16, torch.bfloat16):
        s64 = xs64[0] @ xs64[1].t()
        w = torch.sigmoid(
            -(2 * torch.eye(*s64.shape, dtype=s64.dtype) - 1) * (c["scale"] * s64 + c["bias"])
        )
        unc = 2.0 * torch.finfo(dt).eps * float((w * s64.abs()).nansum()) / s64.shape[0]
    for name, x, y, z in zip(("loss", "d_a", "d_b", "d_scale"), ours, ref64, same, strict=True):
        _compare(x, y, z, dt, max_logit, f"{what} {name}", unc if name == "d_scale" else 0.0)


DEFAULT_SEEDS = range(1)
SLOW_SEEDS = range(1, 14)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LOSSES)
def test_fuzz_against_materialised_oracle(kind, backend):
    for seed in DEFAULT_SEEDS:
        _check_case(kind, 1000 * LOSSES.index(kind) + seed, backend)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LOSSES)
def test_fuzz_against_materialised_oracle_many(kind, backend):
    for seed in SLOW_SEEDS:
        _check_case(kind, 1000 * LOSSES.index(kind) + seed, backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", EMU)
@pytest.mark.parametrize("kind", LOSSES)
def test_fuzz_cuda_emu(kind, backend):
    for seed in DEFAULT_SEEDS:
        _check_case(kind, 1000 * LOSSES.index(kind) + seed, backend)
