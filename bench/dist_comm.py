"""Bytes of every collective of one training step, per loss and scale-out mode, on W gloo ranks
(CPU), and the cost of the per-call metadata agreement (docs/distributed.md).

    python bench/dist_comm.py --world 2 4 [--n 64] [--dim 256] [--json out.json]
    python bench/dist_comm.py --model      the modelled step time at W = 8 .. 1024 (no ranks)

Each rank runs a warm-up step, then one step inside gammacl.distributed.CommCounter (a dispatch
mode that sees every c10d / functional collective, autograd's included), phase "forward" for
the loss call and "backward" for autograd.grad. Bytes are each collective's largest buffer (the
gathered output of an all-gather, the input of a reduce-scatter), summed per phase; rank 0's
counts are printed (every rank runs the same collectives). The agreement check is timed alone
(World.check, 200 calls) and against a whole step of the same loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

CASES = (  # (name, loss kind, scale-out modes)
    ("ClipLoss reduce", "clip", {"grad_comm": "reduce"}),
    ("ClipLoss local", "clip", {"grad_comm": "local"}),
    ("SigLipLoss reduce", "siglip", {"grad_comm": "reduce"}),
    ("SigLipLoss local", "siglip", {"grad_comm": "local"}),
    ("SogCLRLoss reduce/replicated", "sogclr", {"grad_comm": "reduce"}),
    ("SogCLRLoss local/replicated", "sogclr", {"grad_comm": "local"}),
    ("SogCLRLoss local/owner", "sogclr", {"grad_comm": "local", "state_sharding": "owner"}),
)


def _make(kind: str, modes: dict, rank: int, world: int, samples: int):
    import gammacl

    if kind == "clip":
        mod = gammacl.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, **modes
        )
        return lambda i, t, s, idx: mod(i, t, s)
    if kind == "siglip":
        mod = gammacl.SigLipLoss(rank=rank, world_size=world, **modes)
        bias = torch.tensor(-10.0, requires_grad=True)
        return lambda i, t, s, idx: mod(i, t, s, bias)
    mod = gammacl.SogCLRLoss(samples, **modes)
    return lambda i, t, s, idx: mod(i, t, s, idx)


def _step(fn, n, dim, rank, world, samples, g, counter=None):
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    idx = torch.arange(rank * n, (rank + 1) * n) % samples
    if counter is not None:
        counter.phase = "forward"
    loss = fn(img, txt, scale, idx)
    if counter is not None:
        counter.phase = "backward"
    torch.autograd.grad(loss, (img, txt, scale))


def _worker(rank: int, world: int, port: int, out, args) -> None:
    from gammacl._gloo import gloo_rank

    with gloo_rank(rank, world, port, timeout_s=120):
        _measure(rank, world, args, out)
        torch.distributed.barrier()


def _measure(rank: int, world: int, args, out) -> None:
    """Rank `rank`'s counts and timings; rank 0 puts the result on `out`."""
    import torch.distributed as dist

    from gammacl.distributed import CommCounter, World, set_agreement_check

    samples = 4 * world * args.n
    rows = []
    for name, kind, modes in CASES:
        fn = _make(kind, modes, rank, world, samples)
        g = torch.Generator().manual_seed(rank)
        _step(fn, args.n, args.dim, rank, world, samples, g)  # warm-up
        with CommCounter() as c:
            _step(fn, args.n, args.dim, rank, world, samples, g, c)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            _step(fn, args.n, args.dim, rank, world, samples, g)
        dist.barrier()
        step_ms = (time.perf_counter() - t0) / args.reps * 1e3
        rows.append(
            {
                "case": name,
                "forward": [(op, b) for p, op, b in c.records if p == "forward"],
                "backward": [(op, b) for p, op, b in c.records if p == "backward"],
                "forward_bytes": c.total("forward"),
                "backward_bytes": c.total("backward"),
                "step_ms": step_ms,
            }
        )
    # the agreement check alone (one W x K int64 all-gather + one host sync per call), a bare
    # all-gather of the same size, and a whole ClipLoss local step with the check every call
    # vs on the first call only (set_agreement_check)
    w = World.resolve()
    x = torch.randn(args.n, args.dim)
    args_ = [("image_features", x), ("text_features", x)]
    flags = [("rank", rank), ("world_size", world)]
    probe = torch.zeros(1 + 2 * 7 + 2, dtype=torch.int64)
    timed = {
        "check_ms": lambda: w.check("bench", args_, flags=flags),
        "bare_allgather_ms": lambda: w.gather(probe, with_grad=False),
    }
    for mode in ("always", "first"):
        fn = _make("clip", {"grad_comm": "local"}, rank, world, 1)
        g = torch.Generator().manual_seed(rank)
        timed[f"clip_local_step_{mode}_ms"] = lambda fn=fn, g=g: _step(
            fn, args.n, args.dim, rank, world, 1, g
        )
    times = {}
    for key, fn in timed.items():
        set_agreement_check("first" if key.endswith("first_ms") else "always")
        reps = 200 if "step" not in key else 4 * args.reps
        fn()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dist.barrier()
        times[key] = (time.perf_counter() - t0) / reps * 1e3
    set_agreement_check("always")
    if rank == 0:
        out.put({"world": world, "n": args.n, "dim": args.dim, "rows": rows, **times})


def run(world: int, args) -> dict:
    from gammacl._gloo import spawn_ranks

    procs, q = spawn_ranks(_worker, world, (args,), daemon=False)
    res = q.get(timeout=1800)
    for p in procs:
        p.join()
    return res


def _fmt(res: dict) -> str:
    w, n, d = res["world"], res["n"], res["dim"]
    lines = [
        f"W = {w}, n = {n} rows per rank, D = {d}, fp32 (N x D = {w * n * d * 4} bytes)",
        f"agreement check {res['check_ms']:.3f} ms per call (a bare all-gather of the same "
        f"int64 row: {res['bare_allgather_ms']:.3f} ms); ClipLoss local step with the check "
        f"on every call {res['clip_local_step_always_ms']:.1f} ms, on the first call only "
        f"{res['clip_local_step_first_ms']:.1f} ms",
        "",
        "| case | forward bytes | backward bytes | backward collectives | step ms (CPU) |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        bwd = ", ".join(f"{op} {b}" for op, b in r["backward"]) or "none"
        lines.append(
            f"| {r['case']} | {r['forward_bytes']} | {r['backward_bytes']} | {bwd} | "
            f"{r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


# the scale-out model of docs/distributed.md: ASSUMED rates, not measurements
NVLINK, INTER, FLOPS, ALPHA = 900e9, 50e9, 700e12, 5e-6  # B/s in a node of 8, B/s per GPU
# across nodes, bf16 dense FLOP/s, latency per tree level of one collective (s)


def _coll(nbytes: float, world: int) -> float:
    """Seconds of one all-gather / reduce-scatter whose full buffer is `nbytes`: each rank moves
    (W - 1) / W of it at NVLink rate inside one node of 8, at the inter-node rate beyond;
    latency ALPHA per level of a tree (ceil(log2 W) levels)."""
    bw = NVLINK if world <= 8 else INTER
    return ALPHA * math.ceil(math.log2(world)) + (world - 1) / world * nbytes / bw


def model(n: int = 512, dim: int = 1024, elem: int = 2) -> str:
    """Modelled step time per rank (ms, no compute / communication overlap) of the CLIP loss
    (local_loss rows: two n x N simlse sweeps at the 4-GEMM floor, 16 n N D FLOPs with
    "reduce", 12 n N D with "local", whose backwards skip the unused dB GEMM) and SigLIP (one
    fused sweep, 6 n N D; "local" two sweeps, 12 n N D)."""
    rows = [
        "| W | N | compute ms (reduce / local) | fwd gathers ms | reduce: bwd ms | "
        "local: extra ms | CLIP reduce ms | CLIP local ms | SigLIP reduce ms | SigLIP local ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in range(3, 11):
        w = 2**k
        big = w * n * dim * elem  # one gathered N x D feature buffer
        small = 2 * w * n * 4  # 2 N fp32 statistics
        comp = 16 * n * (w * n) * dim / FLOPS
        comp_loc = 12 * n * (w * n) * dim / FLOPS
        fwd = 2 * _coll(big, w)
        red_bwd = 2 * _coll(big, w)
        loc_extra = 2 * _coll(small, w)  # LSE gather (forward) + upstream gather (backward)
        sig_comp = 6 * n * (w * n) * dim / FLOPS
        sig_red = sig_comp + 2 * _coll(big, w)
        sig_loc = 2 * sig_comp + 2 * _coll(big, w)
        ms = [x * 1e3 for x in (fwd, red_bwd, loc_extra)]
        total = [(comp + fwd + red_bwd) * 1e3, (comp_loc + fwd + loc_extra) * 1e3]
        rows.append(
            f"| {w} | {w * n} | {comp * 1e3:.3f} / {comp_loc * 1e3:.3f} | "
            + " | ".join(f"{x:.3f}" for x in ms + total + [sig_red * 1e3, sig_loc * 1e3])
            + " |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--n", type=int, default=64, help="rows per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed steps per case")
    p.add_argument("--json", default=None, help="write every record here")
    p.add_argument("--model", action="store_true", help="print the scale-out model table only")
    args = p.parse_args(argv)
    if args.model:
        print(model())
        return 0
    results = [run(w, args) for w in args.world]
    for res in results:
        print(_fmt(res))
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
