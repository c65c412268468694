"""Reference Paper B modality-structure losses (docs/math.md §B.1–B.4), as printed, pairwise.

Each function spells out the printed formula term by term (with the corrections docs/math.md
records) and materialises every N x N (uniformity: N x N x D) quantity on purpose: these are
the ground truth the fused / Gram-form paths in gammacl.modality are tested against, not a fast
path.
`upcast=True` (default) computes in float64; `upcast=False` in the inputs' own dtype ("PyTorch's
own error" for tests/tolerances.py).

Corrections / choices, as in gammacl.modality:
* in-modal InfoNCE (B.1 L_V2V, B.2 L^i_V2V): "cyclip" = CE(scale * z @ z_aug.T, arange), the
  CyCLIP code's form; "printed" = numerator <z_j, z^a_j>, denominator over the NON-augmented
  <z_j, z_k> (k = j included), as B.1 prints it (B.2's numerator <z^i_j, z^i_j> is read as the
  typo for <z^i_j, z^{i,a}_j>).
* Brownian bridge (B.3): the first line, (1/N) sum_j ||z^a_Vj - mu_j||^2 (the paper's closed
  form is wrong).
"""

from __future__ import annotations

import torch

from gammacl.reference.clip import _ce, _dtype, _scale


def _up(x: torch.Tensor, upcast: bool) -> torch.Tensor:
    return x.to(_dtype(x, upcast))


def orthogonality_loss(z_v, zi_v, z_t, zi_t, *, upcast: bool = True) -> torch.Tensor:
    """(1/N) sum_j (<z_Vj, zi_Vj>^2 + <z_Tj, zi_Tj>^2)."""
    z_v, zi_v, z_t, zi_t = (_up(x, upcast) for x in (z_v, zi_v, z_t, zi_t))
    n = z_v.shape[0]
    return (((z_v * zi_v).sum(1)) ** 2 + ((z_t * zi_t).sum(1)) ** 2).sum() / n


def _gaussian_sum(u: torch.Tensor, t) -> torch.Tensor:
    """sum_j sum_k G_t(u_j, u_k), G_t(u, v) = exp(-t ||u - v||^2), from explicit differences."""
    diff = u[:, None, :] - u[None, :, :]
    return torch.exp(-t * (diff * diff).sum(-1)).sum()


def uniformity_loss(zi_v, zi_t, t=2.0, *, upcast: bool = True) -> torch.Tensor:
    """log (1/N) sum_j sum_k [G_t(zi_Vj, zi_Vk) + G_t(zi_Tj, zi_Tk)], j = k included (as
    printed)."""
    zi_v, zi_t = _up(zi_v, upcast), _up(zi_t, upcast)
    n = zi_v.shape[0]
    return torch.log((_gaussian_sum(zi_v, t) + _gaussian_sum(zi_t, t)) / n)


def inmodal_infonce(
    z, z_aug, logit_scale, *, inmodal: str = "cyclip", upcast: bool = True
) -> torch.Tensor:
    """One modality's in-modal InfoNCE (mean over rows), "cyclip" or "printed" form."""
    dt = _dtype(z, upcast)
    z, z_aug = z.to(dt), z_aug.to(dt)
    s = _scale(logit_scale, z, dt)
    n = z.shape[0]
    if inmodal == "cyclip":
        return _ce(s * (z @ z_aug.t()), torch.arange(n, device=z.device), "mean", 0.0)
    if inmodal == "printed":  # -log(e^{num} / sum_k e^{den_k}), the log taken inside
        num = s * (z * z_aug).sum(1)
        den = torch.logsumexp(s * (z @ z.t()), dim=1)
        return (den - num).mean()
    raise ValueError(f"inmodal must be 'cyclip' or 'printed', got {inmodal!r}")


def feature_separation_loss(
    z_v,
    z_t,
    zi_v,
    zi_t,
    zi_v_aug,
    zi_t_aug,
    logit_scale,
    *,
    t=2.0,
    inmodal: str = "cyclip",
    upcast: bool = True,
) -> torch.Tensor:
    """L_Sep = L_Ortho + (L^i_V2V + L^i_T2T) + L^i_Uni, unit weights (B.2)."""
    return (
        orthogonality_loss(z_v, zi_v, z_t, zi_t, upcast=upcast)
        + inmodal_infonce(zi_v, zi_v_aug, logit_scale, inmodal=inmodal, upcast=upcast)
        + inmodal_infonce(zi_t, zi_t_aug, logit_scale, inmodal=inmodal, upcast=upcast)
        + uniformity_loss(zi_v, zi_t, t, upcast=upcast)
    )


def brownian_bridge_loss(z_v, z_t, z_v_aug, t=0.25, *, upcast: bool = True) -> torch.Tensor:
    """(1/N) sum_j ||z^a_Vj - mu_j||^2, mu_j = m_j / ||m_j||, m_j = t_j z_Vj + (1 - t_j) z_Tj."""
    dt = _dtype(z_v, upcast)
    z_v, z_t, z_v_aug = z_v.to(dt), z_t.to(dt), z_v_aug.to(dt)
    n = z_v.shape[0]
    if isinstance(t, torch.Tensor):
        t = t.to(dt).reshape(n, 1)
    m = t * z_v + (1 - t) * z_t
    mu = m / torch.linalg.vector_norm(m, dim=1, keepdim=True)
    return ((z_v_aug - mu) ** 2).sum() / n


def geometric_consistency_loss(
    z_v,
    z_t,
    z_v_aug=None,
    z_t_aug=None,
    *,
    inmodal_weight=1.0,
    crossmodal_weight=1.0,
    upcast: bool = True,
) -> torch.Tensor:
    """L_GC (+ L^a_GC when the augmented pair is given), pairwise as printed in B.4:
        L_GC  = (1/N) sum_jk [ w_x (<V_j,T_k> - <V_k,T_j>)^2 + w_in (<V_j,V_k> - <T_j,T_k>)^2 ]
        L^a_GC = (1/N) sum_jk [(<V_j,V_k> - <Va_j,Va_k>)^2 + (<T_j,T_k> - <Ta_j,Ta_k>)^2]
                 + (1/N) sum_j (<V_j,T_j> - <Va_j,Ta_j>)^2
    (w_x = w_in = 1 is the paper)."""
    dt = _dtype(z_v, upcast)
    v, t = z_v.to(dt), z_t.to(dt)
    n = v.shape[0]
    s_vt, s_vv, s_tt = v @ t.t(), v @ v.t(), t @ t.t()
    loss = (
        crossmodal_weight * ((s_vt - s_vt.t()) ** 2).sum()
        + inmodal_weight * ((s_vv - s_tt) ** 2).sum()
    ) / n
    if z_v_aug is not None:
        va, ta = z_v_aug.to(dt), z_t_aug.to(dt)
        loss = (
            loss
            + (
                ((s_vv - va @ va.t()) ** 2).sum()
                + ((s_tt - ta @ ta.t()) ** 2).sum()
                + (((v * t).sum(1) - (va * ta).sum(1)) ** 2).sum()
            )
            / n
        )
    return loss


def cyclip_cyclic_losses(image_embeds, text_embeds, logit_scale, *, upcast: bool = True):
    """CyCLIP src/train.py get_loss, verbatim in form: (inmodal_cyclic, crossmodal_cyclic) with
    s = logit_scale (already exponentiated) and B the batch size."""
    dt = _dtype(image_embeds, upcast)
    i, t = image_embeds.to(dt), text_embeds.to(dt)
    s = _scale(logit_scale, i, dt)
    b = i.shape[0]
    logits_image_per_image = s * i @ i.t()
    logits_text_per_text = s * t @ t.t()
    inmodal_cyclic = (logits_image_per_image - logits_text_per_text).square().mean() / (s * s) * b
    logits_text_per_image = s * i @ t.t()
    logits_image_per_text = s * t @ i.t()
    crossmodal_cyclic = (
        (logits_text_per_image - logits_image_per_text).square().mean() / (s * s) * b
    )
    return inmodal_cyclic, crossmodal_cyclic


def modality_contrastive_loss(
    z_v, z_t, z_v_aug, z_t_aug, logit_scale, *, inmodal: str = "cyclip", upcast: bool = True
) -> torch.Tensor:
    """L_Con = (L_V2T + L_T2V + L_V2V + L_T2T) / 4 (B.1), every matrix materialised."""
    dt = _dtype(z_v, upcast)
    v, t = z_v.to(dt), z_t.to(dt)
    s = _scale(logit_scale, v, dt)
    target = torch.arange(v.shape[0], device=v.device)
    v2t = _ce(s * (v @ t.t()), target, "mean", 0.0)
    t2v = _ce(s * (t @ v.t()), target, "mean", 0.0)
    v2v = inmodal_infonce(z_v, z_v_aug, logit_scale, inmodal=inmodal, upcast=upcast)
    t2t = inmodal_infonce(z_t, z_t_aug, logit_scale, inmodal=inmodal, upcast=upcast)
    return 0.25 * (v2t + t2v + v2v + t2t)


def brownian_bridge_closed_form(z_v, z_t, z_v_aug, t=0.25) -> torch.Tensor:
    """docs/math.md B.3's corrected closed form for unit vectors (a cross-check of the first line):
    ||z^a - mu||^2 = 2 - 2 (t<z_V,z^a> + (1-t)<z_T,z^a>) / sqrt(t^2 + (1-t)^2 + 2t(1-t)<V,T>)."""
    v, tt, a = (x.double() for x in (z_v, z_t, z_v_aug))
    num = t * (v * a).sum(1) + (1 - t) * (tt * a).sum(1)
    den = torch.sqrt(t * t + (1 - t) ** 2 + 2 * t * (1 - t) * (v * tt).sum(1))
    return (2 - 2 * num / den).mean()


__all__ = [
    "brownian_bridge_closed_form",
    "brownian_bridge_loss",
    "cyclip_cyclic_losses",
    "feature_separation_loss",
    "geometric_consistency_loss",
    "inmodal_infonce",
    "modality_contrastive_loss",
    "orthogonality_loss",
    "uniformity_loss",
]
