"""Multi-process (gloo, 127.0.0.1) tests of gammacl.distributed, 2 and 3 ranks.

Each world size starts its processes once (module fixture); every rank runs all checks in one go
and reports one line per check through a queue, so a hang in one check still reports the others
and the fixture's hard timeout turns any hang into a failure. Values are compared inside the
workers (float64, tolerances.py); the parent asserts that every rank reported "ok" and compares
the error messages of the fail-fast checks across ranks.
"""

from __future__ import annotations

import queue
import time
import traceback
import warnings

import pytest
import torch

from gammacl._gloo import gloo_rank, spawn_ranks

TIMEOUT_S = 150  # whole run of one world size, start-up included
N_LOCAL, DIM = 5, 7

CLIP_CONFIGS = [(True, True), (False, True), (False, False), (True, False)]  # (local, with_grad)


# ----------------------------------------------------------------------------------------------
# ORACLE: a verbatim copy of open_clip's distributed ClipLoss logic (open_clip src/open_clip/
# loss.py, gather_features + ClipLoss.forward, torch.distributed path). It materialises the
# logits; tests compare gammacl against it, never the reverse.


def oracle_gather_features(
    image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1
):
    import torch.distributed as dist
    import torch.distributed.nn

    if gather_with_grad:
        all_image_features = torch.cat(torch.distributed.nn.all_gather(image_features), dim=0)
        all_text_features = torch.cat(torch.distributed.nn.all_gather(text_features), dim=0)
    else:
        gathered_image_features = [torch.zeros_like(image_features) for _ in range(world_size)]
        gathered_text_features = [torch.zeros_like(text_features) for _ in range(world_size)]
        dist.all_gather(gathered_image_features, image_features)
        dist.all_gather(gathered_text_features, text_features)
        if not local_loss:
            # ensure grads for local rank when all_* features don't have a gradient
            gathered_image_features[rank] = image_features
            gathered_text_features[rank] = text_features
        all_image_features = torch.cat(gathered_image_features, dim=0)
        all_text_features = torch.cat(gathered_text_features, dim=0)
    return all_image_features, all_text_features


def oracle_clip_loss(
    image_features, text_features, logit_scale, *, local_loss, gather_with_grad, rank, world_size
):
    import torch.nn.functional as F

    if world_size > 1:
        all_image_features, all_text_features = oracle_gather_features(
            image_features, text_features, local_loss, gather_with_grad, rank, world_size
        )
        if local_loss:
            logits_per_image = logit_scale * image_features @ all_text_features.T
            logits_per_text = logit_scale * text_features @ all_image_features.T
        else:
            logits_per_image = logit_scale * all_image_features @ all_text_features.T
            logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logit_scale * text_features @ image_features.T
    num_logits = logits_per_image.shape[0]
    labels = torch.arange(num_logits, device=image_features.device, dtype=torch.long)
    if world_size > 1 and local_loss:
        labels = labels + num_logits * rank
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


# END ORACLE
# ----------------------------------------------------------------------------------------------


def _global_batch(world: int, dtype=torch.float64, n: int = N_LOCAL, d: int = DIM):
    g = torch.Generator().manual_seed(1234 + world)
    img = torch.nn.functional.normalize(
        torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=1
    )
    txt = torch.nn.functional.normalize(
        img + 0.8 * torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=1
    )
    return img.to(dtype), txt.to(dtype)


def _grads(fn, img, txt, scale):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(img, txt, scale)
    gi, gt, gs = torch.autograd.grad(loss, (img, txt, scale), allow_unused=True)
    z = torch.zeros_like
    return (
        loss.detach(),
        gi if gi is not None else z(img),
        gt if gt is not None else z(txt),
        gs if gs is not None else z(scale),
    )


# ---------------------------------------------------------------------------------------------
# worker side


def _check_clip(rank, world, report):
    from tolerances import assert_close_dtype, assert_close_fp64

    import gammacl
    from gammacl import reference

    img, txt = _global_batch(world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    scale = torch.tensor(3.7, dtype=torch.float64)
    # single-process full-batch loss and gradients (float64 reference)
    full = _grads(lambda a, b, s: reference.clip_loss(a, b, s), img, txt, scale)

    for local, with_grad in CLIP_CONFIGS:
        key = f"clip local={local} grad={with_grad}"

        def run(local=local, with_grad=with_grad, key=key):
            loss_mod = gammacl.ClipLoss(
                local_loss=local,
                gather_with_grad=with_grad,
                rank=rank,
                world_size=world,
                backend="torch",
            )
            ours = _grads(loss_mod, img[sl], txt[sl], scale)
            ref = _grads(
                lambda a, b, s: oracle_clip_loss(
                    a,
                    b,
                    s,
                    local_loss=local,
                    gather_with_grad=with_grad,
                    rank=rank,
                    world_size=world,
                ),
                img[sl],
                txt[sl],
                scale,
            )
            for what, x, y in zip(("loss", "d_image", "d_text", "d_scale"), ours, ref, strict=True):
                assert_close_fp64(x, y, f"{key} {what} vs open_clip")
            # vs the single-process full batch: the factor each configuration gives
            if local:
                if with_grad:  # sum over ranks of loss_r = W * L
                    assert_close_fp64(ours[1], world * full[1][sl], f"{key} d_image = W dL")
                    assert_close_fp64(ours[2], world * full[2][sl], f"{key} d_text = W dL")
            else:
                assert_close_fp64(ours[0], full[0], f"{key} loss = full-batch loss")
                assert_close_fp64(ours[3], full[3], f"{key} d_scale = full-batch")
                factor = world if with_grad else 1  # open_clip #616
                assert_close_fp64(ours[1], factor * full[1][sl], f"{key} d_image = {factor} dL")
                assert_close_fp64(ours[2], factor * full[2][sl], f"{key} d_text = {factor} dL")
            return {"loss": float(ours[0]), "d_scale": float(ours[3])}

        report(key, run)

    def defaults_from_group():
        # rank / world_size taken from the default process group; non-contiguous features
        base_i = img[sl].detach().t().contiguous().requires_grad_()
        base_t = txt[sl].detach().t().contiguous().requires_grad_()
        s = scale.clone().requires_grad_()
        assert not base_i.t().is_contiguous()
        loss_mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=None, world_size=None, backend="torch"
        )
        loss = loss_mod(base_i.t(), base_t.t(), s)
        loss.backward()
        ref = _grads(
            lambda a, b, s_: oracle_clip_loss(
                a, b, s_, local_loss=True, gather_with_grad=True, rank=rank, world_size=world
            ),
            img[sl],
            txt[sl],
            scale,
        )
        assert_close_fp64(loss.detach(), ref[0], "loss")
        assert_close_fp64(base_i.grad.t(), ref[1], "d_image (non-contiguous input)")
        assert_close_fp64(base_t.grad.t(), ref[2], "d_text (non-contiguous input)")
        assert_close_fp64(s.grad, ref[3], "d_scale")

    report("clip defaults from process group, non-contiguous", defaults_from_group)

    def fp32():
        i32, t32 = _global_batch(world, torch.float32)
        s32 = torch.tensor(3.7, dtype=torch.float32)
        for local, with_grad in ((True, True), (False, False)):
            mod = gammacl.ClipLoss(
                local_loss=local,
                gather_with_grad=with_grad,
                rank=rank,
                world_size=world,
                backend="torch",
            )
            ours = _grads(mod, i32[sl], t32[sl], s32)

            def orc(a, b, s, local=local, with_grad=with_grad):
                return oracle_clip_loss(
                    a,
                    b,
                    s,
                    local_loss=local,
                    gather_with_grad=with_grad,
                    rank=rank,
                    world_size=world,
                )

            same = _grads(orc, i32[sl], t32[sl], s32)
            ref64 = _grads(orc, i32[sl].double(), t32[sl].double(), s32.double())
            assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
            for what, x, y, z in zip(
                ("loss", "d_image", "d_text", "d_scale"), ours, ref64, same, strict=True
            ):
                assert_close_dtype(x, y, z, torch.float32, f"fp32 local={local} {what}")

    report("clip fp32", fp32)

    def module_world_from_group():
        # ClipLoss(rank=None, world_size=None): rank and world size from the default group (a
        # TypeError here is a failure, never a skip)
        mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=None, world_size=None, backend="torch"
        )
        ours = _grads(mod, img[sl], txt[sl], scale)
        ref = _grads(
            lambda a, b, s_: oracle_clip_loss(
                a, b, s_, local_loss=True, gather_with_grad=True, rank=rank, world_size=world
            ),
            img[sl],
            txt[sl],
            scale,
        )
        for what, x, y in zip(("loss", "d_image", "d_text", "d_scale"), ours, ref, strict=True):
            assert_close_fp64(x, y, f"world_size=None {what}")
        labels = mod.get_ground_truth(torch.device("cpu"), N_LOCAL)
        assert labels.tolist() == list(range(rank * N_LOCAL, (rank + 1) * N_LOCAL))
        return {}

    report("clip module world from group", module_world_from_group)


def _check_fail_fast(rank, world, report):
    """Bad inputs on some ranks: the same ValueError on every rank, then the group still works."""
    import gammacl

    img, txt = _global_batch(world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    last = world - 1
    cases = {
        "uneven batch": lambda: (
            (img[sl][: N_LOCAL - 1], txt[sl][: N_LOCAL - 1]) if rank == last else (img[sl], txt[sl])
        ),
        "mismatched dim": lambda: (
            (img[sl][:, :-1], txt[sl][:, :-1]) if rank == 0 else (img[sl], txt[sl])
        ),
        "mismatched dtype": lambda: (
            (img[sl].float(), txt[sl].float()) if rank == last else (img[sl], txt[sl])
        ),
        "invalid on one rank": lambda: (
            (img[sl][0], txt[sl]) if rank == last else (img[sl], txt[sl])
        ),
    }
    for name, make in cases.items():

        def run(make=make):
            a, b = make()
            mod = gammacl.ClipLoss(
                local_loss=True, gather_with_grad=True, rank=rank, world_size=world, backend="torch"
            )
            t0 = time.perf_counter()
            try:
                mod(a, b, 2.0)
            except ValueError as e:
                if rank == last and make is cases["invalid on one rank"]:
                    assert isinstance(e.__cause__, ValueError), "local error not chained"
                return {"error": str(e), "seconds": time.perf_counter() - t0}
            raise AssertionError("no error raised")

        report(f"fail-fast {name}", run)

    def wrong_rank():
        mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=0, world_size=world, backend="torch"
        )
        try:
            mod(img[sl], txt[sl], 2.0)
        except ValueError as e:
            return {"error": str(e)}
        raise AssertionError("no error raised")

    report("fail-fast wrong rank=", wrong_rank)

    def still_in_sync():  # after all the errors above, a normal call on every rank works
        mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, backend="torch"
        )
        ref = oracle_clip_loss(
            img[sl],
            txt[sl],
            2.0,
            local_loss=True,
            gather_with_grad=True,
            rank=rank,
            world_size=world,
        )
        torch.testing.assert_close(mod(img[sl], txt[sl], 2.0), ref, rtol=1e-9, atol=1e-12)

    report("fail-fast then in sync", still_in_sync)


GAMMA_CONFIGS = {  # name -> (class name, constructor kwargs)
    "gamma ema before": ("GammaClipLoss", {"rate": "ema", "update": "before", "ema": 0.3}),
    "gamma ema after": (
        "GammaClipLoss",
        {"rate": "ema", "update": "after", "ema": 0.3, "shape": 2.0},
    ),
    "gamma batch": ("GammaClipLoss", {"rate": "batch"}),
    "gamma fixed": ("GammaClipLoss", {"rate": "fixed"}),
    "sogclr before": ("SogCLRLoss", {"ema": 0.5}),
}
G_LOCAL, G_SAMPLES, G_STEPS = 4, 20, 3


def _gamma_steps(world: int):
    """Per step: global features [W n, D] (float64) and global data-set indices [W n]; step 2
    revisits samples (EMA updates), step 3 repeats indices across ranks (duplicate rule)."""
    g = torch.Generator().manual_seed(99 + world)
    b = world * G_LOCAL
    steps = []
    for k in range(G_STEPS):
        img, txt = _global_batch(world, n=G_LOCAL)
        img = torch.nn.functional.normalize(
            img + 0.3 * torch.randn(img.shape, generator=g, dtype=img.dtype), dim=1
        )
        idx = torch.randperm(G_SAMPLES, generator=g)[:b]
        if k == G_STEPS - 1:  # all seen before (the one-pass path without an LSE pass)
            idx = steps[-1][2].roll(1).clone()
            idx[G_LOCAL] = idx[0]  # rank 0's first pair and rank 1's first pair: one sample
            idx[-1] = idx[1]
        steps.append((img, txt, idx))
    return steps


def _make_gamma(
    cls_name: str, kwargs: dict, seed: int, single: bool = False, backend: str = "torch"
):
    from gammacl import gamma

    cls = getattr(gamma, cls_name)
    kw = dict(kwargs, backend=backend)
    if single:
        kw["distributed"] = False  # the single-process reference, inside a distributed worker
    if cls_name == "GammaClipLoss":
        kw["generator"] = torch.Generator().manual_seed(seed)
    loss = cls(G_SAMPLES, **kw)
    if kw.get("rate") == "fixed":
        g = torch.Generator().manual_seed(5)
        loss.set_log_rates(torch.randn(G_SAMPLES, generator=g), torch.randn(G_SAMPLES, generator=g))
    return loss


def _gamma_call(loss, img, txt, s, idx):
    return loss(img, txt, s, idx)


def _check_gamma(rank, world, report):
    import torch.distributed as dist
    from tolerances import assert_close_fp64

    steps = _gamma_steps(world)
    sl = slice(rank * G_LOCAL, (rank + 1) * G_LOCAL)
    for key, (cls_name, kwargs) in GAMMA_CONFIGS.items():

        def run(cls_name=cls_name, kwargs=kwargs):
            single = _make_gamma(cls_name, kwargs, seed=7, single=True)
            # only rank 0's generator may matter: the others start from different seeds
            ours = _make_gamma(cls_name, kwargs, seed=7 if rank == 0 else 1000 + rank)
            paths = []
            for k, (img, txt, idx) in enumerate(steps):
                s = torch.tensor(4.0, dtype=torch.float64)
                ref = _grads(lambda a, b, s_, i=idx: single(a, b, s_, i), img, txt, s)
                got = _grads(
                    lambda a, b, s_, i=idx[sl]: _gamma_call(ours, a, b, s_, i), img[sl], txt[sl], s
                )
                # mean over ranks of the loss and of d_scale = the single-process values
                stats = torch.stack([got[0], got[3]]).reshape(2).clone()
                dist.all_reduce(stats)
                assert_close_fp64(stats[0] / world, ref[0], f"step {k} mean loss")
                assert_close_fp64(stats[1] / world, ref[3], f"step {k} mean d_scale")
                assert_close_fp64(got[1], world * ref[1][sl], f"step {k} d_image = W dL")
                assert_close_fp64(got[2], world * ref[2][sl], f"step {k} d_text = W dL")
                paths.append(ours.last_path)
                if ours.rate == "batch":
                    continue
                for name in ("image_rate", "text_rate"):
                    mine, theirs = getattr(ours, name), getattr(single, name)
                    flat = torch.cat([mine.log_rate.double(), mine.visited.double()])
                    every = [torch.empty_like(flat) for _ in range(world)]
                    dist.all_gather(every, flat)
                    assert all(torch.equal(e, flat) for e in every), (
                        f"step {k}: {name} differs between ranks"
                    )
                    assert torch.equal(mine.visited, theirs.visited), f"step {k} {name} visited"
                    assert_close_fp64(mine.log_rate, theirs.log_rate, f"step {k} {name}")
            return {"paths": paths}

        report(key, run)

    def nonfinite():
        # a NaN image row on rank 0 (or a NaN text row on the last rank): rows resting on it are
        # not stored, all others are, the same on every rank and as in a single process. On the
        # cpp backend too: the validity masks (gammacl.distributed._valid_local_estimates) must
        # not rely on the torch backend propagating NaN.
        cases = [
            (backend, side, kwargs)
            for backend in ("torch", "cpp")
            for side in ("image", "text")
            for kwargs in ({"rate": "ema", "update": "before"}, {"rate": "ema", "update": "after"})
        ]
        for backend, side, kwargs in cases:
            single = _make_gamma("GammaClipLoss", kwargs, seed=7, single=True, backend=backend)
            ours = _make_gamma("GammaClipLoss", kwargs, seed=7, backend=backend)
            for k, (img, txt, idx) in enumerate(steps[:2]):
                img, txt = img.clone(), txt.clone()
                if k == 1 and side == "image":
                    img[0, 0] = float("nan")
                elif k == 1:
                    txt[-1, 1] = float("nan")
                single(img, txt, 4.0, idx)
                _gamma_call(ours, img[sl], txt[sl], 4.0, idx[sl])
            for name in ("image_rate", "text_rate"):
                mine, theirs = getattr(ours, name), getattr(single, name)
                what = f"{backend} NaN {side} {kwargs} {name}"
                assert torch.equal(mine.visited, theirs.visited), f"{what} visited"
                assert torch.equal(mine.nonfinite, theirs.nonfinite), f"{what} count"
                assert int(mine.nonfinite) > 0
                assert_close_fp64(mine.log_rate, theirs.log_rate, what)
                flat = torch.cat([mine.log_rate.double(), mine.visited.double()])
                every = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(every, flat)
                assert all(torch.equal(e, flat) for e in every), f"{name} differs between ranks"

    report("gamma nonfinite", nonfinite)

    def fail_fast():
        out = {}
        img, txt, idx = steps[0]
        cases = {
            "uneven": (img[sl][:-1], txt[sl][:-1], idx[sl][:-1])
            if rank == world - 1
            else (img[sl], txt[sl], idx[sl]),
            "index out of range": (img[sl], txt[sl], idx[sl] + (G_SAMPLES if rank == 0 else 0)),
        }
        for name, (a, b, i) in cases.items():
            loss = _make_gamma("GammaClipLoss", {"rate": "ema"}, seed=7)
            try:
                _gamma_call(loss, a, b, 4.0, i)
            except ValueError as e:
                out[name] = str(e)
                assert not bool(loss.image_rate.visited.any()), "state changed by a failed step"
                continue
            raise AssertionError(f"{name}: no error raised")
        return out

    report("gamma fail-fast", fail_fast)


def _worker(rank: int, world: int, port: int, out, checks=None) -> None:
    warnings.simplefilter("ignore")  # torch.distributed.nn deprecation noise in the oracle

    def report(name, fn):
        try:
            res = fn()
            out.put((rank, name, "ok", res))
        except BaseException:  # noqa: BLE001 - reported to the parent verbatim
            out.put((rank, name, "FAIL", traceback.format_exc()))

    with gloo_rank(rank, world, port):
        try:
            for check in checks or (_check_clip, _check_fail_fast, _check_gamma):
                check(rank, world, report)
        finally:
            out.put((rank, "__done__", "ok", None))


# ---------------------------------------------------------------------------------------------
# parent side


def _run_world(world: int, checks=None) -> dict:
    """Runs `checks` (default: this module's) on `world` spawned ranks (`_worker`) and collects
    their reports {check: {rank: (status, payload)}}."""
    procs, q = spawn_ranks(_worker, world, (checks,) if checks is not None else ())
    results: dict = {}
    done = set()
    deadline = time.monotonic() + TIMEOUT_S
    while len(done) < world and time.monotonic() < deadline:
        try:
            rank, name, status, payload = q.get(timeout=1.0)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        if name == "__done__":
            done.add(rank)
        else:
            results.setdefault(name, {})[rank] = (status, payload)
    for p in procs:  # a rank that finished its checks only gets a short grace period to exit
        p.join(timeout=10.0)
    for p in procs:
        if p.is_alive():
            p.kill()
    results["__hung__"] = [r for r in range(world) if r not in done]
    results["__exitcodes__"] = [p.exitcode for p in procs]
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_run(request):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    world = request.param
    return world, _run_world(world)


def _ok(world_run, name):
    world, res = world_run
    assert not res["__hung__"], f"ranks {res['__hung__']} did not finish within {TIMEOUT_S}s"
    got = res.get(name, {})
    missing = [r for r in range(world) if r not in got]
    assert not missing, (
        f"{name}: no report from ranks {missing} (exit codes {res['__exitcodes__']})"
    )
    fails = {r: p for r, (s, p) in got.items() if s != "ok"}
    assert not fails, "\n".join(f"rank {r}:\n{p}" for r, p in fails.items())
    return [got[r][1] for r in range(world)]


@pytest.mark.parametrize("local,with_grad", CLIP_CONFIGS)
def test_clip_matches_open_clip_and_full_batch(world_run, local, with_grad):
    """Per rank: loss and every gradient equal open_clip's; vs the single-process full batch the
    loss averages to it (local_loss) or equals it, and the feature gradients carry open_clip's
    factor (W with gather_with_grad, #616; 1 without; none for local_loss without grad)."""
    from tolerances import assert_close_fp64

    world, _ = world_run
    per_rank = _ok(world_run, f"clip local={local} grad={with_grad}")
    if local:
        from gammacl import reference

        img, txt = _global_batch(world)
        s = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
        full = reference.clip_loss(img, txt, s)
        (ds,) = torch.autograd.grad(full, s)
        mean_loss = torch.tensor(sum(p["loss"] for p in per_rank) / world, dtype=torch.float64)
        mean_ds = torch.tensor(sum(p["d_scale"] for p in per_rank) / world, dtype=torch.float64)
        assert_close_fp64(mean_loss, full.detach(), "mean over ranks of loss_r = full loss")
        assert_close_fp64(mean_ds, ds, "mean over ranks of d_scale = full-batch d_scale")


def test_clip_defaults_from_group_noncontiguous(world_run):
    _ok(world_run, "clip defaults from process group, non-contiguous")


def test_clip_module_world_size_none(world_run):
    _ok(world_run, "clip module world from group")


def test_clip_fp32(world_run):
    _ok(world_run, "clip fp32")


@pytest.mark.parametrize(
    "case",
    ["uneven batch", "mismatched dim", "mismatched dtype", "invalid on one rank", "wrong rank="],
)
def test_fail_fast_same_error_on_every_rank(world_run, case):
    world, _ = world_run
    per_rank = _ok(world_run, f"fail-fast {case}")
    msgs = [p["error"] for p in per_rank]
    assert all(m == msgs[0] for m in msgs), "ranks raised different messages:\n" + "\n".join(msgs)
    msg = msgs[0]
    assert "ClipLoss" in msg and f"across the {world} ranks" in msg
    if case == "uneven batch":
        assert f"image_features ({N_LOCAL - 1}, {DIM})" in msg and "drop_last=True" in msg
        assert all(p["seconds"] < 30 for p in per_rank)
    elif case == "mismatched dim":
        assert f"image_features ({N_LOCAL}, {DIM - 1})" in msg
    elif case == "mismatched dtype":
        assert "float32" in msg and "float64" in msg
    elif case == "invalid on one rank":
        assert f"rank(s) [{world - 1}]" in msg and "image_features (7,) float64" in msg
    else:
        assert "rank= must equal" in msg and str([0] * world) in msg
    _ok(world_run, "fail-fast then in sync")


@pytest.mark.parametrize("config", list(GAMMA_CONFIGS))
def test_gamma_matches_single_process(world_run, config):
    """Every step: mean over ranks of the loss and d_scale = the single-process loss on the
    concatenated batch with the same draws (rank 0's generator; the others are seeded
    differently), feature gradients = W x the single-process ones, and the per-sample state
    bit-identical on every rank and equal to the single-process state."""
    per_rank = _ok(world_run, config)
    if config == "gamma ema after":  # first visits (LSE pass first), then all seen
        assert per_rank[0]["paths"] == ["lse+one_pass", "lse+one_pass", "one_pass"], per_rank


def test_gamma_nonfinite_rows_skipped_identically(world_run):
    _ok(world_run, "gamma nonfinite")


def test_gamma_fail_fast_same_error_on_every_rank(world_run):
    world, _ = world_run
    per_rank = _ok(world_run, "gamma fail-fast")
    for case in ("uneven", "index out of range"):
        msgs = [p[case] for p in per_rank]
        assert all(m == msgs[0] for m in msgs), "\n".join(msgs)
        assert "GammaClipLoss (distributed)" in msgs[0]
    assert f"index ({G_LOCAL - 1},) int64" in per_rank[0]["uneven"]
    assert "rank(s) [0]" in per_rank[0]["index out of range"]
