"""`python -m gammacl.bench` on CPU: arguments, files and columns, the spread of the timings and
their flags, OOM / error rows, the loss-value check against the float64 reference, the
TRITON_INTERPRET refusal, the optional plots (summary first, cases after).
Sweeps are tiny (N <= 128, D = 16, --min-time 0) so each run takes about a second."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import types

import pytest
import torch

from gammacl import bench
from gammacl.measure import cli, inputs, peers, plots, registry, select, timing
from gammacl.measure.flops import flops_two_pass
from gammacl.measure.registry import Impl

FAST = ["--d", "16", "--min-time", "0", "--no-plot"]


def _run(tmp_path, *args: str) -> tuple[int, dict, list[dict]]:
    rc = bench.main([*args, "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench.json").read_text()) if rc in (0, 1) else {}
    with open(tmp_path / "bench.csv") as fh:
        csv_rows = list(csv.DictReader(fh)) if rc in (0, 1) else []
    return rc, payload, csv_rows


def test_files_columns_metadata(tmp_path):
    rc, js, rows = _run(
        tmp_path,
        "--n",
        "64,96",
        *FAST,
        "--loss",
        "clip",
        "--backend",
        "torch,reference",
        "--impl",
        "gammacl,naive,gemm_floor",
    )
    assert rc == 0
    with open(tmp_path / "bench.csv") as fh:
        assert next(csv.reader(fh)) == list(bench.COLUMNS)
    assert js["columns"] == list(bench.COLUMNS)
    labels = {(r["impl"], r["loss"], r["backend"]) for r in js["rows"]}
    assert labels == {
        ("gammacl", "clip", "torch"),
        ("gammacl", "clip", "reference"),
        ("naive", "clip", "torch"),
        ("gemm_floor", "floor", "torch"),
    }
    assert len(js["rows"]) == len(rows) == 4 * 2 * 3  # impls x N x modes
    meta = js["metadata"]
    for key in (
        "device_name",
        "driver",
        "torch",
        "triton",
        "torch_cuda",
        "gammacl",
        "git_commit",
        "date_utc",
        "timer",
        "cpu",
    ):
        assert key in meta
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu"
    assert "perf_counter" in meta["timer"]
    for r in js["rows"]:
        assert r["status"] == "ok", r
        t = [r[k] for k in timing.TIME_KEYS]  # min, p20, p50, p80, max of the calls
        assert 0 < t[0] and t == sorted(t) and t[0] < t[-1]
        assert r["reps"] >= 5
        assert r["time_spread"] == pytest.approx((t[3] - t[1]) / t[2], rel=1e-9)
        # GPU columns are null on CPU (never 0); CPU memory is the RSS delta
        assert r["peak_allocated_mib"] is None and r["peak_reserved_mib"] is None
        assert r["extra_over_inputs_mib"] is None
        assert r["rss_peak_delta_mib"] is not None and r["rss_peak_delta_mib"] >= 0
        assert r["inputs_mib"] == pytest.approx(2 * r["N"] * 16 * 4 / 2**20)
        k = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[r["mode"]]
        assert r["flops"] == k * r["N"] ** 2 * 16
        assert r["flop_formula"].startswith(f"{k}*N^2*D")
        assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms_p50"] * 1e-3) / 1e12, rel=1e-4)
        if r["impl"] == "gemm_floor":
            assert r["check"].startswith("n/a")
        else:
            assert r["check"] == "ok" and r["check_abs_diff"] < 1e-4
    for r in rows:  # CSV: null is an empty cell
        assert r["peak_allocated_mib"] == "" and r["status"] == "ok"
    checks = {c["label"]: c for c in js["checks"]}
    ref = checks["gammacl/clip/torch"]["reference"]
    a = torch.nn.functional.normalize(
        torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1
    )
    b = torch.nn.functional.normalize(
        torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=1
    )
    import gammacl

    assert ref == pytest.approx(float(gammacl.reference.clip_loss(a, b, 1 / 0.07)), rel=1e-6)
    assert checks["gammacl/clip/torch"]["shape"] == "N=64 D=16 fp32"


def test_injected_oom_rows_and_sweep_continues(tmp_path):
    rc, js, _ = _run(
        tmp_path,
        "--n",
        "64,96,128",
        *FAST,
        "--loss",
        "clip",
        "--backend",
        "torch",
        "--impl",
        "naive,gammacl",
        "--inject-oom",
        "naive:96",
    )
    assert rc == 0
    by = {(r["impl"], r["N"], r["mode"]): r for r in js["rows"]}
    for mode in cli.MODES:
        assert by[("naive", 64, mode)]["status"] == "ok"
        for n in (96, 128):
            r = by[("naive", n, mode)]
            assert r["status"] == "OOM" and "injected OOM" in r["error"]
            assert r["time_ms_p50"] is None and r["tflops"] is None
        for n in (64, 96, 128):  # the other implementation, before and after the OOMs
            assert by[("gammacl", n, mode)]["status"] == "ok"


def test_error_rows_never_crash(tmp_path, monkeypatch):
    def broken_build(f):
        raise ValueError("boom at build")

    def broken_mode(f):
        a, b = f.feat(0), f.feat(1)

        def fwd():
            if not torch.is_grad_enabled():
                return peers.naive_clip(a, b, f.scale)
            raise RuntimeError("boom in forward")

        return inputs.Step(fwd, [a, b])

    orig = peers.peer_impls

    def fake_peers(*args, **kw):
        return [
            Impl("brokenA", "clip", "torch", broken_build, flops_two_pass),
            Impl("brokenB", "clip", "torch", broken_mode, flops_two_pass),
        ] + orig(*args, **kw)

    monkeypatch.setattr(select, "peer_impls", fake_peers)
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip", "--impl", "naive")
    assert rc == 0
    st = {(r["impl"], r["mode"]): (r["status"], r["error"]) for r in js["rows"]}
    for mode in cli.MODES:
        assert st[("brokenA", mode)] == ("error", "ValueError: boom at build")
        assert st[("brokenB", mode)] == ("error", "RuntimeError: boom in forward")
        assert st[("naive", mode)] == ("ok", None)


def test_check_mismatch_is_loud_and_fails(tmp_path, monkeypatch, capsys):
    def wrong(f):
        a, b = f.feat(0), f.feat(1)
        return inputs.Step(lambda: 1.01 * peers.naive_clip(a, b, f.scale), [a, b, f.scale])

    orig = peers.peer_impls
    monkeypatch.setattr(
        select,
        "peer_impls",
        lambda *a, **k: (
            orig(*a, **k)
            + [Impl("wrongpeer", "clip", "torch", wrong, flops_two_pass, reference=peers._ref_clip)]
        ),
    )
    rc, js, _ = _run(tmp_path, "--n", "64,96", *FAST, "--loss", "clip", "--impl", "naive")
    assert rc == 1
    err = capsys.readouterr().err
    assert "CHECK MISMATCH: wrongpeer/clip/torch" in err
    for r in js["rows"]:
        assert r["check"] == ("MISMATCH" if r["impl"] == "wrongpeer" else "ok")
    chk = next(c for c in js["checks"] if c["label"] == "wrongpeer/clip/torch")
    assert chk["abs_diff"] == pytest.approx(0.01 * chk["reference"], rel=1e-3)


def test_refuses_triton_under_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = bench.main(["--n", "64", *FAST, "--backend", "triton", "--out", str(tmp_path)])
    assert rc == 2
    assert "refusing --backend triton" in capsys.readouterr().err
    assert not (tmp_path / "bench.csv").exists()
    rc, js, _ = _run(
        tmp_path,
        "--n",
        "64",
        *FAST,
        "--loss",
        "clip",
        "--impl",
        "gammacl",
        "--backend",
        "all",
        "--mode",
        "fwd",
    )
    assert rc == 0
    assert "triton" not in {r["backend"] for r in js["rows"]}
    assert any("backend triton skipped: TRITON_INTERPRET=1" in n for n in js["notes"])


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--mode", "fwd,sideways"], "unknown mode"),
        (["--impl", "nosuchpeer"], "--impl: unknown"),
        (["--loss", "nosuchloss"], "--loss: unknown"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, msg):
    assert bench.main(["--n", "64", *FAST, *args, "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def _plot_run(tmp_path, *args: str) -> int:
    """bench.main with the plot left on: clip on the torch backend, D = 16, no minimum time."""
    return bench.main([*args, "--d", "16", "--min-time", "0", "--loss", "clip", "--backend",
                       "torch", "--out", str(tmp_path)])  # fmt: skip


def test_plot_written_when_matplotlib_present(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the optional 'plot' extra")
    rc = _plot_run(tmp_path, "--n", "64,128", "--impl", "gammacl,gemm_floor", "--mode", "fwd+bwd",
                   "--name", "run1")  # fmt: skip
    assert rc == 0
    for png in (tmp_path / "run1.png", tmp_path / "run1-cases.png"):  # summary, then the cases
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run1.csv").exists() and (tmp_path / "run1.json").exists()


def test_no_matplotlib_no_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "pyplot", lambda: None)
    rc = _plot_run(tmp_path, "--n", "64", "--impl", "gammacl", "--mode", "fwd")
    assert rc == 0
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_import_does_not_load_matplotlib():
    code = "import sys, gammacl.bench, gammacl.profile; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_quantiles_interpolate():
    assert timing.quantiles([4.0, 1.0, 3.0, 2.0, 5.0], (0.2, 0.5, 0.8)) == [1.8, 3.0, 4.2]
    assert timing.quantiles([7.0], (0.2, 0.5, 0.8)) == [7.0, 7.0, 7.0]


def test_inject_spec():
    inj = cli.InjectOOM("naive:100")
    inj.check("naive/clip/torch", 99)
    inj.check("gammacl/clip/torch", 500)
    with pytest.raises(torch.OutOfMemoryError, match="injected OOM"):
        inj.check("naive/clip/torch", 100)
    assert (
        timing.classify_error(torch.OutOfMemoryError("CUDA out of memory. Tried ..."))[0] == "OOM"
    )
    assert (
        timing.classify_error(RuntimeError("DefaultCPUAllocator: can't allocate memory"))[0]
        == "OOM"
    )
    assert timing.classify_error(ValueError("x")) == ("error", "ValueError: x")


class _FakeStateLoss(torch.nn.Module):
    """Stand-in with GammaClipLoss / SogCLRLoss's constructor and forward signatures (the value
    is the CLIP loss, enough to exercise the registry, FLOP formulas and the check)."""

    def __init__(self, num_samples, *, shape=1.0, rate="ema", ema=0.1, update="before",
                 generator=None, backend="auto"):  # fmt: skip
        super().__init__()
        self.backend = backend
        self.register_buffer("log_r", torch.zeros(num_samples))

    def forward(self, image, text, logit_scale, index, output_dict=False):
        import gammacl

        assert index.shape == (image.shape[0],) and self.log_r.shape == index.shape
        return gammacl.clip_loss(image, text, logit_scale, backend=self.backend)


def test_gamma_and_sogclr_appear_when_present(tmp_path, monkeypatch):
    import gammacl

    monkeypatch.setattr(gammacl, "GammaClipLoss", _FakeStateLoss, raising=False)
    monkeypatch.setattr(gammacl, "SogCLRLoss", _FakeStateLoss, raising=False)
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "gamma_twopass,gamma_onepass,sogclr",
                     "--backend", "torch", "--impl", "gammacl")  # fmt: skip
    assert rc == 0
    by = {(r["loss"], r["mode"]): r for r in js["rows"]}
    assert {k[0] for k in by} == {"gamma_twopass", "gamma_onepass", "sogclr"}
    assert all(r["check"] == "ok" for r in by.values())
    # the one-pass gradient comes out of its forward: no backward row of its own
    assert {k: r["status"] for k, r in by.items() if r["status"] != "ok"} == {
        ("gamma_onepass", "bwd"): "in_fwd"
    }
    assert by[("gamma_twopass", "fwd+bwd")]["flops"] == 8 * 64**2 * 16
    assert by[("sogclr", "fwd+bwd")]["flops"] == 8 * 64**2 * 16
    assert by[("gamma_onepass", "fwd+bwd")]["flops"] == 6 * 64**2 * 16
    assert by[("gamma_onepass", "fwd+bwd")]["flop_formula"].startswith("6*N^2*D (one-pass")
    assert by[("gamma_onepass", "fwd")]["flops"] is None
    assert by[("gamma_onepass", "fwd")]["tflops"] is None


def test_modality_regularisers_are_benchmarked(tmp_path):
    pytest.importorskip("gammacl.modality")
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "uniformity,geometric_consistency",
                     "--backend", "torch", "--impl", "gammacl", "--mode", "fwd+bwd")  # fmt: skip
    assert rc == 0
    by = {r["loss"]: r for r in js["rows"]}
    assert set(by) == {"uniformity", "geometric_consistency"}
    assert by["uniformity"]["backend"] == "torch" and by["geometric_consistency"]["backend"] == "-"
    for r in by.values():
        assert r["status"] == "ok" and r["check"] == "ok", r
    assert by["geometric_consistency"]["flops"] == 14 * 64 * 16**2


def test_check_above_materialised_limit_uses_chunked_fp64(tmp_path, monkeypatch):
    monkeypatch.setattr(
        registry, "CHECK_MATERIALISED_MAX_N", 32
    )  # as if N=64 were a huge first shape
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip,infonce", "--backend",
                     "reference", "--impl", "gammacl,naive", "--mode", "fwd")  # fmt: skip
    assert rc == 0
    for c in js["checks"]:
        assert c["check"] == "ok" and c["reference_impl"] == "gammacl torch backend, float64"
        assert c["abs_diff"] < 1e-4


def _trow(impl, mode, p50, spread=0.1, loss="clip", n=64):
    return {"impl": impl, "loss": loss, "backend": "torch", "N": n, "D": 16, "dtype": "fp32",
            "mode": mode, "status": "ok", "time_ms_min": p50 * (1 - spread),
            "time_ms_p20": p50 * (1 - spread / 2), "time_ms_p50": p50,
            "time_ms_p80": p50 * (1 + spread / 2), "time_ms_max": p50 * (1 + spread),
            "timing_flag": None, "tflops": None, "expected_extra_mib": None,
            "rss_peak_delta_mib": 0.0}  # fmt: skip


def test_flag_timings_marks_noise_and_parts_slower_than_the_whole():
    rows = [_trow("a", "fwd", 22.2), _trow("a", "bwd", 5.0), _trow("a", "fwd+bwd", 16.8),
            _trow("b", "fwd", 1.0, spread=1.2), _trow("b", "bwd", 2.0),
            _trow("b", "fwd+bwd", 3.0)]  # fmt: skip
    assert bench.flag_timings(rows) == 2
    flags = {(r["impl"], r["mode"]): r["timing_flag"] for r in rows}
    assert flags[("a", "fwd")] == "fwd>fwd+bwd"  # the committed clip/torch N=1024 case
    assert flags[("b", "fwd")] == "noisy"
    assert flags[("a", "bwd")] is None and flags[("b", "fwd+bwd")] is None
    assert rows[3]["time_spread"] == pytest.approx(1.2)


def test_cpu_modes_interleaved_and_spread_kept():
    calls = []
    step = inputs.Step(lambda: None, [])
    fns = {m: (lambda m=m: calls.append(m)) for m in ("fwd", "bwd", "fwd+bwd")}
    cfg = timing.TimingConfig(warmup=1, min_reps=5, min_time_s=0.0)
    res = timing.time_modes(fns, step, torch.device("cpu"), cfg)
    assert calls[3:9] == ["fwd", "bwd", "fwd+bwd"] * 2  # after the warm-ups: call by call
    for r in res.values():
        assert r["reps"] == 5 and r["time_ms_min"] <= r["time_ms_p50"] <= r["time_ms_max"]

    def boom():
        raise RuntimeError("mode failed")

    res = timing.time_modes({"fwd": boom, "bwd": fns["bwd"]}, step, torch.device("cpu"), cfg)
    assert isinstance(res["fwd"], RuntimeError) and res["bwd"]["reps"] == 5


def test_quick_runs_gamma_on_every_cpu_backend():
    def impl(loss, be, quick_all=True):
        return Impl("gammacl", loss, be, None, flops_two_pass, quick_all_backends=quick_all)

    impls = [impl(lo, be) for lo in ("clip", "gamma_onepass", "sogclr")
             for be in ("torch", "cpp", "reference")]  # fmt: skip
    impls += [impl("uniformity", be, False) for be in ("torch", "cpp")]
    impls += [impl("orthogonality", "-", False)]
    kept = {(i.loss, i.backend) for i in bench._quick_filter(impls, [])}
    assert {("gamma_onepass", "torch"), ("gamma_onepass", "cpp"), ("sogclr", "cpp")} <= kept
    assert ("gamma_onepass", "reference") not in kept and ("clip", "reference") in kept
    assert ("uniformity", "torch") in kept and ("uniformity", "cpp") not in kept
    assert ("orthogonality", "-") in kept
    losses = {lo.name: lo for lo in registry.LOSSES}
    assert all(losses[n].quick_all_backends for n in ("gamma_twopass", "gamma_onepass", "sogclr"))


def test_row_wise_losses_are_not_drawn_against_the_gemm_floor(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need the optional 'plot' extra")
    pytest.importorskip("gammacl.modality")
    impls, _ = select.select_impls(
        types.SimpleNamespace(impl="gammacl", loss="all", backend="torch"),
        torch.device("cpu"),
        for_profile=False,
    )
    scaling = {i.loss: i.scaling for i in impls}
    assert scaling["orthogonality"] == scaling["brownian_bridge"] == "N*D"
    assert scaling["geometric_consistency"] == "N*D^2" and scaling["clip"] == "N^2*D"
    drawn = []
    orig = plots._draw_time

    def spy(ax, sel, lab, **style):
        drawn.append((ax.get_title(), {r["loss"] for r in sel}, lab))
        return orig(ax, sel, lab, **style)

    monkeypatch.setattr(plots, "_draw_time", spy)
    rows = [_trow(i, "fwd+bwd", t * n / 64, loss=lo, n=n)
            for i, lo, t in (("gammacl", "clip", 1.0), ("gammacl", "orthogonality", 0.1),
                             ("gemm_floor", "floor", 0.5))
            for n in (64, 128)]  # fmt: skip
    for r in rows[-2:]:
        r["rss_peak_delta_mib"] = None
    assert plots.plot_bench_cases(rows, tmp_path / "c.png", "t", scaling=scaling)
    floors = [d for d in drawn if d[2] == "gemm_floor"]
    assert len(floors) == 1 and floors[0][1] == {"floor"}
    assert any(d[1] == {"orthogonality"} for d in drawn)
    drawn.clear()
    assert plots.plot_bench_summary(rows, tmp_path / "s.png", "t", scaling=scaling,
                                    mem_col="rss_peak_delta_mib", mem_label="m")  # fmt: skip
    assert [d[2] for d in drawn].count("4-GEMM floor") == 1  # under clip, not orthogonality


def test_log_axes_keep_zero_and_negative_free_values():
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots need the optional 'plot' extra")
    fig, (a, b) = plt.subplots(1, 2)
    plots.set_yscale(a, [0.0, 1.0, 10.0])  # a 0 MiB point stays on the axis
    plots.set_yscale(b, [0.5, 1.0, 10.0])
    assert a.get_yscale() == "symlog" and a.get_ylim()[0] == 0 and b.get_yscale() == "log"
    plt.close(fig)


def test_siglip_panel_beside_clip_until_gammacl_has_one():
    sc = {"clip": "N^2*D", "siglip": "N^2*D"}
    rows = [_trow("gammacl", "fwd+bwd", 1.0), _trow("siglip_kernel", "fwd+bwd", 1.0, loss="siglip")]
    assert plots.summary_losses(rows, sc) == ["clip"]
    assert plots._in_panel(rows[1], "clip", plots._panel_loss(rows))
    rows.append(_trow("gammacl", "fwd+bwd", 1.0, loss="siglip"))  # gammacl.siglip_loss registered
    assert plots.summary_losses(rows, sc) == ["clip", "siglip"]
    panel = plots._panel_loss(rows)
    assert not plots._in_panel(rows[1], "clip", panel) and plots._in_panel(rows[1], "siglip", panel)


def test_unavailable_backend_rows_and_the_others_run(tmp_path, capsys):
    """--backend torch,cuda without the cuda backend: torch rows measured, cuda rows say why."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where the cuda backend is unavailable")
    rc, js, rows = _run(
        tmp_path, "--n", "64", *FAST, "--loss", "clip", "--backend", "torch,cuda",
        "--impl", "gammacl", "--mode", "fwd+bwd",
    )  # fmt: skip
    assert rc == 0
    st = {r["backend"]: r for r in js["rows"]}
    assert st["torch"]["status"] == "ok" and st["torch"]["time_ms_p50"] > 0
    assert st["cuda"]["status"] == "unavailable" and "backend cuda" in st["cuda"]["error"]
    assert st["cuda"]["time_ms_p50"] is None and len(rows) == 2
    assert bench.main(["--n", "64", *FAST, "--backend", "cuda", "--out", str(tmp_path)]) == 2


def test_error_row_of_gammacl_fails_the_run(tmp_path, monkeypatch, capsys):
    spec = next(s for s in registry.LOSSES if s.name == "clip")

    def broken(backend):
        def build(f):
            raise TypeError("cannot create weak reference to 'torch._C.Generator' object")

        return build

    losses = [dataclasses.replace(s, build=broken) if s is spec else s for s in registry.LOSSES]
    monkeypatch.setattr(registry, "LOSSES", losses)
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip,infonce", "--backend", "torch",
                     "--impl", "gammacl", "--mode", "fwd")  # fmt: skip
    assert rc == 1
    st = {r["loss"]: r["status"] for r in js["rows"]}
    assert st == {"clip": "error", "infonce": "ok"}
    assert "1 gammacl rows failed with an error" in capsys.readouterr().err


def test_rows_written_as_measured(tmp_path, monkeypatch):
    """A run killed after its first group keeps that group's rows in NAME.csv."""
    calls = []
    orig = timing.time_modes

    def killed_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the step's timeout
        return orig(*a, **k)

    monkeypatch.setattr(timing, "time_modes", killed_second_time)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--n", "64,96", *FAST, "--loss", "clip", "--backend", "torch",
                    "--impl", "gammacl", "--out", str(tmp_path)])  # fmt: skip
    with open(tmp_path / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["N"], r["mode"], r["status"]) for r in rows] == [("64", m, "ok") for m in cli.MODES]
    assert all(float(r["time_ms_p50"]) > 0 for r in rows)


def test_gradient_in_forward_rows_and_summary_first(tmp_path, capsys):
    """One-pass gamma and SigLIP compute their gradient in the forward: bwd rows say so (no
    time); CLIP's is timed. The summary comes first: gammacl vs the naive loss at the largest N."""
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip,gamma_onepass,siglip",
                     "--backend", "torch", "--impl", "gammacl,naive",
                     "--mode", "bwd,fwd+bwd")  # fmt: skip
    assert rc == 0
    by = {(r["impl"], r["loss"], r["N"], r["mode"]): r for r in js["rows"]}
    for loss in ("gamma_onepass", "siglip"):
        r = by[("gammacl", loss, 64, "bwd")]
        assert r["status"] == "in_fwd" and r["time_ms_p50"] is None
        assert "gradient computed in the forward" in r["error"]
        assert by[("gammacl", loss, 64, "fwd+bwd")]["status"] == "ok"
    assert by[("gammacl", "clip", 64, "bwd")]["status"] == "ok"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("summary (fwd+bwd; largest N measured")
    ours, naive = by[("gammacl", "clip", 64, "fwd+bwd")], by[("naive", "clip", 64, "fwd+bwd")]
    r = naive["time_ms_p50"] / ours["time_ms_p50"]
    gain = f"{r:.3g}x faster" if r >= 1 else f"{1 / r:.3g}x slower"
    assert out[1].startswith("  clip N=64 D=16 fp32: gammacl/torch ") and gain in out[1]
    assert out[2].startswith("  gamma_onepass N=64") and "vs naive" in out[2]
    assert out[3].startswith("  siglip N=64") and "no open_clip_siglip row" in out[3]
    assert out[4] == ""


def test_geometric_consistency_forms_and_gram_yardstick(tmp_path):
    """The registered geometric-consistency family (Gram form with the augmented pair, the
    materialised pairwise forms) checks against the float64 pairwise reference; the gemm_gram
    yardstick goes with it and counts one [D, N] @ [N, D] GEMM."""
    pytest.importorskip("gammacl.modality")
    forms = ",".join("geometric_consistency_" + f for f in ("aug", "pairwise", "pairwise_aug"))
    rc, js, _ = _run(tmp_path, "--n", "48,64", *FAST, "--loss", forms, "--impl",
                     "gammacl,gemm_gram", "--mode", "fwd+bwd")  # fmt: skip
    assert rc == 0
    by = {(r["impl"], r["loss"], r["N"]): r for r in js["rows"]}
    assert {k[1] for k in by} == set(forms.split(",")) | {"floor_gram"}
    for r in by.values():
        assert r["status"] == "ok", r
    for c in js["checks"]:
        if c["label"].startswith("gammacl/"):
            assert c["check"] == "ok" and c["abs_diff"] <= 1e-4 * (1 + abs(c["reference"])), c
    assert by[("gemm_gram", "floor_gram", 64)]["flops"] == 2 * 64 * 16**2
    assert by[("gammacl", "geometric_consistency_aug", 48)]["flops"] == 34 * 48 * 16**2
