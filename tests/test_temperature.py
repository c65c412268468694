"""Learnable temperature (temperature="rgcl" / "individual") and the inner-rate schedule of
GammaClipLoss / SogCLRLoss (gammacl.temperature) against float64 formulas written here, and
against LibAUC 2.0.1's GCLoss_v2 where both define the same quantity (skipped without libauc)."""

import math

import pytest
import torch
from conftest import cpu_backends

from gammacl.gamma import GammaClipLoss, SogCLRLoss, draw_log_weights
from gammacl.temperature import scheduled_ema

ALL = cpu_backends()
REL = 1e-6  # the bound (float64 paths agree to ~1e-12)


def _pairs(n, d, seed=0, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(
        img + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1
    )
    return img, txt


def _close(x, y, what):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    err = float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
    assert err <= REL, f"{what}: relative error {err:.2e} > {REL:g}\n{x}\n{y}"


def _neg_lse(l):
    """[2, B] log mean over negatives (rows: image anchors, cols: text anchors), positive out."""
    b = l.shape[0]
    off = l.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
    return torch.stack([off.logsumexp(1), off.logsumexp(0)]) - math.log(b - 1)


def _step(loss, img, txt, s, index):
    """(value, d/dimg, d/dtxt, d/ds) of one forward of `loss`."""
    a, c = (x.clone().requires_grad_() for x in (img, txt))
    sv = s.clone().requires_grad_() if s is not None else None
    out = loss(a, c, sv, index)
    grads = torch.autograd.grad(out, [a, c] + ([sv] if sv is not None else []))
    return (out.detach(), *grads, *([None] if sv is None else []))


# ------------------------------------------------------------------------------------------------
# rgcl: F = tau (G + rho), tau = 1/s; at ema = 1 every quantity is the exact one of the batch
# ------------------------------------------------------------------------------------------------
def _rgcl_formula(img, txt, s, rho, log_w=None):
    """value, d/dimg, d/dtxt and dF/ds of F = tau (G_batch + rho) at ema = 1; with Gamma draws
    log_w [2, B] the gradients weight anchor i's negatives by G_i (q_i = G_i, module docstring of
    gammacl.temperature), the value stays tau (G_batch + rho)."""
    a, c, sv = (x.clone().requires_grad_() for x in (img, txt, s))
    l = sv * a @ c.T
    pos = l.diagonal()
    lse = _neg_lse(l)
    g_batch = 0.5 * (lse - pos).mean(dim=1).sum()
    value = (g_batch + rho) / sv
    if log_w is None:
        return (value.detach(), *torch.autograd.grad(value, (a, c, sv)))
    # the draws' surrogate: 1/2 sum_dir mean_i [G_i Zhat_i / R_i - l_ii], R = Zhat (ema = 1)
    w = log_w.exp()
    sur = 0.5 * (w * torch.exp(lse - lse.detach())).mean(dim=1).sum() - pos.mean()
    ga, gc = torch.autograd.grad(sur, (a, c), retain_graph=True)
    tau = 1.0 / s
    cos = (img @ txt.T).detach()
    p_r = torch.softmax(l.detach().masked_fill(torch.eye(len(img), dtype=torch.bool), -1e300), 1)
    p_c = torch.softmax(l.detach().masked_fill(torch.eye(len(img), dtype=torch.bool), -1e300), 0)
    h_r = (p_r * cos).sum(1) - cos.diagonal()
    h_c = (p_c * cos).sum(0) - cos.diagonal()
    dgds = 0.5 * ((w[0] * h_r).mean() + (w[1] * h_c).mean())
    ds = -tau * tau * (g_batch.detach() + rho) + tau * dgds
    return value.detach(), tau * ga, tau * gc, ds


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("b", [5, 33])
def test_rgcl_sogclr_matches_formula_at_ema_one(backend, b):
    img, txt = _pairs(b, 7, seed=b)
    s, rho = torch.tensor(12.0, dtype=torch.float64), 0.7
    loss = SogCLRLoss(40, ema=1.0, backend=backend, temperature="rgcl", rho=rho)
    idx = torch.arange(b)
    got = _step(loss, img, txt, s, idx)
    want = _rgcl_formula(img, txt, s, rho)
    for what, x, y in zip(("value", "d/dimage", "d/dtext", "dF/ds"), got, want, strict=True):
        _close(x, y, f"{backend} B={b} {what}")
    # a second step on the same rows (ema = 1: the state is this batch's estimate again)
    got2 = _step(loss, img.flip(0), txt.flip(0), s * 0.5, idx)
    want2 = _rgcl_formula(img.flip(0), txt.flip(0), s * 0.5, rho)
    for what, x, y in zip(("value", "d/dimage", "d/dtext", "dF/ds"), got2, want2, strict=True):
        _close(x, y, f"{backend} B={b} step 2 {what}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("update", ["before", "after"])
def test_rgcl_gamma_matches_formula_at_ema_one(backend, update):
    b = 9
    img, txt = _pairs(b, 5, seed=3)
    s, rho = torch.tensor(8.0, dtype=torch.float64), 1.5
    gen = torch.Generator().manual_seed(11)
    kw = {"shape": 2.0, "ema": 1.0, "backend": backend, "update": update, "clamp": 60.0}
    loss = GammaClipLoss(30, generator=gen, temperature="rgcl", rho=rho, **kw)
    log_w = draw_log_weights(2.0, b, generator=torch.Generator().manual_seed(11)).double()
    idx = torch.arange(b) * 3
    got = _step(loss, img, txt, s, idx)
    want = _rgcl_formula(img, txt, s, rho, log_w)
    for what, x, y in zip(("value", "d/dimage", "d/dtext", "dF/ds"), got, want, strict=True):
        _close(x, y, f"{backend} {update} {what}")
    # features: tau x the "input" mode's gradient with the same draws
    ref = GammaClipLoss(30, generator=torch.Generator().manual_seed(11), **kw)
    inp = _step(ref, img, txt, s, idx)
    _close(got[1], inp[1] / s, "tau x input-mode d/dimage")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rgcl_stale_rate_scale_gradient_is_fastclip_v3(backend):
    """ema < 1, second visit: R != Zhat, so the positive's coefficient in dF/ds is
    q_i = Zhat_i / R_i (FastCLIP-v3's estimator), not 1: dF/ds = -tau^2 (Ghat + rho) + tau 1/2
    sum_dir mean_i sum_{j != i} w_ij (c_ij - c_ii), w_ij = e^{l_ij} / ((B - 1) R_i)."""
    b, rho, ema = 7, 0.4, 0.3
    img, txt = _pairs(b, 6, seed=5)
    s = torch.tensor(9.0, dtype=torch.float64)
    loss = SogCLRLoss(b, ema=ema, backend=backend, temperature="rgcl", rho=rho)
    idx = torch.arange(b)
    _step(loss, txt, img, s * 1.3, idx)  # first visit: R = another batch's Zhat
    log_r_old = torch.stack([loss.image_rate.log_rate, loss.text_rate.log_rate]).double()
    value, _, _, ds = _step(loss, img, txt, s, idx)
    cos = img @ txt.T
    l = s * cos
    log_r = torch.logaddexp(log_r_old + math.log1p(-ema), _neg_lse(l) + math.log(ema))
    off = ~torch.eye(b, dtype=torch.bool)
    w_r = torch.exp(l - log_r[0][:, None]) * off / (b - 1)
    w_c = torch.exp(l - log_r[1][None, :]) * off / (b - 1)
    h = cos - cos.diagonal()[:, None]
    h_t = cos - cos.diagonal()[None, :]
    ghat = 0.5 * (log_r - l.diagonal()).mean(dim=1).sum()
    tau = 1.0 / s
    want = -tau * tau * (ghat + rho) + tau * 0.5 * (
        (w_r * h).sum(1).mean() + (w_c * h_t).sum(0).mean()
    )
    _close(value, tau * (ghat + rho), "value tau (Ghat + rho)")
    _close(ds, want, "dF/ds with stale rates")


# ------------------------------------------------------------------------------------------------
# the inner-rate schedule (LibAUC's adjust_gamma)
# ------------------------------------------------------------------------------------------------
def _adjust_gamma(schedule, gamma_min, decay, epoch):
    if schedule == "constant":
        return 1.0 if epoch == 0 else gamma_min
    if epoch < decay:
        return (1 - gamma_min) * 0.5 * (1 + math.cos(math.pi * epoch / decay)) + gamma_min
    return gamma_min


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_equals_adjust_gamma_every_epoch(schedule):
    loss = SogCLRLoss(10, ema=0.2, ema_schedule=schedule, ema_decay_epochs=5)
    assert loss.ema == 0.2  # the constructor's ema until set_epoch
    for epoch in range(9):
        loss.set_epoch(epoch)
        want = _adjust_gamma(schedule, 0.2, 5, epoch)
        assert loss.ema == pytest.approx(want, rel=1e-15, abs=0), epoch
        assert loss.image_rate.ema == loss.text_rate.ema == loss.ema
    assert scheduled_ema("cosine", 0.2, 4, 2) == pytest.approx(0.6)  # 0.2 + 0.8 * (1 + 0) / 2


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_schedule_equals_libauc_adjust_gamma(schedule, capsys):
    contrastive = pytest.importorskip(
        "libauc.losses.contrastive", reason="libauc 2.0.1 not installed"
    )
    theirs = contrastive.GCLoss_v2(
        N=10, gamma=0.3, gamma_schedule=schedule, gamma_decay_epochs=6, tau=0.1
    )
    ours = SogCLRLoss(10, ema=0.3, ema_schedule=schedule, ema_decay_epochs=6)
    for epoch in range(10):
        theirs.adjust_gamma(epoch)
        ours.set_epoch(epoch)
        assert ours.ema == pytest.approx(float(theirs.gamma), rel=1e-15, abs=0), epoch


def test_schedule_drives_the_rate_update_and_survives_checkpoints():
    b = 6
    img, txt = _pairs(b, 4, seed=1)
    idx = torch.arange(b)
    loss = SogCLRLoss(b, ema=0.1, ema_schedule="cosine", ema_decay_epochs=4, backend="torch")
    loss.set_epoch(0)
    loss(img, txt, 5.0, idx)
    loss.set_epoch(2)  # ema = 0.55
    old = loss.image_rate.log_rate.clone().double()
    loss(txt, img, 5.0, idx)
    lz = _neg_lse(5.0 * txt @ img.T)[0]
    want = torch.logaddexp(old + math.log(0.45), lz + math.log(0.55))
    _close(loss.image_rate.log_rate, want, "rate after set_epoch(2)")
    fresh = SogCLRLoss(b, ema=0.1, ema_schedule="cosine", ema_decay_epochs=4, backend="torch")
    fresh.load_state_dict(loss.state_dict())
    assert fresh.epoch == 2 and fresh.ema == loss.ema == pytest.approx(0.55)
    assert fresh.image_rate.ema == pytest.approx(0.55)


# ------------------------------------------------------------------------------------------------
# against LibAUC 2.0.1 GCLoss_v2 where both define the same thing
# ------------------------------------------------------------------------------------------------
def test_rates_and_gradients_agree_with_libauc_gcloss_v2(capsys):
    """LibAUC's u_i = MA of mean_{j != i} e^{(s_ij - s_ii)/tau} (positive excluded by its mask) is
    ours times e^{-l_ii} (log u = log R - l_ii) when the features are the same at both visits;
    its feature gradient is sum_j (not mean_j) of the weighted h_ij's gradient: (B - 1) x our
    rgcl feature gradient on a first visit (R = Zhat)."""
    contrastive = pytest.importorskip(
        "libauc.losses.contrastive", reason="libauc 2.0.1 not installed"
    )
    b, tau, gamma = 8, 0.2, 0.4
    img, txt = (x.float() for x in _pairs(b, 5, seed=7))
    idx = torch.arange(b)
    theirs = contrastive.GCLoss_v2(N=b, tau=tau, gamma=gamma, gamma_schedule="constant")
    ours = SogCLRLoss(b, ema=gamma, backend="torch", temperature="rgcl", rho=0.0)
    s = torch.tensor(1.0 / tau)
    for visit in range(2):
        a1, c1 = (x.clone().requires_grad_() for x in (img, txt))
        their_loss, _ = theirs(a1, c1, idx)
        their_g = torch.autograd.grad(their_loss, (a1, c1))
        _, g_img, g_txt, _ = _step(ours, img, txt, s, idx)
        l_pos = s * (img * txt).sum(1)
        log_u = torch.stack([ours.image_rate.log_rate, ours.text_rate.log_rate]) - l_pos
        their_log_u = torch.cat(
            [theirs.u1[idx].log() + theirs.b1[idx], theirs.u2[idx].log() + theirs.b2[idx]], dim=1
        ).t()
        torch.testing.assert_close(log_u, their_log_u, rtol=1e-5, atol=1e-5)
        if visit == 0:  # R = Zhat: the gradients are the same up to LibAUC's sum over B - 1
            torch.testing.assert_close(g_img, their_g[0] / (b - 1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g_txt, their_g[1] / (b - 1), rtol=1e-5, atol=1e-6)
        theirs.adjust_gamma(1)  # after epoch 0: gamma_min, as our second visit


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": "global"}, "temperature must be one of"),
        ({"temperature": "rgcl", "rho": -1.0}, "rho"),
        ({"tau_min": 0.5, "tau_init": 0.1}, "tau_min <= tau_init"),
        ({"tau_momentum": 0.0}, "tau_momentum"),
        ({"tau_lr": float("nan")}, "tau_lr must be a finite number"),
        ({"ema_schedule": "linear"}, "ema_schedule must be one of"),
        ({"ema_schedule": "cosine"}, "ema_decay_epochs"),
        ({"temperature": "individual", "update": "after"}, "update='before'"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SogCLRLoss(10, **kwargs)


def test_set_epoch_validation_and_unknown_keyword():
    loss = SogCLRLoss(10)
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        loss.set_epoch(-1)
    with pytest.raises(TypeError, match="tau_initial"):
        GammaClipLoss(10, tau_initial=0.1)


# ------------------------------------------------------------------------------------------------
# individual: per-sample temperatures (iSogCLR), at ema = 1
# ------------------------------------------------------------------------------------------------
def _individual_formula(img, txt, tau, mom, rho, lr, beta, lo, hi):
    """value, d/dimg, d/dtxt of F = 1/2 mean_i tau_i (log u_i + rho) + 1/2 mean_j tau'_j (log u'_j
    + rho) at the old temperatures tau [2, B] (R = Zhat), and the new (tau, momentum):
    g_i = log u_i - E_p[h_i] / tau_i + rho, p the softmax over anchor i's negatives."""
    b = img.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    a, c = (x.clone().requires_grad_() for x in (img, txt))
    cos = a @ c.T
    l_r, l_c = cos / tau[0][:, None], cos / tau[1][None, :]
    lse = torch.stack(
        [
            l_r.masked_fill(eye, float("-inf")).logsumexp(1),
            l_c.masked_fill(eye, float("-inf")).logsumexp(0),
        ]
    ) - math.log(b - 1)
    log_u = lse - torch.stack([l_r.diagonal(), l_c.diagonal()])
    value = 0.5 * (tau * (log_u + rho)).mean(dim=1).sum()
    ga, gc = torch.autograd.grad(value, (a, c))
    cosd = cos.detach()
    h_r = cosd - cosd.diagonal()[:, None]  # h_ij = s_ij - s_ii (image anchor i)
    h_c = cosd - cosd.diagonal()[None, :]  # text anchor j: s_ij - s_jj
    p_r = torch.softmax(l_r.detach().masked_fill(eye, float("-inf")), 1)
    p_c = torch.softmax(l_c.detach().masked_fill(eye, float("-inf")), 0)
    e_h = torch.stack([(p_r * h_r).sum(1), (p_c * h_c).sum(0)])
    g = log_u.detach() - e_h / tau + rho
    m = (1 - beta) * mom + beta * g
    return value.detach(), ga, gc, (tau - lr * m).clamp(lo, hi), m


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("b", [6, 21])
def test_individual_two_steps_match_formula_at_ema_one(backend, b):
    n, rho, lr, beta, lo, hi = 3 * b, 0.8, 0.05, 0.7, 0.05, 0.3
    img, txt = _pairs(b, 5, seed=b + 1)
    loss = SogCLRLoss(
        n,
        ema=1.0,
        backend=backend,
        temperature="individual",
        rho=rho,
        tau_lr=lr,
        tau_momentum=beta,
        tau_init=0.1,
        tau_min=lo,
        tau_max=hi,
    )
    idx = torch.arange(b) * 3 + 1
    g = torch.Generator().manual_seed(b)
    with torch.no_grad():  # temperatures that differ by row (and one at each bound)
        loss.image_tau[idx] = 0.06 + 0.2 * torch.rand(b, generator=g)
        loss.text_tau[idx] = 0.06 + 0.2 * torch.rand(b, generator=g)
        loss.image_tau[idx[0]], loss.text_tau[idx[1]] = lo, hi
    for step, (x, y) in enumerate(((img, txt), (txt.flip(0), img))):
        tau = torch.stack([loss.image_tau[idx], loss.text_tau[idx]]).double()
        mom = torch.stack([loss.image_tau_momentum[idx], loss.text_tau_momentum[idx]]).double()
        want = _individual_formula(x, y, tau, mom, rho, lr, beta, lo, hi)
        value, g_img, g_txt, _ = _step(loss, x, y, None, idx)
        for what, u, v in zip(("value", "d/dimage", "d/dtext"), (value, g_img, g_txt), want):
            _close(u, v, f"{backend} step {step} {what}")
        _close(torch.stack([loss.image_tau[idx], loss.text_tau[idx]]), want[3], f"step {step} tau")
        new_m = torch.stack([loss.image_tau_momentum[idx], loss.text_tau_momentum[idx]])
        _close(new_m, want[4], f"step {step} momentum")
        assert loss.image_tau.dtype == torch.float32
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx] = False
    assert bool((loss.image_tau[untouched] == 0.1).all())
    assert bool((loss.text_tau_momentum[untouched] == 0).all())
    sd = loss.state_dict()
    assert {"image_tau", "text_tau", "image_tau_momentum", "text_tau_momentum"} <= set(sd)


def test_individual_first_visit_equals_libauc_then_stale_rate_formula(capsys):
    """First visit (gamma = 1): our whole iSogCLR step (tau, momentum) equals LibAUC 2.0.1's
    individual_learnable one. Second visit (ema < 1): g_i = log u_i + rho - sum_j w_ij (l_ij -
    l_ii) with the moving-average weights w_ij = e^{l_ij} / ((B - 1) R_i) (LibAUC's grad_tau);
    LibAUC's own second step differs by design once tau moved: its stored u carries
    e^{-s_ii / tau_old}, ours log R at tau_old only (docs/gamma.md)."""
    contrastive = pytest.importorskip(
        "libauc.losses.contrastive", reason="libauc 2.0.1 not installed"
    )
    b, rho, lr, beta, ema = 8, 0.6, 0.02, 0.9, 0.5
    img, txt = (x.float() for x in _pairs(b, 5, seed=9))
    idx = torch.arange(b)
    kw = {"tau_min": 0.01, "tau_max": 1.0, "rho": rho}
    theirs = contrastive.GCLoss_v2(
        N=b, tau=0.2, gamma=ema, temperature_scheme="individual_learnable", eta=lr, beta=beta, **kw
    )
    ours = SogCLRLoss(
        b,
        ema=ema,
        backend="torch",
        temperature="individual",
        tau_init=0.2,
        tau_lr=lr,
        tau_momentum=beta,
        **kw,
    )
    theirs(img.clone().requires_grad_(), txt.clone().requires_grad_(), idx)
    ours(img, txt, None, idx)
    for mine, their in (
        (ours.image_tau, theirs.learnable_tau_img),
        (ours.text_tau, theirs.learnable_tau_txt),
        (ours.image_tau_momentum, theirs.grad_tau_img),
        (ours.text_tau_momentum, theirs.grad_tau_txt),
    ):
        torch.testing.assert_close(mine, their[:, 0], rtol=1e-5, atol=1e-6)
    # second visit, other features: the stale-rate formula in float64
    x, y = txt.double(), img.double()
    tau = torch.stack([ours.image_tau, ours.text_tau]).double()
    mom = torch.stack([ours.image_tau_momentum, ours.text_tau_momentum]).double()
    log_r_old = torch.stack([ours.image_rate.log_rate, ours.text_rate.log_rate]).double()
    ours(txt, img, None, idx)
    cos = x @ y.T
    l_r, l_c = cos / tau[0][:, None], cos / tau[1][None, :]
    log_r = torch.logaddexp(
        log_r_old + math.log1p(-ema),
        torch.stack([_neg_lse(l_r)[0], _neg_lse(l_c)[1]]) + math.log(ema),
    )
    off = ~torch.eye(b, dtype=torch.bool)
    w_r = torch.exp(l_r - log_r[0][:, None]) * off / (b - 1)
    w_c = torch.exp(l_c - log_r[1][None, :]) * off / (b - 1)
    pos = torch.stack([l_r.diagonal(), l_c.diagonal()])
    e_w = torch.stack(
        [(w_r * (l_r - pos[0][:, None])).sum(1), (w_c * (l_c - pos[1][None, :])).sum(0)]
    )
    g = log_r - pos + rho - e_w
    m = (1 - beta) * mom + beta * g
    _close(torch.stack([ours.image_tau_momentum, ours.text_tau_momentum]), m, "momentum")
    _close(torch.stack([ours.image_tau, ours.text_tau]), (tau - lr * m).clamp(0.01, 1.0), "tau")


def test_individual_needs_logit_scale_none():
    loss = SogCLRLoss(10, temperature="individual", backend="torch")
    img, txt = _pairs(4, 3)
    with pytest.raises(ValueError, match="pass logit_scale=None, got float"):
        loss(img, txt, 10.0, torch.arange(4))


# ------------------------------------------------------------------------------------------------
# the integrations call set_epoch each epoch
# ------------------------------------------------------------------------------------------------
def test_open_clip_index_loader_sets_the_epoch():
    from gammacl.integrations import open_clip as oc

    loss = oc.OpenClipSogCLRLoss(8, ema=0.2, ema_schedule="cosine", ema_decay_epochs=2)
    data = torch.utils.data.TensorDataset(torch.arange(8))
    loader = oc.with_index(torch.utils.data.DataLoader(data, batch_size=4), loss)
    emas = []
    for _ in range(3):
        for _batch in loader:
            emas.append(loss.ema)
    assert emas == pytest.approx([1.0, 1.0, 0.6, 0.6, 0.2, 0.2])  # cosine over 2 epochs
    loader.batch_sampler.set_epoch(7)  # a resumed trainer's epoch
    next(iter(loader))
    assert loss.epoch == 7


def test_sentence_transformers_callback_sets_the_epoch():
    st = pytest.importorskip("gammacl.integrations.sentence_transformers")
    pytest.importorskip("transformers.trainer_callback", reason="transformers not installed")
    loss = st.SogCLRMultipleNegativesRankingLoss(
        torch.nn.Identity(), num_samples=8, ema=0.2, ema_schedule="constant"
    )
    cb = loss.checkpoint_callback()
    for epoch, want in ((0.0, 1.0), (1.0, 0.2), (2.0, 0.2)):
        cb.on_epoch_begin(None, type("S", (), {"epoch": epoch})(), None)
        assert loss.gamma.ema == want and loss.gamma.epoch == int(epoch)
