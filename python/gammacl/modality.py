"""Paper B's modality-structure regularisers (docs/math.md §B.1–B.7), O(N*D) memory each.

Notation: z_v, z_t [N, D] image / text features, z_*_aug the features of augmented inputs,
zi_* the "independent" features of extra projection heads, s = logit_scale (exponentiated).
Every loss returns a 0-d tensor in the accumulation dtype (fp64 for fp64 inputs, else fp32).

Where an N x N quantity appears it goes through the one simlse op (gammacl.ops.simlse), so the
torch / cpp / triton / cuda backends all apply and no N x N buffer is formed:

* in-modal InfoNCE and the base loss: gammacl.clip.infonce_rows / clip_pairs.
* uniformity: G_t(u, v) = exp(-t ||u - v||^2) = exp(2t (<u, v> - ||u||^2/2 - ||v||^2/2)) for any
  u, v. With h_j = -||u_j||^2 / 2 and the augmented rows
      a_j = [u_j, h_j, 1],  b_k = [u_k, 1, h_k]      =>  2t <a_j, b_k> = -t ||u_j - u_k||^2
  exactly, so sum_k G_t(u_j, u_k) = exp(row_lse_j) of simlse(a, b, scale=2t). One global
  normaliser over both modalities: L = LSE(cat(row_V, row_T)) - log N. For fp16/bf16 inputs h
  is carried as an unevaluated sum hi + lo of two half-precision columns (D + 4 instead of
  D + 2) so the cancellation <u_j,u_k> + h_j + h_k keeps ~16 bits of h. Autograd reaches u
  through the augmentation: O(N*D) on top of simlse's 4 GEMMs of N * N * (D + 2).
* geometric consistency needs no N x N at all: with d x d Grams C_XY = X^T Y (B.7),
      sum_jk (<V_j,T_k> - <V_k,T_j>)^2 = 2 <C_VV, C_TT>_F - 2 tr(C_TV C_TV)
      sum_jk (<V_j,V_k> - <T_j,T_k>)^2 = ||C_VV||^2 + ||C_TT||^2 - 2 ||C_VT||^2
  (both from ||X Y^T||_F^2 = <C_XX, C_YY>_F and tr(V T^T V T^T) = tr(C_TV C_TV)), and likewise
  for the augmented term. FLOPs: forward 3 Grams (2 N D^2 each; 7 with the augmented pair);
  backward one GEMM per symmetric Gram (d(X^T X) -> X (G + G^T)) and two per cross Gram:
  7 N D^2-GEMMs in all (17 with the augmented pair) against 2 N^2 D for ONE N x N product.
  The Grams are formed in the accumulation dtype (fp32 for half inputs; the cancellation
  between terms needs it). Relative error of the loss ~ eps_acc * (||C_VV||^2 + ||C_TT||^2) /
  (N * L): the Gram form is exact algebra but cancels when L is tiny next to the Grams.
Autocast is switched off inside every loss (forward and the Gram backward), so a user's autocast
region never recasts these GEMMs to bf16/fp16.
torch.compile(fullgraph=True): every loss and module traces without a graph break or host sync
(the per-row t range check of brownian_bridge_loss is eager-only; compiled, an out-of-range t
gives a NaN loss; BrownianBridgeLoss's random t is drawn by the opaque op gammacl::draw).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import nn

from gammacl import _validate as V
from gammacl._random import _draw_op, _GeneratorAttr
from gammacl.clip import _pos_logits, clip_pairs, infonce_rows, no_autocast
from gammacl.dispatch import resolve_traced as _resolve_backend
from gammacl.ops.simlse import simlse

INMODAL_FORMS = ("cyclip", "printed")
GC_FORMS = ("paper", "cyclip")
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_group(named: list[tuple[str, torch.Tensor]]) -> None:
    """All tensors [N, D] with one N, one D, one dtype, one device (messages name the pair)."""
    first_name, first = named[0]
    V.check_features(first_name, first)
    for name, x in named[1:]:
        V.check_pair(first_name, first, name, x, same_batch=True)


def _check_bridge_t(t: object, like: torch.Tensor) -> float | torch.Tensor:
    """t: a number in [0, 1], or a per-row tensor [N] / [N, 1] with values in [0, 1] (one host
    sync for the range check, only when a tensor is passed in eager mode; under torch.compile
    no sync: a value outside [0, 1] or NaN becomes NaN, so the loss is NaN)."""
    n = like.shape[0]
    if isinstance(t, torch.Tensor):
        if not t.dtype.is_floating_point:
            raise TypeError(f"t must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) not in ((n,), (n, 1)):
            raise ValueError(
                f"a per-row t must have shape ({n},) or ({n}, 1), got {tuple(t.shape)}"
            )
        if t.device != like.device:
            raise ValueError(f"t is on {t.device} but the features are on {like.device}")
        if torch.compiler.is_compiling():
            t = torch.where((t >= 0) & (t <= 1), t, float("nan"))
        else:
            lo, hi = torch.aminmax(t.detach())
            if not (bool(lo >= 0) and bool(hi <= 1)):  # also false for NaN
                raise ValueError(f"t must lie in [0, 1], got values in [{float(lo)}, {float(hi)}]")
        return t.reshape(n, 1).to(V.acc_dtype(like.dtype))
    if isinstance(t, bool) or not isinstance(t, Real):
        raise TypeError(f"t must be a float in [0, 1] or a per-row tensor, got {type(t).__name__}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return float(t)


def _check_aug_pair(z_v_aug, z_t_aug) -> bool:
    if (z_v_aug is None) != (z_t_aug is None):
        given, missing = ("z_v_aug", "z_t_aug") if z_t_aug is None else ("z_t_aug", "z_v_aug")
        raise ValueError(
            f"the augmented term needs both augmented features: {given} was given but {missing} "
            "is None (pass both, or neither for L_GC alone)"
        )
    return z_v_aug is not None


# ---------------------------------------------------------------------------------------------
# kernels of the losses (validated inputs)
# ---------------------------------------------------------------------------------------------


def _fp32_region(fn):
    """Runs fn with autocast off (on its first argument's device): the Grams and statistics
    stay in the accumulation dtype even inside a user's autocast region."""

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with no_autocast(x):
            return fn(x, *args, **kwargs)

    return wrapper


@_fp32_region
def _gaussian_lse_rows(u: torch.Tensor, t: float, backend: str) -> torch.Tensor:
    """row_j = log sum_k exp(-t ||u_j - u_k||^2) through simlse (module docstring)."""
    acc = V.acc_dtype(u.dtype)
    h = -0.5 * u.to(acc).square().sum(dim=1, keepdim=True)  # [N, 1]
    one = torch.ones_like(h, dtype=u.dtype)
    if u.dtype in _HALF:
        hi = h.to(u.dtype)
        lo = (h - hi.to(acc)).to(u.dtype)  # hi + lo == h to ~16 bits; d(hi + lo)/dh = 1
        a = torch.cat([u, hi, lo, one, one], dim=1)
        b = torch.cat([u, one, one, hi, lo], dim=1)
    else:
        a = torch.cat([u, h, one], dim=1)
        b = torch.cat([u, one, h], dim=1)
    scale = torch.tensor(2.0 * t, dtype=acc, device=u.device)
    row, _ = simlse(a, b, scale, cols=False, backend=backend)
    return row


@_fp32_region
def _inmodal_rows(
    z: torch.Tensor, z_aug: torch.Tensor, scale: torch.Tensor, inmodal: str, backend: str
) -> torch.Tensor:
    """Per-row in-modal InfoNCE: "cyclip" LSE_k s<z_j, za_k> - s<z_j, za_j>;
    "printed" LSE_k s<z_j, z_k> - s<z_j, za_j> (B.1 as printed)."""
    if inmodal == "cyclip":
        return infonce_rows(z, z_aug, scale, backend=backend)
    row, _ = simlse(z, z, scale, cols=False, backend=backend)
    return row - _pos_logits(z, z_aug, scale)


class _SymGram(torch.autograd.Function):
    """C = X^T X (d x d); dX = X (G + G^T): one N*D^2 GEMM each way (autograd's mm takes two)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.t() @ x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        with no_autocast(x):  # a backward called inside autocast must not recast the GEMM
            return x @ (g + g.t())


class _CrossGram(torch.autograd.Function):
    """C = X^T Y (d x d); dX = Y G^T, dY = X G: two N*D^2 GEMMs in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        return x.t() @ y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, y = ctx.saved_tensors
        with no_autocast(x):
            dx = y @ g.t() if ctx.needs_input_grad[0] else None
            dy = x @ g if ctx.needs_input_grad[1] else None
        return dx, dy


def _fro2(c: torch.Tensor) -> torch.Tensor:
    return c.square().sum()


@_fp32_region
def _gc_gram(z_v, z_t, z_v_aug, z_t_aug, inmodal_weight: float, crossmodal_weight: float):
    acc = V.acc_dtype(z_v.dtype)
    v, t = z_v.to(acc), z_t.to(acc)
    n = v.shape[0]
    c_vv, c_tt, c_vt = _SymGram.apply(v), _SymGram.apply(t), _CrossGram.apply(v, t)
    f_vv, f_tt = _fro2(c_vv), _fro2(c_tt)
    loss = 0.0 * f_vv  # keeps the graph when every weight is 0
    if crossmodal_weight:  # sum_jk (S_jk - S_kj)^2, S = V T^T
        cross = 2.0 * (c_vv * c_tt).sum() - 2.0 * (c_vt * c_vt.t()).sum()
        loss = loss + crossmodal_weight * cross
    if inmodal_weight:  # sum_jk (S^VV_jk - S^TT_jk)^2
        loss = loss + inmodal_weight * (f_vv + f_tt - 2.0 * _fro2(c_vt))
    if z_v_aug is not None:
        va, ta = z_v_aug.to(acc), z_t_aug.to(acc)
        aug = (
            f_vv
            + _fro2(_SymGram.apply(va))
            - 2.0 * _fro2(_CrossGram.apply(v, va))
            + f_tt
            + _fro2(_SymGram.apply(ta))
            - 2.0 * _fro2(_CrossGram.apply(t, ta))
            + ((v * t).sum(1) - (va * ta).sum(1)).square().sum()
        )
        loss = loss + aug
    return loss / n


# ---------------------------------------------------------------------------------------------
# public functional API
# ---------------------------------------------------------------------------------------------


def orthogonality_loss(
    z_v: torch.Tensor, zi_v: torch.Tensor, z_t: torch.Tensor, zi_t: torch.Tensor
) -> torch.Tensor:
    """L_Ortho = (1/N) sum_j (<z_Vj, zi_Vj>^2 + <z_Tj, zi_Tj>^2) (B.2); row-wise, O(N*D)."""
    _check_group([("z_v", z_v), ("zi_v", zi_v), ("z_t", z_t), ("zi_t", zi_t)])
    acc = V.acc_dtype(z_v.dtype)
    dv = (z_v.to(acc) * zi_v.to(acc)).sum(1)
    dt = (z_t.to(acc) * zi_t.to(acc)).sum(1)
    return (dv.square() + dt.square()).mean()


def uniformity_loss(
    zi_v: torch.Tensor, zi_t: torch.Tensor, t: float = 2.0, *, backend: str = "auto"
) -> torch.Tensor:
    """L^i_Uni = log (1/N) sum_j sum_k [G_t(zi_Vj, zi_Vk) + G_t(zi_Tj, zi_Tk)],
    G_t(u, v) = exp(-t ||u - v||^2), j = k included, one log over both modalities (B.2 as
    printed). Exact for any vectors (normalised or not); fused through simlse with one global
    normaliser, never an N x N buffer."""
    _check_group([("zi_v", zi_v), ("zi_t", zi_t)])
    t = V.check_real("t", t)
    name = _resolve_backend(backend, zi_v.device)
    rows = torch.cat([_gaussian_lse_rows(zi_v, t, name), _gaussian_lse_rows(zi_t, t, name)])
    return torch.logsumexp(rows, dim=0) - math.log(zi_v.shape[0])


def inmodal_infonce_loss(
    z: torch.Tensor,
    z_aug: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    inmodal: str = "cyclip",
    backend: str = "auto",
) -> torch.Tensor:
    """In-modal InfoNCE of z against its augmented view, mean over rows.
    inmodal="cyclip" (default): CE(s * z @ z_aug.T, arange), CyCLIP's code, which Paper B builds
    on; "printed": -(1/N) sum_j log(e^{s<z_j,za_j>} / sum_k e^{s<z_j,z_k>}), the denominator over
    the NON-augmented z (k = j included), as docs/math.md B.1 prints L_V2V."""
    _check_group([("z", z), ("z_aug", z_aug)])
    inmodal = V.check_choice("inmodal", inmodal, INMODAL_FORMS)
    scale = V.as_scale("logit_scale", logit_scale, z)
    name = _resolve_backend(backend, z.device)
    return _inmodal_rows(z, z_aug, scale, inmodal, name).mean()


def feature_separation_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    zi_v: torch.Tensor,
    zi_t: torch.Tensor,
    zi_v_aug: torch.Tensor,
    zi_t_aug: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    t: float = 2.0,
    inmodal: str = "cyclip",
    backend: str = "auto",
) -> torch.Tensor:
    """L_Sep = L_Ortho(z, zi) + L^i_V2V + L^i_T2T + L^i_Uni(zi; t), unit weights (B.2).

    The in-modal terms are InfoNCE of the independent features zi against the independent
    features of the augmented inputs, zi_aug: B.2 prints the numerator <zi_j, zi_j> (a constant
    1/tau), read as the typo for <zi_j, zi^a_j>. Default inmodal="cyclip" (denominator over
    zi_aug, CyCLIP's code); "printed" puts the non-augmented zi in the denominator (B.1's form).
    L^i_Con is the SUM of the two directions, as printed."""
    _check_group(
        [
            ("z_v", z_v),
            ("z_t", z_t),
            ("zi_v", zi_v),
            ("zi_t", zi_t),
            ("zi_v_aug", zi_v_aug),
            ("zi_t_aug", zi_t_aug),
        ]
    )
    t = V.check_real("t", t)
    inmodal = V.check_choice("inmodal", inmodal, INMODAL_FORMS)
    scale = V.as_scale("logit_scale", logit_scale, zi_v)
    name = _resolve_backend(backend, z_v.device)
    ortho = orthogonality_loss(z_v, zi_v, z_t, zi_t)
    con = (
        _inmodal_rows(zi_v, zi_v_aug, scale, inmodal, name).mean()
        + _inmodal_rows(zi_t, zi_t_aug, scale, inmodal, name).mean()
    )
    rows = torch.cat([_gaussian_lse_rows(zi_v, t, name), _gaussian_lse_rows(zi_t, t, name)])
    uni = torch.logsumexp(rows, dim=0) - math.log(zi_v.shape[0])
    return ortho + con + uni


def brownian_bridge_loss(
    z_v: torch.Tensor, z_t: torch.Tensor, z_v_aug: torch.Tensor, t: float | torch.Tensor = 0.25
) -> torch.Tensor:
    """L_Br = (1/N) sum_j ||z^a_Vj - mu_j||^2, mu_j = normalize(t z_Vj + (1 - t) z_Tj) (B.3,
    first line; the paper's closed form is wrong). t in [0, 1]: a number (the paper fixes 0.25)
    or a per-row tensor [N] / [N, 1] (random t; its range check costs one host sync). Gradients
    reach z_v, z_t, z_v_aug (and a t tensor that requires grad). mu uses F.normalize's eps 1e-12
    where t z_V + (1 - t) z_T = 0."""
    _check_group([("z_v", z_v), ("z_t", z_t), ("z_v_aug", z_v_aug)])
    return _bridge(z_v, z_t, z_v_aug, _check_bridge_t(t, z_v))


def _bridge(z_v, z_t, z_v_aug, t: float | torch.Tensor) -> torch.Tensor:
    """L_Br for validated inputs (t: a number or an [N, 1] accumulation-dtype tensor)."""
    acc = V.acc_dtype(z_v.dtype)
    with no_autocast(z_v):
        m = t * z_v.to(acc) + (1.0 - t) * z_t.to(acc)
        mu = torch.nn.functional.normalize(m, dim=1)
        return (z_v_aug.to(acc) - mu).square().sum(1).mean()


def geometric_consistency_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    z_v_aug: torch.Tensor | None = None,
    z_t_aug: torch.Tensor | None = None,
    *,
    form: str = "paper",
    inmodal_weight: float = 1.0,
    crossmodal_weight: float = 1.0,
) -> torch.Tensor:
    """Geometric consistency (B.4) from d x d Grams in O(N * D^2), exact, no N x N:

        L_GC = (1/N) sum_jk [w_x (<V_j,T_k> - <V_k,T_j>)^2 + w_in (<V_j,V_k> - <T_j,T_k>)^2]
        + L^a_GC = (1/N) sum_jk [(<V_j,V_k> - <Va_j,Va_k>)^2 + (<T_j,T_k> - <Ta_j,Ta_k>)^2]
                   + (1/N) sum_j (<V_j,T_j> - <Va_j,Ta_j>)^2       (when z_v_aug, z_t_aug given)

    form="paper" (w_x = w_in = 1 is Paper B). form="cyclip" returns CyCLIP's
    cylambda1 * inmodal_cyclic + cylambda2 * crossmodal_cyclic with cylambda1 = inmodal_weight,
    cylambda2 = crossmodal_weight: CyCLIP's (s*A - s*B)^2.mean() / s^2 * B is exactly the
    (1/N) sum_jk above (s cancels), so the two forms differ only in that CyCLIP has no
    augmented term (passing augmented features with form="cyclip" is an error)."""
    _check_group([("z_v", z_v), ("z_t", z_t)])
    has_aug = _check_aug_pair(z_v_aug, z_t_aug)
    form = V.check_choice("form", form, GC_FORMS)
    if has_aug:
        if form == "cyclip":
            raise ValueError(
                "form='cyclip' has no augmented term; pass form='paper' to add "
                "L^a_GC, or drop z_v_aug / z_t_aug"
            )
        _check_group([("z_v", z_v), ("z_v_aug", z_v_aug), ("z_t_aug", z_t_aug)])
    w_in = V.check_real("inmodal_weight", inmodal_weight, strict=False)
    w_x = V.check_real("crossmodal_weight", crossmodal_weight, strict=False)
    return _gc_gram(z_v, z_t, z_v_aug, z_t_aug, w_in, w_x)


def modality_contrastive_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    z_v_aug: torch.Tensor,
    z_t_aug: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    inmodal: str = "cyclip",
    backend: str = "auto",
) -> torch.Tensor:
    """Paper B's base loss L_Con = (L_V2T + L_T2V + L_V2V + L_T2T) / 4 (B.1): the symmetric CLIP
    pair (clip_pairs) plus the two in-modal InfoNCE terms of each modality against its augmented
    view (inmodal="cyclip" default, or "printed"; see inmodal_infonce_loss). With "cyclip" it is
    exactly CyCLIP's ((CE(I T^T) + CE(T I^T))/2 + (CE(I Ia^T) + CE(T Ta^T))/2) / 2."""
    _check_group([("z_v", z_v), ("z_t", z_t), ("z_v_aug", z_v_aug), ("z_t_aug", z_t_aug)])
    inmodal = V.check_choice("inmodal", inmodal, INMODAL_FORMS)
    scale = V.as_scale("logit_scale", logit_scale, z_v)
    name = _resolve_backend(backend, z_v.device)
    cross = clip_pairs(z_v, z_t, scale, backend=name).mean()  # (L_V2T + L_T2V) / 2
    inm = (
        _inmodal_rows(z_v, z_v_aug, scale, inmodal, name).mean()
        + _inmodal_rows(z_t, z_t_aug, scale, inmodal, name).mean()
    )
    return 0.5 * cross + 0.25 * inm


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------


class ModalityContrastiveLoss(nn.Module):
    """Paper B's base loss (see modality_contrastive_loss); output_dict gives
    {"contrastive_loss": loss} as open_clip does."""

    def __init__(self, *, inmodal: str = "cyclip", backend: str = "auto") -> None:
        super().__init__()
        self.inmodal = V.check_choice("inmodal", inmodal, INMODAL_FORMS)
        self.backend = V.check_backend(backend)

    def forward(self, z_v, z_t, z_v_aug, z_t_aug, logit_scale, output_dict: bool = False):
        loss = modality_contrastive_loss(
            z_v, z_t, z_v_aug, z_t_aug, logit_scale, inmodal=self.inmodal, backend=self.backend
        )
        return {"contrastive_loss": loss} if output_dict else loss


class _Weighted(nn.Module):
    """A regulariser module: weight * loss(*inputs, **the module's OPTIONS attributes);
    output_dict gives {KEY: that}, ready to sum with open_clip's loss dict."""

    KEY: str
    OPTIONS: tuple[str, ...] = ()
    weight: float

    def _weighted(self, loss: Callable[..., torch.Tensor], inputs: tuple, output_dict: bool):
        out = self.weight * loss(*inputs, **{name: getattr(self, name) for name in self.OPTIONS})
        return {self.KEY: out} if output_dict else out


class FeatureSeparationLoss(_Weighted):
    """weight * L_Sep (see feature_separation_loss). Paper B's weights are unknown (appendix
    not found); CyCLIP-style 0.25 is a reasonable start. output_dict gives
    {"feature_separation_loss": weighted loss}, ready to sum with open_clip's loss dict."""

    KEY = "feature_separation_loss"
    OPTIONS = ("t", "inmodal", "backend")

    def __init__(
        self, weight: float = 1.0, *, t: float = 2.0, inmodal: str = "cyclip", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.weight = V.check_real("weight", weight, strict=False)
        self.t = V.check_real("t", t)
        self.inmodal = V.check_choice("inmodal", inmodal, INMODAL_FORMS)
        self.backend = V.check_backend(backend)

    def forward(
        self, z_v, z_t, zi_v, zi_t, zi_v_aug, zi_t_aug, logit_scale, output_dict: bool = False
    ):
        inputs = (z_v, z_t, zi_v, zi_t, zi_v_aug, zi_t_aug, logit_scale)
        return self._weighted(feature_separation_loss, inputs, output_dict)


class BrownianBridgeLoss(_GeneratorAttr, _Weighted):
    """weight * L_Br (see brownian_bridge_loss). t: a number in [0, 1] (paper: 0.25) or
    "random": a fresh t ~ U[0, 1) per row each call, drawn with `generator` (on the features'
    device) when given. The draw is the opaque op gammacl::draw (gammacl.gamma), so a
    torch.compile'd forward draws the same t as an eager one and needs no host sync."""

    KEY = "brownian_bridge_loss"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        t: float | str = 0.25,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.weight = V.check_real("weight", weight, strict=False)
        if isinstance(t, torch.Tensor):
            raise TypeError(
                "BrownianBridgeLoss takes t as a number or 'random'; pass a per-row "
                "t tensor to gammacl.brownian_bridge_loss instead"
            )
        if t != "random":
            t = _check_bridge_t(t, torch.empty(0, 1))
        self.t = t
        self.generator = generator

    def forward(self, z_v, z_t, z_v_aug, output_dict: bool = False):
        return self._weighted(self._unweighted, (z_v, z_t, z_v_aug), output_dict)

    def _unweighted(self, z_v, z_t, z_v_aug) -> torch.Tensor:
        if self.t != "random":
            return brownian_bridge_loss(z_v, z_t, z_v_aug, self.t)
        # our own draw lies in [0, 1): no range check (and no host sync)
        _check_group([("z_v", z_v), ("z_t", z_t), ("z_v_aug", z_v_aug)])
        n, acc = z_v.shape[0], V.acc_dtype(z_v.dtype)
        # torch.rand(n, generator=self.generator, device=z_v.device, dtype=acc)
        t = _draw_op("uniform", 0.0, n, self._generator_key(), z_v.device, acc)
        return _bridge(z_v, z_t, z_v_aug, t.reshape(n, 1))


class GeometricConsistencyLoss(_Weighted):
    """weight * (L_GC [+ L^a_GC]) (see geometric_consistency_loss), O(N * D^2), no N x N.
    form="cyclip" with inmodal_weight = crossmodal_weight = 0.25 and weight=1 reproduces
    CyCLIP's cyclic regularisers (cylambda1 = cylambda2 = 0.25)."""

    KEY = "geometric_consistency_loss"
    OPTIONS = ("form", "inmodal_weight", "crossmodal_weight")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        form: str = "paper",
        inmodal_weight: float = 1.0,
        crossmodal_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.weight = V.check_real("weight", weight, strict=False)
        self.form = V.check_choice("form", form, GC_FORMS)
        self.inmodal_weight = V.check_real("inmodal_weight", inmodal_weight, strict=False)
        self.crossmodal_weight = V.check_real("crossmodal_weight", crossmodal_weight, strict=False)

    def forward(self, z_v, z_t, z_v_aug=None, z_t_aug=None, output_dict: bool = False):
        return self._weighted(geometric_consistency_loss, (z_v, z_t, z_v_aug, z_t_aug), output_dict)


__all__ = [
    "BrownianBridgeLoss",
    "FeatureSeparationLoss",
    "GeometricConsistencyLoss",
    "ModalityContrastiveLoss",
    "brownian_bridge_loss",
    "feature_separation_loss",
    "geometric_consistency_loss",
    "inmodal_infonce_loss",
    "modality_contrastive_loss",
    "orthogonality_loss",
    "uniformity_loss",
]
