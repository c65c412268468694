"""python -m gammacl.experiments.retrieval (issue 16): metrics against explicit formulas, a tiny
in-process run (rows per method / seed / epoch, recall in [0, 1], trained beats chance), the
report merge, and the --quick CLI (slow: CI's separate step)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn (gammacl[experiments]) is not installed")

from gammacl import reference  # noqa: E402
from gammacl.experiments import retrieval as R  # noqa: E402

COLUMNS = {"method", "batch_size", "seed", "epoch", "recall_at_1", "recall_at_5"}


def test_data_split_fixed_and_disjoint_halves():
    tl, tr, el, er = R.load_pairs()
    assert tl.shape == tr.shape == (1347, 32) and el.shape == er.shape == (450, 32)
    tl2, _, el2, _ = R.load_pairs()
    assert torch.equal(tl, tl2) and torch.equal(el, el2)  # the split does not move
    from sklearn.datasets import load_digits

    img = torch.from_numpy(load_digits().images).float() / 16
    # every test left half is the left 4 columns of some image, and its pair the right 4
    k = int(((img[:, :, :4].reshape(-1, 32) - el[0]).abs().sum(1)).argmin())
    assert torch.equal(img[k, :, :4].reshape(32), el[0])
    assert torch.equal(img[k, :, 4:].reshape(32), er[0])


def test_recall_counts_rank_of_the_diagonal():
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.3], [0.1, 0.8, 0.7]])
    # row 0: diagonal first; row 1: second (0.5 > 0.4); row 2: second (0.8 > 0.7)
    assert R._recall(sim, 1) == pytest.approx(1 / 3)
    assert R._recall(sim, 2) == pytest.approx(1.0)
    assert R._recall(sim.T, 1) == pytest.approx(2 / 3)  # columns 0 and 2 first, column 1 second
    assert R._recall(sim.T, 2) == pytest.approx(1.0)
    assert R._recall(torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.0, 0.1], [0.3, 0.2, 0.1]]), 2) == (
        pytest.approx(0.0)
    )  # every row ranks its diagonal last of 3


def test_global_objective_and_measures_match_explicit_formulas():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    want = reference.gamma.global_contrastive_loss(a.double(), b.double(), 7.0)
    assert R.global_objective(a, b, 7.0) == pytest.approx(float(want), abs=1e-5)
    d2 = torch.cdist(a.double(), a.double()).square()
    off = ~torch.eye(40, dtype=torch.bool)
    unif = math.log(float(torch.exp(-2.0 * d2[off]).mean()))
    assert R.uniformity(a) == pytest.approx(unif, abs=1e-5)


def test_small_run_rows_and_learning(tmp_path):
    data = R.load_pairs()
    plan = [
        R.Method("clip", 64, "fixed"),
        R.Method("sogclr", 64, "learnable", ema=0.5, update="before"),
        R.Method("gamma", 64, "fixed", ema=0.5, shape=1.0, update="after"),
    ]
    rows = R.run_plan(plan, [0, 1], data, epochs=2, eval_every=1, backend="torch")
    assert len(rows) == 3 * 2 * 3  # methods x seeds x epochs {0, 1, 2}
    keys = {(r["method"], r["seed"], r["epoch"]) for r in rows}
    assert len(keys) == len(rows)
    for r in rows:
        assert COLUMNS <= set(r)
        for k in ("recall_at_1", "recall_at_5", "train_recall_at_1", "r1_l2r", "r1_r2l"):
            assert 0.0 <= r[k] <= 1.0
        assert r["recall_at_5"] >= r["recall_at_1"]
        assert math.isfinite(r["global_train_loss"]) and math.isfinite(r["global_test_loss"])
    chance = 1.0 / 450
    clip = [r for r in rows if r["method"] == "clip"]
    assert all(r["recall_at_1"] > 5 * chance for r in clip if r["epoch"] == 2)
    for seed in (0, 1):  # the global objective goes down with training
        e = {r["epoch"]: r for r in clip if r["seed"] == seed}
        assert e[2]["global_train_loss"] < e[0]["global_train_loss"] - 0.3
    fixed = [r for r in rows if r["scale"] == "fixed"]
    assert all(r["logit_scale"] == pytest.approx(10.0) for r in fixed)
    res = {"config": {}, "rows": rows, "wall_s": 1.0}
    R.write_json(res, str(tmp_path / "a.json"))
    out = R.report([str(tmp_path / "a.json")], str(tmp_path / "merged"))
    assert len(out["summary"]) == 3 and all(s["seeds"] == 2 for s in out["summary"])
    with open(tmp_path / "merged" / "retrieval.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_validation_split_is_carved_from_the_training_pairs():
    tl, tr, el, er = R.load_pairs()
    vl, vr, hl, hr = R.load_pairs(validation=300)
    assert vl.shape == (1047, 32) and hl.shape == (300, 32)
    train = {tuple(x.tolist()) for x in tl}
    assert all(tuple(x.tolist()) in train for x in hl)  # validation pairs come from training
    assert not {tuple(x.tolist()) for x in el} & {tuple(x.tolist()) for x in hl}
    assert not {tuple(x.tolist()) for x in vl} & {tuple(x.tolist()) for x in hl}


def test_learnable_temperature_plan_runs_and_reports_where_tau_went():
    plan = [m for m in R.temperature_plan([64], 1.0, 1.0, 0.01, epochs=2) if m.loss != "clip"]
    names = [m.name for m in plan]
    assert "sogclr ema=0.5 rgcl rho=1 no cap" in names and len(set(names)) == len(names)
    rows = R.run_plan(plan, [0], R.load_pairs(), epochs=1, eval_every=1, backend="torch")
    for r in rows:
        assert math.isfinite(r["global_test_loss_s10"]) and math.isfinite(r["global_train_loss"])
    ind = [r for r in rows if r["scale"] == "individual" and r["epoch"] == 1]
    assert ind and 0.01 <= ind[0]["tau_p10"] <= ind[0]["tau_mean"] <= ind[0]["tau_p90"] <= 1.0
    assert ind[0]["tau_mean"] != pytest.approx(0.1)  # the temperatures moved
    assert ind[0]["logit_scale"] == pytest.approx(1.0 / ind[0]["tau_mean"])
    uncapped = [r for r in rows if "no cap" in r["method"]]
    assert uncapped and all(r["logit_scale"] > 0 for r in uncapped)


@pytest.mark.slow
def test_quick_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gammacl.experiments.retrieval", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "mean±std over seeds" in proc.stdout
    with open(tmp_path / "retrieval.csv") as f:
        rows = list(csv.DictReader(f))
    assert COLUMNS <= set(rows[0])
    methods = {r["method"] for r in rows}
    import gammacl

    a = R.library_default(gammacl.GammaClipLoss, "shape")  # the library's defaults, by name
    e_s = R.library_default(gammacl.SogCLRLoss, "ema")
    e_g = R.library_default(gammacl.GammaClipLoss, "ema")
    assert methods == {
        "clip",
        "clip (full batch)",
        f"sogclr ema={e_s:g} before",
        f"gamma a={a:g} ema={e_g:g} before",
        f"gamma a={a:g} ema={e_g:g} after",
        "clip+fs",
        "clip+bb",
        "clip+gc",
    }
    per = {}
    for r in rows:
        assert 0.0 <= float(r["recall_at_1"]) <= 1.0
        per.setdefault((r["method"], r["batch_size"], r["scale"]), set()).add(
            (int(r["seed"]), int(r["epoch"]))
        )
    assert all(v == {(s, e) for s in (0, 1) for e in (0, 1, 2)} for v in per.values())
    trained = [float(r["recall_at_1"]) for r in rows if r["method"] == "clip" and r["epoch"] == "2"]
    assert trained and min(trained) > 5.0 / 450
    assert (tmp_path / "retrieval.json").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / "retrieval.png").stat().st_size > 1000


def test_only_names_outside_the_plan_are_an_error(capsys):
    with pytest.raises(SystemExit):
        R.main(["--only", "no-such-method", "--out", "unused"])
    assert "no-such-method" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s: two spawned workers import torch
def test_parallel_jobs_give_the_serial_rows_in_plan_order():
    """run_plan(jobs=2) (spawned worker processes) returns exactly the serial rows, in plan
    order."""
    data = R.load_pairs()
    plan = [R.Method("sogclr", 256, "fixed", ema=0.5), R.Method("clip", 128, "learnable")]
    kw = {"epochs": 1, "eval_every": 1, "backend": "torch"}
    serial = R.run_plan(plan, [0, 1], data, **kw)
    parallel = R.run_plan(plan, [0, 1], data, jobs=2, **kw)
    assert [(r["method"], r["seed"], r["epoch"]) for r in serial] == [
        (m.name, s, e) for m in plan for s in (0, 1) for e in (0, 1)
    ]
    assert parallel == serial
