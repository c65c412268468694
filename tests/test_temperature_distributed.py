"""temperature="rgcl" and "individual" of GammaClipLoss / SogCLRLoss on 2 gloo ranks (issue 24),
against the single-process loss on the concatenated batch (float64, tests/tolerances.py).

Three steps of tests/test_distributed.py's `_gamma_steps` (global data-set indices; step 2
revisits samples, step 3 revisits only seen samples and repeats one across ranks), so the stored
rates and temperatures are read back. GammaClipLoss draws with rank 0's generator (broadcast):
the other ranks' generators are seeded differently, the single process's like rank 0's. Per
step, the conventions of tests/test_distributed.py and tests/test_scale_out.py
(docs/distributed.md; both grad_comm modes alike):
- loss: each rank returns the value of its own rows (loss_r); the mean over ranks is the
  single-process value (rgcl: tau (Ghat + rho); individual: F at the old temperatures);
- features: each rank's gradient is W x the single-process gradient of its rows (DDP's
  average of the ranks' gradients is then the full-batch gradient);
- logit_scale (rgcl): a per-rank share whose mean over ranks (what DDP applies) is the
  single-process dF/ds ("local"'s shares differ from "reduce"'s, their sums agree);
- individual: image_tau, text_tau, their momenta and both rate states are bit-identical on
  every rank and equal the single-process buffers after every step.
With grad_comm="local" no feature-sized tensor moves in backward: the 2 N upstream floats on
the two-pass path ("rgcl" and "individual", whose forward gathers every anchor's LSE and
temperature), nothing on the one-pass path.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import G_LOCAL, _gamma_steps, _make_gamma, _ok, _run_world
from test_scale_out import _rank_sum, _run
from tolerances import assert_close_fp64

_IND = {"rho": 0.8, "tau_lr": 0.05, "tau_momentum": 0.7, "tau_init": 0.1, "tau_min": 0.05}
TEMP_CONFIGS = {  # name -> (class name, constructor kwargs)
    "sogclr rgcl": ("SogCLRLoss", {"ema": 0.5, "temperature": "rgcl", "rho": 0.7}),
    "gamma rgcl": (
        "GammaClipLoss",
        {"rate": "ema", "ema": 0.3, "shape": 2.0, "temperature": "rgcl", "rho": 0.7},
    ),
    "gamma rgcl after": (  # the one-pass path (an LSE pass first on first visits)
        "GammaClipLoss",
        {"rate": "ema", "ema": 0.3, "shape": 2.0, "update": "after", "temperature": "rgcl"},
    ),
    "sogclr individual": ("SogCLRLoss", {"ema": 0.5, "temperature": "individual", **_IND}),
    "gamma individual": (
        "GammaClipLoss",
        {"rate": "ema", "ema": 0.3, "shape": 2.0, "temperature": "individual", **_IND},
    ),
}
BUFFERS = ("image_tau", "text_tau", "image_tau_momentum", "text_tau_momentum")


def _same_on_every_rank(x: torch.Tensor, what: str) -> None:
    import torch.distributed as dist

    flat = x.detach().double().reshape(-1)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    assert all(torch.equal(e, flat) for e in every), f"{what} differs between ranks"


def _check_buffers(ours, single, what: str) -> None:
    names = [(s, "log_rate") for s in ("image_rate", "text_rate")]
    names += [(s, "visited") for s in ("image_rate", "text_rate")]
    if ours.temperature == "individual":
        names += [(None, b) for b in BUFFERS]
    for sub, name in names:
        mine = getattr(ours if sub is None else getattr(ours, sub), name)
        theirs = getattr(single if sub is None else getattr(single, sub), name)
        _same_on_every_rank(mine, f"{what} {name}")
        assert_close_fp64(mine.double(), theirs.double(), f"{what} {name} vs single process")


def _check_temperature(rank, world, report):
    from gammacl.distributed import CommCounter

    steps = _gamma_steps(world)
    sl = slice(rank * G_LOCAL, (rank + 1) * G_LOCAL)
    for key, (cls_name, kwargs) in TEMP_CONFIGS.items():
        for grad_comm in ("reduce", "local"):

            def run(cls_name=cls_name, kwargs=kwargs, grad_comm=grad_comm):
                individual = kwargs["temperature"] == "individual"
                kw = dict(kwargs, grad_comm=grad_comm)
                single = _make_gamma(cls_name, kwargs, seed=7, single=True)
                ours = _make_gamma(cls_name, kw, seed=7 if rank == 0 else 1000 + rank)
                largest, seen = 0, set()
                for k, (img, txt, idx) in enumerate(steps):
                    scalars = () if individual else (torch.tensor(4.0 + k, dtype=torch.float64),)

                    def call(loss, i):
                        return lambda a, b, *s: loss(a, b, s[0] if s else None, i)

                    ref = _run(call(single, idx), img, txt, *scalars)
                    with CommCounter() as c:
                        got = _run(call(ours, idx[sl]), img[sl], txt[sl], *scalars, counter=c)
                    largest = max(largest, c.largest("backward"))
                    what = f"step {k}"
                    assert_close_fp64(_rank_sum(got[0]) / world, ref[0], f"{what} mean loss")
                    assert_close_fp64(got[1], world * ref[1][sl], f"{what} d_image = W dL")
                    assert_close_fp64(got[2], world * ref[2][sl], f"{what} d_text = W dL")
                    if not individual:
                        assert_close_fp64(_rank_sum(got[3]) / world, ref[3], f"{what} mean d_s")
                    _check_buffers(ours, single, what)
                    if k:  # the stored rates (and taus) of earlier steps are read back
                        assert seen & set(idx.tolist()), f"{what} revisits no sample"
                    seen |= set(idx.tolist())
                if individual:  # the temperatures moved (and off tau_init): not a vacuous check
                    assert bool((ours.image_tau[idx] != _IND["tau_init"]).all())
                    assert bool((ours.text_tau_momentum[idx] != 0).all())
                if grad_comm == "local":  # no N x D in backward
                    assert largest == (0 if ours._one_pass() else 2 * world * G_LOCAL * 8), largest
                else:
                    assert largest >= world * G_LOCAL * img.shape[1] * 8, largest
                return {"largest bwd bytes": largest, "path": ours.last_path}

            report(f"{key} {grad_comm}", run)


# ---------------------------------------------------------------------------------------------
# parent side


@pytest.fixture(scope="module")
def temp_run():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    return 2, _run_world(2, (_check_temperature,))


@pytest.mark.slow
@pytest.mark.parametrize("grad_comm", ["reduce", "local"])
@pytest.mark.parametrize("config", list(TEMP_CONFIGS))
def test_temperature_two_ranks_equal_single_process(temp_run, config, grad_comm):
    per_rank = _ok(temp_run, f"{config} {grad_comm}")
    if config == "gamma rgcl after":
        assert per_rank[0]["path"] == "one_pass", per_rank
