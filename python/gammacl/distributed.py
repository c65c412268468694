"""Multi-process losses over torch.distributed: open_clip's gathered CLIP loss, and the helpers
that keep the gamma / SogCLR per-sample state identical on every rank.

CLIP, open_clip semantics (open_clip ``gather_features`` + ``ClipLoss``), W ranks of n rows each,
rank r holding rows [r*n, (r+1)*n) of the global batch (I = image, T = text, s = logit_scale):

    local_loss=True:   loss_r = 1/2 [ mean_i CE(s I_r T_all^T, i + r n)
                                  + mean_i CE(s T_r I_all^T, i + r n) ]
                       -- two simlse sweeps of n x Wn (infonce_rows with offset = r n, no labels);
    local_loss=False:  loss_r = the full global CLIP loss on (I_all, T_all)   (Wn x Wn, one sweep).

Gathers. gather_with_grad=True: an autograd all-gather whose backward sums every rank's gradient
for the slice (reduce-scatter). gather_with_grad=False: a plain all-gather; with local_loss=False
the local tensor is put back at slot r so the local rows keep their gradient, with local_loss=True
nothing is put back (the gathered copy of the own rows is detached too) -- exactly open_clip.

Gradient each rank receives (L = the single-process loss on the concatenated global batch):
    local_loss  + gather_with_grad : dI_r = W dL/dI_r    (sum over ranks of loss_s is W L)
    !local_loss + gather_with_grad : dI_r = W dL/dI_r    (open_clip issue #616: every rank
                                      computes L and the gather backward sums W copies)
    !local_loss + !gather_with_grad: dI_r =   dL/dI_r    (only the local slot has a gradient)
    local_loss  + !gather_with_grad: dI_r = query-side part of d loss_r / dI_r only
and ds = d loss_r / ds on each rank (never communicated).  DDP then averages parameter
gradients over ranks, so the two gather_with_grad settings train with the global-batch gradient
and !local_loss + !gather_with_grad with 1/W of it.  We match open_clip in all four.

Input check: before any feature collective, one all-gather of a few int64 metadata per rank
(shapes, dtypes, devices, declared rank/world size, flags, "local validation passed"). Any
disagreement -- uneven batches from drop_last=False, different D or dtype, one rank's invalid
input, a wrong rank= -- raises the same ValueError on every rank instead of a hang. Cost: one
W*K int64 all-gather and one host sync per call.

No ring exchange: the all-gather moves the same (W-1) n D elements per rank a ring would, in one
collective; a ring only pays off when overlapped with compute, which was not measured here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gammacl import _validate as V
from gammacl.dispatch import resolve_backend
from gammacl.functional import clip_pairs, infonce_rows

# dtype codes for the metadata collective (index + 1; 0 = not a tensor / other dtype)
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)
_DEVICE_TYPES = ("cpu", "cuda")
_NDIM_SLOTS = 3  # dims recorded per tensor (enough to name any shape the losses accept)


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def resolve_world(rank: int | None, world_size: int | None, group=None) -> tuple[int, int]:
    """(rank, world_size): the given values, or the process group's where None. world_size=None
    without an initialised process group means a single process."""
    dist = _dist()
    up = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size(group) if up else 1
    if rank is None:
        rank = dist.get_rank(group) if up else 0
    if world_size > 1 and not up:
        raise RuntimeError(
            f"world_size={world_size} needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first), or pass world_size=1"
        )
    return int(rank), int(world_size)


def _comm_device(group, like: object) -> torch.device:
    """Device for the small metadata tensors: CPU for gloo / mpi, else the features' device."""
    backend = str(_dist().get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.device.type != "cpu":
        return like.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# metadata agreement


def _describe(x: object) -> list[int]:
    """[kind, ndim, dim0, dim1, dim2, dtype code, device code] for one argument."""
    if not isinstance(x, torch.Tensor):
        return [0, 0] + [-1] * _NDIM_SLOTS + [0, -1]
    dims = list(x.shape[:_NDIM_SLOTS]) + [-1] * max(0, _NDIM_SLOTS - x.ndim)
    dcode = _DTYPES.index(x.dtype) + 1 if x.dtype in _DTYPES else 0
    dev = _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else 2
    return [1, x.ndim] + dims + [dcode, dev]


_PER_ARG = 2 + _NDIM_SLOTS + 2


def _fmt_arg(name: str, row: Sequence[int]) -> str:
    kind, ndim = row[0], row[1]
    if kind == 0:
        return f"{name}=<not a tensor>"
    dims = [str(d) for d in row[2 : 2 + min(ndim, _NDIM_SLOTS)]]
    if ndim > _NDIM_SLOTS:
        dims.append("...")
    shape = "(" + ", ".join(dims) + ("," if ndim == 1 else "") + ")"
    dcode, dev = row[2 + _NDIM_SLOTS], row[3 + _NDIM_SLOTS]
    dtype = str(_DTYPES[dcode - 1]).replace("torch.", "") if dcode else "other-dtype"
    device = _DEVICE_TYPES[dev] if 0 <= dev < len(_DEVICE_TYPES) else "other-device"
    return f"{name} {shape} {dtype} {device}"


def check_agreement(
    what: str,
    args: Sequence[tuple[str, object]],
    *,
    flags: Sequence[tuple[str, int]] = (),
    local_error: BaseException | None = None,
    group=None,
) -> None:
    """One small all-gather of every rank's argument metadata; raises the same ValueError on every
    rank when any rank's local validation failed or when shapes, dtypes, devices or `flags`
    differ between ranks. Must be called by every rank of `group` (it is a collective)."""
    dist = _dist()
    world = dist.get_world_size(group)
    row: list[int] = [0 if local_error is not None else 1]
    for _, x in args:
        row += _describe(x)
    row += [int(v) for _, v in flags]
    like = next((x for _, x in args if isinstance(x, torch.Tensor)), None)
    device = _comm_device(group, like)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    out = torch.empty(world * len(row), dtype=torch.int64, device=device)
    _all_gather_flat(out, mine, group)
    table = out.view(world, len(row)).tolist()  # the one host sync of the check

    problems = []
    bad = [r for r in range(world) if table[r][0] == 0]
    if bad:
        problems.append(
            f"input validation failed on rank(s) {bad} (on each of them the local error "
            "is this error's __cause__)"
        )
    ref = table[0]
    for k, (name, _) in enumerate(args):
        lo, hi = 1 + k * _PER_ARG, 1 + (k + 1) * _PER_ARG
        if any(t[lo:hi] != ref[lo:hi] for t in table):
            problems.append(f"{name} differs between ranks")
    base = 1 + len(args) * _PER_ARG
    for k, (name, _) in enumerate(flags):
        vals = [t[base + k] for t in table]
        if name == "rank":
            if vals != list(range(world)):
                problems.append(
                    f"rank= must equal each process's torch.distributed rank "
                    f"(0..{world - 1}), got {vals}"
                )
        elif name == "world_size":
            if any(v != world for v in vals):
                problems.append(
                    f"world_size= must equal the process group size {world}, got {vals}"
                )
        elif len(set(vals)) > 1:
            problems.append(f"{name} differs between ranks: {vals}")
    if not problems:
        return
    per_rank = "; ".join(
        f"rank {r}: "
        + ", ".join(
            _fmt_arg(name, t[1 + k * _PER_ARG : 1 + (k + 1) * _PER_ARG])
            for k, (name, _) in enumerate(args)
        )
        for r, t in enumerate(table)
    )
    msg = (
        f"{what}: inputs disagree across the {world} ranks: {'; '.join(problems)}. "
        f"Every rank must pass the same batch size, feature dimension, dtype and device "
        f"(use drop_last=True in the DataLoader). Per rank: {per_rank}"
    )
    raise ValueError(msg) from local_error


# ---------------------------------------------------------------------------------------------
# gathers


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """out[W*n, ...] <- concatenation of every rank's x (no autograd)."""
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def all_gather_rows(x: torch.Tensor, *, with_grad: bool, group=None) -> torch.Tensor:
    """Concatenation over ranks (dim 0) of x. with_grad: the backward sends each rank the sum over
    ranks of the gradient of its slice (open_clip's gather_with_grad); otherwise detached."""
    dist = _dist()
    x = x.contiguous()  # pytorch #120386: non-contiguous gathers lost their gradient
    if with_grad:
        from torch.distributed import _functional_collectives as fc

        fn = getattr(fc, "all_gather_single_autograd", None) or getattr(
            fc, "all_gather_tensor_autograd", None
        )
        if fn is not None:
            g = group if group is not None else dist.group.WORLD
            out = fn(x, 0, g)
            if isinstance(out, fc.AsyncCollectiveTensor):
                out = out.wait()
            return out
        import torch.distributed.nn.functional as dnf

        return torch.cat(dnf.all_gather(x, group=group or dist.group.WORLD), dim=0)
    out = torch.empty(
        (dist.get_world_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device
    )
    _all_gather_flat(out, x.detach(), group)
    return out


def _reinsert(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """gathered with rows [rank*n, (rank+1)*n) replaced by `local` (which keeps its graph)."""
    n = local.shape[0]
    return torch.cat([gathered[: rank * n], local, gathered[(rank + 1) * n :]], dim=0)


# ---------------------------------------------------------------------------------------------
# CLIP


def clip_loss_distributed(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """open_clip's distributed ClipLoss (module docstring) without the N x N matrix: a 0-d fp32
    (fp64 for fp64 inputs) loss. rank / world_size default to the process group's; world_size=1
    is the single-process loss with no collective."""
    rank, world_size = resolve_world(rank, world_size, group)
    if world_size == 1:
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        scale = V.as_scale("logit_scale", logit_scale, image_features)
        return clip_pairs(image_features, text_features, scale, backend=backend).mean()

    # Validate locally but raise only after every rank has joined the metadata collective, so a
    # bad input on one rank is an error on all ranks rather than a hang on the others.
    err = None
    scale = name = None
    try:
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        scale = V.as_scale("logit_scale", logit_scale, image_features)
        name = resolve_backend(backend, image_features.device)
    except (TypeError, ValueError, RuntimeError) as e:
        err = e
    check_agreement(
        "gammacl ClipLoss (distributed)",
        [("image_features", image_features), ("text_features", text_features)],
        flags=[
            ("rank", rank),
            ("world_size", world_size),
            ("local_loss", bool(local_loss)),
            ("gather_with_grad", bool(gather_with_grad)),
        ],
        local_error=err,
        group=group,
    )
    assert scale is not None and name is not None  # check_agreement raised otherwise

    n = image_features.shape[0]
    all_image = all_gather_rows(image_features, with_grad=gather_with_grad, group=group)
    all_text = all_gather_rows(text_features, with_grad=gather_with_grad, group=group)
    if local_loss:
        # rows of rank r against all columns; row i's positive is global column i + r n
        per_image = infonce_rows(image_features, all_text, scale, offset=rank * n, backend=name)
        per_text = infonce_rows(text_features, all_image, scale, offset=rank * n, backend=name)
        return 0.5 * (per_image.mean() + per_text.mean())
    if not gather_with_grad:
        all_image = _reinsert(all_image, image_features, rank)
        all_text = _reinsert(all_text, text_features, rank)
    return clip_pairs(all_image, all_text, scale, backend=name).mean()


# ---------------------------------------------------------------------------------------------
# gamma / SogCLR


_RATE_CODES = {"ema": 0, "batch": 1, "fixed": 2}
_NO_TERM = -1e30  # alpha of an unused direction in gamma_onepass: e^{l - 1e30} = 0, no inf - inf


def broadcast_log_weights(loss, total: int, like: torch.Tensor, group=None) -> torch.Tensor:
    """log(G / a) for the whole global batch, [2, total] in the accumulation dtype: drawn on
    rank 0 (its generator, or the global RNG) exactly as a single process would draw for a batch
    of `total`, and broadcast, so every rank uses the same draws whatever its RNG state."""
    from gammacl.gamma import draw_log_weights

    dist = _dist()
    acc = V.acc_dtype(like.dtype)
    if loss._mean_estep:  # SogCLR: u = 1/R, no draw
        return torch.zeros(2, total, dtype=acc, device=like.device)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    if dist.get_rank(group) == 0:
        w = draw_log_weights(loss.shape, total, generator=loss.generator, device=like.device)
    else:
        w = torch.empty(2, total, dtype=torch.float32, device=like.device)
    dist.broadcast(w, src=src, group=group)
    return w.to(acc)


def gather_index_and_log_zhat(
    index: torch.Tensor, log_zhat: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (index [n], log Zhat [2, n]) concatenated in rank order -> ([W n], [2, W n]),
    in one all-gather of an [n, 3] float64 buffer (indices < 2^53 are exact in float64)."""
    packed = torch.cat([index.to(torch.float64)[:, None], log_zhat.detach().t().double()], dim=1)
    out = all_gather_rows(packed.contiguous(), with_grad=False, group=group)
    return out[:, 0].long(), out[:, 1:].t().to(log_zhat.dtype)


def update_state_gathered(
    loss, index: torch.Tensor, log_zhat: torch.Tensor, group=None
) -> torch.Tensor:
    """Gathers (index, log Zhat) from every rank and applies the SAME rate update on every rank,
    so the per-sample state stays identical everywhere (equal to a single process that saw the
    concatenated batch). Returns the updated log-rates of this rank's rows, [2, n]."""
    all_index, all_lz = gather_index_and_log_zhat(index, log_zhat, group)
    states = loss._states(log_zhat.device)
    new = torch.stack([s.update(all_index, all_lz[d], check=False) for d, s in enumerate(states)])
    n, r = index.shape[0], _dist().get_rank(group)
    return new[:, r * n : (r + 1) * n]


def _valid_local_estimates(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    off: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """[2, n] mask of this rank's log Zhat that rest on finite inputs only (gammacl.gamma's
    _valid_estimates on the global batch, restricted to local anchors): image anchor i needs
    image_i and every gathered text except its positive finite; text anchors likewise."""
    n = image.shape[0]
    bad_i, bad_t = (~torch.isfinite(x.detach()).all(dim=1) for x in (all_image, all_text))
    row_ok = torch.isfinite(image.detach()).all(dim=1) & (
        bad_t.sum() - bad_t[off : off + n].long() == 0
    )
    col_ok = torch.isfinite(text.detach()).all(dim=1) & (
        bad_i.sum() - bad_i[off : off + n].long() == 0
    )
    return torch.stack([row_ok, col_ok]) & torch.isfinite(scale.detach())


def _local_neg_lse(image, text, all_image, all_text, scale, off: int, name: str):
    """Negatives-only LSEs of this rank's anchors: local image rows against the gathered texts
    and local text rows against the gathered images, the positive (column i + off) excluded."""
    from gammacl.ops.simlse import simlse

    row, _ = simlse(image, all_text, scale, offset=off, exclude_pos=True, cols=False, backend=name)
    col, _ = simlse(text, all_image, scale, offset=off, exclude_pos=True, cols=False, backend=name)
    return row, col


def gamma_loss_distributed(
    loss,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    index: torch.Tensor | None,
    *,
    group=None,
) -> torch.Tensor:
    """GammaClipLoss / SogCLRLoss `loss` over the ranks of `group`: the global batch is the
    concatenation of every rank's n pairs (B = W n). Rank r computes its own anchors (image and
    text) against all gathered columns (with gradient), so

        mean over ranks of loss_r = the single-process loss on the global batch (same draws),
        feature gradient on rank r = W x that loss's gradient for its rows (open_clip's
        local_loss + gather_with_grad convention; DDP's average gives the global gradient).

    State: (index, log Zhat) of every rank are gathered and every rank applies the same update
    (indices are global data-set indices). Draws: rank 0's, broadcast. Per step: two feature
    all-gathers, one metadata all-gather, one [n, 3] all-gather, one [2, W n] broadcast."""
    from gammacl.functional import _pos_logits
    from gammacl.gamma import _check_index_tensor, _neg_two_pass, _range_error
    from gammacl.ops.gamma_onepass import gamma_onepass

    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{type(loss).__name__}: distributed use needs an initialised "
            "torch.distributed process group"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    one_pass = loss.rate == "fixed" or (loss.rate == "ema" and loss.update == "after")

    err = None
    scale = name = None
    try:
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        n = image_features.shape[0]
        if world * n < 2:
            raise ValueError(f"{type(loss).__name__} needs at least 2 pairs in the global batch")
        scale = V.as_scale("logit_scale", logit_scale, image_features)
        name = resolve_backend(loss.backend, image_features.device)
        if loss.rate == "fixed" and not loss._fixed_set:
            raise RuntimeError(
                "rate='fixed' needs set_log_rates(image_log_rate, text_log_rate) "
                "before the first forward"
            )
        if index is None and loss.rate != "batch":
            raise TypeError(
                "index (the data-set indices of the pairs) is required unless rate='batch'"
            )
        if index is not None:
            index = _check_index_tensor(index, n).to(image_features.device, torch.int64)
            lo, hi = torch.stack([index.min(), index.max()]).tolist()  # one host sync
            if lo < 0 or hi >= loss.num_samples:
                raise _range_error(loss.num_samples, lo, hi)
    except (TypeError, ValueError, RuntimeError) as e:
        err = e
    check_agreement(
        f"gammacl {type(loss).__name__} (distributed)",
        [("image_features", image_features), ("text_features", text_features), ("index", index)],
        flags=[
            ("num_samples", loss.num_samples),
            ("rate", _RATE_CODES[loss.rate]),
            ("update", int(loss.update == "after")),
            ("mean_estep", int(loss._mean_estep)),
        ],
        local_error=err,
        group=group,
    )
    assert scale is not None and name is not None

    dev = image_features.device
    n = image_features.shape[0]
    total, off = world * n, rank * n
    log_m = math.log(total - 1)
    log_w = broadcast_log_weights(loss, total, image_features, group)[:, off : off + n]
    acc = log_w.dtype
    all_image = all_gather_rows(image_features, with_grad=True, group=group)
    all_text = all_gather_rows(text_features, with_grad=True, group=group)
    pos = _pos_logits(image_features, text_features, scale)

    if not one_pass:  # excluded-positive LSEs -> rates (update before use) -> weights
        row, col = _local_neg_lse(
            image_features, text_features, all_image, all_text, scale, off, name
        )
        log_zhat = torch.stack([row, col]).detach() - log_m
        if loss.rate == "ema":  # rows resting on a non-finite input are never stored
            valid = _valid_local_estimates(
                image_features, text_features, all_image, all_text, off, scale
            )
            log_zhat = torch.where(valid, log_zhat, float("nan"))
        if loss.rate == "batch":
            log_r = log_zhat
        else:
            log_r = update_state_gathered(loss, index, log_zhat, group)
        neg = _neg_two_pass(row, col, log_w, log_r, log_m)
        loss.last_path = "two_pass"
    else:  # stored rates (first visits: this batch's Zhat) -> one fused sweep -> update after
        states = loss._states(dev)
        stored = torch.stack([s.log_rate[index] for s in states]).to(acc)
        seen = torch.stack([s.visited[index] for s in states])
        log_zhat = None
        if loss.rate == "fixed" or bool(seen.all()):  # host sync, as the single-process path
            log_r = stored
            loss.last_path = "one_pass"
        else:
            with torch.no_grad():
                r_, c_ = _local_neg_lse(
                    *(t.detach() for t in (image_features, text_features, all_image, all_text)),
                    scale.detach(),
                    off,
                    name,
                )
            log_zhat = torch.stack([r_, c_]) - log_m
            log_r = torch.where(seen, stored, log_zhat)
            loss.last_path = "lse+one_pass"
        alpha = (log_w - log_r).detach() - log_m
        no_term = torch.full((total,), _NO_TERM, dtype=acc, device=dev)
        # w = 1/(2n) per local anchor: sum over ranks = 1/(2B) per anchor of the global batch
        neg_i, row, _, _, _ = gamma_onepass(
            image_features,
            all_text,
            scale,
            alpha[0],
            no_term,
            w_row=0.5 / n,
            w_col=0.0,
            clamp=loss.clamp,
            offset=off,
            backend=name,
        )
        neg_t, col, _, _, _ = gamma_onepass(
            text_features,
            all_image,
            scale,
            alpha[1],
            no_term,
            w_row=0.5 / n,
            w_col=0.0,
            clamp=loss.clamp,
            offset=off,
            backend=name,
        )
        neg = neg_i + neg_t
        if loss.rate == "ema":  # update after use, with every rank's rows
            if log_zhat is None:
                log_zhat = torch.stack([row, col]) - log_m
            valid = _valid_local_estimates(
                image_features, text_features, all_image, all_text, off, scale
            )
            log_zhat = torch.where(valid, log_zhat, float("nan"))
            update_state_gathered(loss, index, log_zhat, group)
    out = neg - pos.mean()
    loss.global_loss_estimate = (0.5 * log_r.mean(dim=1).sum() - pos.mean()).detach()
    return out


# ---------------------------------------------------------------------------------------------
# SigLIP


def siglip_loss_distributed(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """open_clip's distributed SigLipLoss without the n x (W n) logits. open_clip passes the
    text features around a ring (dist_impl bidir / shift / reduce) or gathers them ("gather");
    every variant computes, on rank r with n local pairs,

        loss_r = -(1/n) sum_{i local} sum_{j global} log sigmoid(z_ij l_ij),
        z_ij = +1 only for j = i + r n (the own diagonal block), -1 for every other text,

    and the gradient of each remote text block goes back to its owner (summed). Here: one
    all-gather of the text features with gradient (its backward sums every rank's gradient of
    the slice) and one fused siglip sweep with offset r n. Hence, against the single-process
    loss L on the concatenated global batch (W n pairs): mean_r loss_r = L, the feature
    gradients on rank r are W dL/d(its rows), and dloss_r/dscale, dloss_r/dbias average over
    ranks (DDP) to dL/dscale, dL/dbias. Inputs are checked on every rank before any feature
    collective (check_agreement), so a bad input raises everywhere instead of hanging."""
    from gammacl.ops.siglip import siglip
    from gammacl.siglip import siglip_loss

    rank, world_size = resolve_world(rank, world_size, group)
    if world_size == 1:
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=backend)
    err = None
    scale = bias = name = None
    try:
        V.check_pair(
            "image_features", image_features, "text_features", text_features, same_batch=True
        )
        scale = V.as_scale("logit_scale", logit_scale, image_features)
        bias = V.as_scale("logit_bias", logit_bias, image_features)
        name = resolve_backend(backend, image_features.device)
    except (TypeError, ValueError, RuntimeError) as e:
        err = e
    check_agreement(
        "gammacl SigLipLoss (distributed)",
        [("image_features", image_features), ("text_features", text_features)],
        flags=[("rank", rank), ("world_size", world_size)],
        local_error=err,
        group=group,
    )
    assert scale is not None and bias is not None and name is not None
    n = image_features.shape[0]
    all_text = all_gather_rows(text_features, with_grad=True, group=group)
    with torch.autocast(image_features.device.type, enabled=False):
        return siglip(image_features, all_text, scale, bias, offset=rank * n, backend=name)
