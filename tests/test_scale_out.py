"""Scale-out modes on 2 and 4 gloo ranks (issue 25): grad_comm="local" (each rank computes its
own features' gradient, no feature-gradient collective) equals "reduce" and the single-process
full batch; state_sharding="owner" equals "replicated" over 8 random-index steps (two-pass and
one-pass paths) and keeps ceil(num_samples / W) entries per rank; owner checkpoints round-trip and
refuse another world.
Every collective is counted (gammacl.distributed.CommCounter): "local"'s backward moves no
feature-sized tensor. The multi-process runs are slow-marked (CI's `-m "emu or slow"` step); the
single-process checks below them run by default.

The harness (spawned ranks reporting one line per check) is tests/test_distributed.py's.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_distributed import _gamma_steps, _global_batch, _ok, _run_world
from tolerances import assert_close_dtype, assert_close_fp64

N, D = 5, 32  # rows per rank, feature dimension (N x D >> the 2 N statistics)
SAMPLES, OWNER_STEPS = 23, 8  # 23: not a multiple of W, shards of unequal size


def _run(fn, img, txt, *scalars, counter=None):
    """(loss, d_image, d_text, d_scalars...) of fn on fresh leaves; counter phases fwd / bwd."""
    leaves = [img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()]
    leaves += [s.detach().clone().requires_grad_() for s in scalars]
    if counter is not None:
        counter.phase = "forward"
    loss = fn(*leaves)
    if counter is not None:
        counter.phase = "backward"
    grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), *grads)


def _rank_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------
# worker side


def _check_local_clip(rank, world, report):
    import gammacl
    from gammacl import reference
    from gammacl.distributed import CommCounter

    img, txt = _global_batch(world, n=N, d=D)
    sl = slice(rank * N, (rank + 1) * N)
    scale = torch.tensor(3.7, dtype=torch.float64)
    full = _run(lambda a, b, s: reference.clip_loss(a, b, s), img, txt, scale)

    for local_loss in (True, False):
        key = f"clip local grad_comm local_loss={local_loss}"

        def run(local_loss=local_loss, key=key):
            out = {}
            res = {}
            for dtype in (torch.float64, torch.float32):
                for mode in ("reduce", "local"):
                    mod = gammacl.ClipLoss(
                        local_loss=local_loss, gather_with_grad=True, rank=rank,
                        world_size=world, backend="torch", grad_comm=mode,
                    )  # fmt: skip
                    with CommCounter() as c:
                        res[mode, dtype] = _run(
                            mod, img[sl].to(dtype), txt[sl].to(dtype), scale.to(dtype), counter=c
                        )
                    out[f"{mode} {dtype} bwd bytes"] = c.total("backward")
                    out[f"{mode} {dtype} largest bwd"] = c.largest("backward")
            red, loc = res["reduce", torch.float64], res["local", torch.float64]
            for what, x, y in zip(("loss", "d_image", "d_text"), loc, red, strict=False):
                assert_close_fp64(x, y, f"{key} {what} local vs reduce")
            # the scale's gradient is a per-rank share with reduce's sum over ranks
            assert_close_fp64(_rank_sum(loc[3]), _rank_sum(red[3]), f"{key} sum of d_scale")
            assert_close_fp64(loc[1], world * full[1][sl], f"{key} d_image = W dL (full batch)")
            assert_close_fp64(loc[2], world * full[2][sl], f"{key} d_text = W dL (full batch)")
            if not local_loss:
                assert_close_fp64(loc[0], full[0], f"{key} loss = full-batch loss")
                assert_close_fp64(_rank_sum(loc[3]) / world, full[3], f"{key} mean d_scale")
            # fp32: error vs the fp64 result at most PyTorch's own fp32 error (tolerances.py)
            l32, r32 = res["local", torch.float32], res["reduce", torch.float32]
            for k, what in enumerate(("loss", "d_image", "d_text")):
                assert_close_dtype(l32[k], red[k], r32[k], torch.float32, f"{key} fp32 {what}")
            # backward: only the 2 N upstream floats move; "reduce" moves the N x D gradient
            stats = 2 * world * N * 8
            assert 0 < out["local torch.float64 largest bwd"] <= stats, out
            assert out["reduce torch.float64 largest bwd"] >= world * N * D * 8, out
            return out

        report(key, run)


def _check_local_siglip(rank, world, report):
    import gammacl
    from gammacl.distributed import CommCounter

    img, txt = _global_batch(world, n=N, d=D)
    sl = slice(rank * N, (rank + 1) * N)
    scale, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)

    def run():
        out, res = {}, {}
        for dtype in (torch.float64, torch.float32):
            for mode in ("reduce", "local"):
                mod = gammacl.SigLipLoss(
                    rank=rank, world_size=world, backend="torch", grad_comm=mode
                )
                args = (img[sl].to(dtype), txt[sl].to(dtype), scale.to(dtype), bias.to(dtype))
                with CommCounter() as c:
                    res[mode, dtype] = _run(mod, *args, counter=c)
                out[f"{mode} {dtype} bwd bytes"] = c.total("backward")
        red, loc = res["reduce", torch.float64], res["local", torch.float64]
        full = _run(lambda a, b, s, t: gammacl.siglip_loss(a, b, s, t, backend="torch"),
                    img, txt, scale, bias)  # fmt: skip
        for k, what in enumerate(("loss", "d_image", "d_text", "d_scale", "d_bias")):
            assert_close_fp64(loc[k], red[k], f"siglip {what} local vs reduce")
            assert_close_dtype(
                res["local", torch.float32][k], red[k], res["reduce", torch.float32][k],
                torch.float32, f"siglip fp32 {what}",
            )  # fmt: skip
        assert_close_fp64(loc[1], world * full[1][sl], "siglip d_image = W dL (full batch)")
        assert_close_fp64(loc[2], world * full[2][sl], "siglip d_text = W dL (full batch)")
        assert_close_fp64(_rank_sum(loc[0]) / world, full[0], "siglip mean loss = full batch")
        assert out["local torch.float64 bwd bytes"] == 0, out  # SigLIP: no backward collective
        assert out["reduce torch.float64 bwd bytes"] >= world * N * D * 8, out
        return out

    report("siglip local grad_comm", run)


GAMMA_LOCAL = {
    "sogclr": ("SogCLRLoss", {"ema": 0.5}),
    "gamma ema": ("GammaClipLoss", {"rate": "ema", "ema": 0.3, "shape": 2.0}),
    "gamma batch": ("GammaClipLoss", {"rate": "batch", "shape": 2.0}),
    "sogclr after": ("SogCLRLoss", {"ema": 0.5, "update": "after"}),  # one pass (+ LSE pass)
    "gamma fixed": ("GammaClipLoss", {"rate": "fixed", "shape": 2.0}),  # one pass
}


def _gamma(cls_name, kwargs, *, seed, single=False, **modes):
    from gammacl import gamma

    kw = dict(kwargs, backend="torch", **modes)
    if single:
        kw["distributed"] = False
    if cls_name == "GammaClipLoss":
        kw["generator"] = torch.Generator().manual_seed(seed)
    loss = getattr(gamma, cls_name)(SAMPLES, **kw)
    if kw.get("rate") == "fixed":
        g = torch.Generator().manual_seed(5)
        loss.set_log_rates(torch.randn(SAMPLES, generator=g), torch.randn(SAMPLES, generator=g))
    return loss


def _check_local_gamma(rank, world, report):
    from gammacl.distributed import CommCounter

    n = 4  # tests/test_distributed.py's G_LOCAL: _gamma_steps' batches
    steps = _gamma_steps(world)
    sl = slice(rank * n, (rank + 1) * n)
    for key, (cls_name, kwargs) in GAMMA_LOCAL.items():

        def run(cls_name=cls_name, kwargs=kwargs, key=key):
            single = _gamma(cls_name, kwargs, seed=7, single=True)
            red = _gamma(cls_name, kwargs, seed=7, grad_comm="reduce")
            loc = _gamma(cls_name, kwargs, seed=7, grad_comm="local")
            red32 = _gamma(cls_name, kwargs, seed=7, grad_comm="reduce")
            loc32 = _gamma(cls_name, kwargs, seed=7, grad_comm="local")
            largest = 0
            for k, (img, txt, idx) in enumerate(steps):
                s = torch.tensor(4.0, dtype=torch.float64)
                ref = _run(lambda a, b, s_, i=idx: single(a, b, s_, i), img, txt, s)
                r = _run(lambda a, b, s_, i=idx[sl]: red(a, b, s_, i), img[sl], txt[sl], s)
                with CommCounter() as c:
                    g = _run(
                        lambda a, b, s_, i=idx[sl]: loc(a, b, s_, i), img[sl], txt[sl], s, counter=c
                    )
                largest = max(largest, c.largest("backward"))
                # fp32: error vs fp64 "reduce" at most PyTorch's own fp32 error (tolerances.py)
                i32, t32, s32 = img[sl].float(), txt[sl].float(), s.float()
                g32 = _run(lambda a, b, s_, i=idx[sl]: loc32(a, b, s_, i), i32, t32, s32)
                r32 = _run(lambda a, b, s_, i=idx[sl]: red32(a, b, s_, i), i32, t32, s32)
                for j, what in enumerate(("loss", "d_image", "d_text")):
                    assert_close_dtype(g32[j], r[j], r32[j], torch.float32, f"{key} fp32 {what}")
                for what, x, y in zip(("loss", "d_image", "d_text"), g, r, strict=False):
                    assert_close_fp64(x, y, f"{key} step {k} {what} local vs reduce")
                assert_close_fp64(_rank_sum(g[3]), _rank_sum(r[3]), f"{key} step {k} sum d_scale")
                assert_close_fp64(g[1], world * ref[1][sl], f"{key} step {k} d_image = W dL")
                assert_close_fp64(g[2], world * ref[2][sl], f"{key} step {k} d_text = W dL")
                assert_close_fp64(_rank_sum(g[0]) / world, ref[0], f"{key} step {k} mean loss")
                if loc.rate == "ema":
                    assert_close_fp64(loc.image_rate.log_rate, single.image_rate.log_rate, key)
                    assert_close_fp64(loc.text_rate.log_rate, single.text_rate.log_rate, key)
            # two-pass: the 2 N upstream floats only; one-pass: nothing (weights gathered forward)
            assert largest == (0 if loc._one_pass() else 2 * world * n * 8), largest
            return {"largest bwd bytes": largest, "paths": loc.last_path}

        report(key + " local grad_comm", run)


OWNER = {  # test key -> (class, options): the two-pass path, and the one-pass (+ LSE) path
    "SogCLRLoss": GAMMA_LOCAL["sogclr"],
    "GammaClipLoss": GAMMA_LOCAL["gamma ema"],
    "GammaClipLoss after": ("GammaClipLoss", {"rate": "ema", "ema": 0.3, "shape": 2.0,
                                              "update": "after"}),
}  # fmt: skip


def _owner_steps(world: int):
    """8 steps of W x 4 random indices drawn WITH replacement (duplicates within and across
    ranks), features as _gamma_steps; for certain: step 1 revisits step 0's first index on rank
    0, and in step 2 ranks 0 and 1 share an index (positions 1 and 4 + 1)."""
    g = torch.Generator().manual_seed(17 + world)
    out = []
    for k in range(OWNER_STEPS):
        img, txt = _global_batch(world, n=4)
        img = torch.nn.functional.normalize(
            img + 0.3 * torch.randn(img.shape, generator=g, dtype=img.dtype), dim=1
        )
        idx = torch.randint(0, SAMPLES, (world * 4,), generator=g)
        if k == 1:
            idx[0] = out[0][2][0]
        if k == 2:
            idx[4 + 1] = idx[1]
        out.append((img, txt, idx))
    return out


def _check_owner(rank, world, report):
    import torch.distributed as dist

    from gammacl.distributed import CommCounter

    n = 4
    steps = _owner_steps(world)
    sl = slice(rank * n, (rank + 1) * n)
    cap = math.ceil(SAMPLES / world)

    def shard_vs_full(owner, rep, what):
        for name in ("image_rate", "text_rate"):
            mine, full = getattr(owner, name), getattr(rep, name)
            ks = torch.arange(rank, SAMPLES, world)
            assert mine.log_rate.shape == (len(ks),) and len(ks) <= cap, (what, mine.log_rate.shape)
            assert torch.equal(mine.visited, full.visited[ks]), f"{what} {name} visited"
            assert_close_fp64(mine.log_rate, full.log_rate[ks], f"{what} {name} log_rate")

    for name, (cls_name, kwargs) in OWNER.items():
        key = f"owner {name}"

        def run(cls_name=cls_name, kwargs=kwargs, key=key):
            rep = _gamma(cls_name, kwargs, seed=3)
            owners = {
                g: _gamma(cls_name, kwargs, seed=3, grad_comm=g, state_sharding="owner")
                for g in ("reduce", "local")
            }
            bytes_per_step, paths = {}, []
            for k, (img, txt, idx) in enumerate(steps):
                s = torch.tensor(4.0, dtype=torch.float64)
                with CommCounter() as c:
                    r = _run(lambda a, b, s_, i=idx[sl]: rep(a, b, s_, i), img[sl], txt[sl], s)
                bytes_per_step["replicated"], rep_ops = c.total(), [r[1:] for r in c.records]
                paths.append(rep.last_path)
                for g, own in owners.items():
                    with CommCounter() as c:
                        o = _run(
                            lambda a, b, s_, i=idx[sl], m=own: m(a, b, s_, i), img[sl], txt[sl],
                            s, counter=c,
                        )  # fmt: skip
                    bytes_per_step[g], ops = c.total(), [r[1:] for r in c.records]
                    if g == "reduce":  # the same feature traffic as replicated: owner's extra ops
                        extra = sorted(set(ops) - set(rep_ops))
                    assert own.last_path == rep.last_path, (key, g, k, own.last_path)
                    for what, x, y in zip(("loss", "d_image", "d_text"), o, r, strict=False):
                        assert_close_fp64(x, y, f"{key} {g} step {k} {what} owner vs replicated")
                    shard_vs_full(own, rep, f"{key} {g} step {k}")
                # owner's extra traffic per step (N = 4 W, fp64 features, fp32 state): two-pass,
                # the [2, N] fp64 all-reduce of the updated rates; one-pass, the [N] int64 index
                # all-gather and the [4, N] fp32 read all-reduce (the write needs no all-reduce)
                want = 4 * world * (16 if rep.update == "before" else 8 + 16)
                assert bytes_per_step["reduce"] - bytes_per_step["replicated"] == want, (
                    key, bytes_per_step, extra, ops, rep_ops
                )  # fmt: skip
                if k == 3:  # checkpoint round trip at the same world: a fresh loss resumes
                    sd = owners["local"].state_dict()
                    fresh = _gamma(
                        cls_name, kwargs, seed=99, grad_comm="local", state_sharding="owner"
                    )
                    fresh.load_state_dict(sd)
                    shard_vs_full(fresh, rep, f"{key} resumed")
                    owners["local"] = fresh
            # another world (or rank) refuses the shard with a message naming both
            other = _gamma(cls_name, kwargs, seed=3, single=True, state_sharding="owner")
            try:
                other.load_state_dict(owners["local"].state_dict())
            except ValueError as e:
                msg = str(e)
            else:
                raise AssertionError("a shard of another world size was loaded")
            assert f"rank {rank} of {world}" in msg and "rank 0 of 1" in msg, msg
            dist.barrier()
            return {"bytes per step": bytes_per_step, "paths": paths, "refusal": msg}

        report(key, run)


def _check_fail_fast_local(rank, world, report):
    import gammacl

    img, txt = _global_batch(world, n=N, d=D)
    sl = slice(rank * N, (rank + 1) * N)

    def case(uneven, modes):
        mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
            backend="torch", grad_comm=modes[rank % 2],
        )  # fmt: skip
        i, t = img[sl], txt[sl]
        if uneven and rank == 0:  # drop_last=False: one rank gets a short batch
            i, t = i[:-1], t[:-1]
        try:
            mod(i, t, 3.0)
        except ValueError as e:
            return str(e)
        raise AssertionError("no error")

    report("fail fast uneven local", lambda: case(True, ("local", "local")))
    report("fail fast mixed grad_comm", lambda: case(False, ("local", "reduce")))

    def agreement_first():
        # set_agreement_check("first"): the metadata all-gather (int64, W x K) on the first call
        # of a loss only; the features' collectives are unchanged
        from gammacl.distributed import CommCounter, set_agreement_check

        mod = gammacl.ClipLoss(True, True, rank=rank, world_size=world, grad_comm="local")
        counts = []
        set_agreement_check("first")
        try:
            for _ in range(3):
                with CommCounter() as c:
                    mod(img[sl], txt[sl], 3.0)
                counts.append(len(c.records))
        finally:
            set_agreement_check("always")
        with CommCounter() as c:
            mod(img[sl], txt[sl], 3.0)
        assert counts == [4, 3, 3] and len(c.records) == 4, (counts, len(c.records))
        return counts

    report("agreement check first", agreement_first)


CHECKS = (
    _check_local_clip,
    _check_local_siglip,
    _check_local_gamma,
    _check_owner,
    _check_fail_fast_local,
)


# ---------------------------------------------------------------------------------------------
# parent side


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def scale_run(request):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    return request.param, _run_world(request.param, CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_local_equals_reduce_and_full_batch(scale_run, local_loss):
    _ok(scale_run, f"clip local grad_comm local_loss={local_loss}")


@pytest.mark.slow
def test_siglip_local_equals_reduce_and_full_batch(scale_run):
    _ok(scale_run, "siglip local grad_comm")


@pytest.mark.slow
@pytest.mark.parametrize("config", list(GAMMA_LOCAL))
def test_gamma_local_equals_reduce_and_full_batch(scale_run, config):
    _ok(scale_run, config + " local grad_comm")


@pytest.mark.slow
@pytest.mark.parametrize("config", list(OWNER))
def test_owner_sharding_equals_replicated_and_checkpoints(scale_run, config):
    got = _ok(scale_run, f"owner {config}")
    if OWNER[config][1].get("update") == "after":  # both one-pass paths ran, on every rank
        assert all({"lse+one_pass", "one_pass"} <= set(r["paths"]) for r in got), got


@pytest.mark.slow
def test_agreement_check_first_call_only(scale_run):
    _ok(scale_run, "agreement check first")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fail fast uneven local", "fail fast mixed grad_comm"])
def test_local_fail_fast_same_error_on_every_rank(scale_run, case):
    msgs = _ok(scale_run, case)
    assert len(set(msgs)) == 1, msgs
    assert "differs between ranks" in msgs[0], msgs[0]


# ---------------------------------------------------------------------------------------------
# single process (default run)


@pytest.mark.parametrize("exclude_pos", [False, True])
def test_local_pair_lse_gradient_is_both_directions(exclude_pos):
    """In a world of one the local backward (rows with their own LSE, columns with every
    anchor's) must give simlse's autograd of both directions, for any upstream: d/dx, d/dy and
    dscale (the half of the two sweeps' sum)."""
    from gammacl._local_grad import local_pair_lse
    from gammacl.distributed import World
    from gammacl.ops.simlse import simlse

    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(9, 6, generator=g, dtype=torch.float64) for _ in range(2))
    wx, wy = (torch.rand(9, generator=g, dtype=torch.float64) for _ in range(2))
    scale = torch.tensor(2.5, dtype=torch.float64)

    def ref(a, b, s):
        row, col = simlse(a, b, s, exclude_pos=exclude_pos, backend="torch")
        return (wx * row).sum() + (wy * col).sum()

    def ours(a, b, s):
        rx, ry, lse = local_pair_lse(
            a, b, a, b, s, World(), offset=0, exclude_pos=exclude_pos, backend="torch"
        )
        assert not lse.requires_grad
        return (wx * rx).sum() + (wy * ry).sum()

    want, got = _run(ref, x, y, scale), _run(ours, x, y, scale)
    for what, a, b in zip(("value", "d_x", "d_y", "d_scale"), got, want, strict=True):
        assert_close_fp64(a, b, what)


@pytest.mark.parametrize("exclude_pos", [False, True])
def test_local_pair_lse_vector_scales_and_no_db_gemm(exclude_pos, monkeypatch):
    """Per-anchor scales ([2, n]: temperature="individual"): in a world of one the local backward
    gives simlse's autograd of both directions with vector scales, the scales' gradient included
    (each sweep's drs); every backward sweep runs with need_db=False (no dB GEMM: the gathered
    side's gradient is never used)."""
    import gammacl._local_grad as local_grad
    from gammacl.distributed import World
    from gammacl.ops.simlse import simlse

    flags, real = [], local_grad._simlse_backward_op

    def spy(*args):
        flags.append(args[-1])
        return real(*args)

    monkeypatch.setattr(local_grad, "_simlse_backward_op", spy)
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(9, 6, generator=g, dtype=torch.float64) for _ in range(2))
    wx, wy = (torch.rand(9, generator=g, dtype=torch.float64) for _ in range(2))
    scales = 1.0 + torch.rand(2, 9, generator=g, dtype=torch.float64)

    def ref(a, b, s):
        row, col = simlse(a, b, s[0], exclude_pos=exclude_pos, backend="torch", col_scale=s[1])
        return (wx * row).sum() + (wy * col).sum()

    def ours(a, b, s):
        rx, ry, _ = local_grad.local_pair_lse(
            a, b, a, b, s, World(), offset=0, exclude_pos=exclude_pos, backend="torch"
        )
        return (wx * rx).sum() + (wy * ry).sum()

    want, got = _run(ref, x, y, scales), _run(ours, x, y, scales)
    for what, a, b in zip(("value", "d_x", "d_y", "d_scales"), got, want, strict=True):
        assert_close_fp64(a, b, what)
    assert flags == [False, False], flags


def test_scale_out_arguments_validated():
    import gammacl

    with pytest.raises(ValueError, match=r"grad_comm must be one of \('reduce', 'local'\)"):
        gammacl.ClipLoss(grad_comm="ring")
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        gammacl.ClipLoss(grad_comm="local", gather_with_grad=False)
    with pytest.raises(ValueError, match="grad_comm must be one of"):
        gammacl.SigLipLoss(grad_comm=None)
    with pytest.raises(ValueError, match="state_sharding must be one of"):
        gammacl.SogCLRLoss(10, state_sharding="sharded")
    for update in ("before", "after"):  # "owner" shards the EMA state on both paths
        assert gammacl.SogCLRLoss(10, update=update, state_sharding="owner").shard is not None
    with pytest.raises(ValueError, match=r"'owner' shards the moving-average.*got rate='fixed'"):
        gammacl.GammaClipLoss(10, rate="fixed", state_sharding="owner")
    with pytest.raises(ValueError, match=r"'owner' shards the moving-average.*got rate='batch'"):
        gammacl.GammaClipLoss(10, rate="batch", state_sharding="owner")
    from gammacl.distributed import set_agreement_check

    with pytest.raises(ValueError, match=r"one of \('always', 'first', 'off'\), got 'never'"):
        set_agreement_check("never")


def test_owner_checkpoint_of_another_world_refused_in_one_process():
    """A world of one: "owner" is the whole state, equal to "replicated" step by step; a shard
    saved by rank 1 of 4 is refused before any buffer is touched, naming both places."""
    import gammacl

    rep = gammacl.SogCLRLoss(SAMPLES, backend="torch")
    own = gammacl.SogCLRLoss(SAMPLES, backend="torch", state_sharding="owner", grad_comm="local")
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        img, txt = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
        idx = torch.randint(0, SAMPLES, (6,), generator=g)
        assert_close_fp64(own(img, txt, 2.0, idx), rep(img, txt, 2.0, idx), "loss")
    assert_close_fp64(own.image_rate.log_rate, rep.image_rate.log_rate, "state")
    sd = own.state_dict()
    sd["shard._extra_state"] = {"shard": (1, 4)}
    before = own.image_rate.log_rate.clone()
    with pytest.raises(ValueError, match=r"shard of rank 1 of 4, but this process is rank 0 of 1"):
        own.load_state_dict(sd)
    assert torch.equal(own.image_rate.log_rate, before)
    fresh = gammacl.SogCLRLoss(SAMPLES, backend="torch", state_sharding="owner")
    fresh.load_state_dict(own.state_dict())
    assert torch.equal(fresh.image_rate.log_rate, own.image_rate.log_rate)
