"""`python -m gammacl.bench` on CPU: arguments, files and columns, OOM / error rows, the loss-value
check against the float64 reference, the TRITON_INTERPRET refusal, the optional plot.
Sweeps are tiny (N <= 128, D = 16, --min-time 0) so each run takes about a second."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from gammacl import _measure as M
from gammacl import bench

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
        assert 0 < r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
        assert r["reps"] >= 3
        # GPU columns are null on CPU (never 0); CPU memory is the RSS delta
        assert r["peak_allocated_mib"] is None and r["peak_reserved_mib"] is None
        assert r["extra_over_inputs_mib"] is None
        assert r["rss_peak_delta_mib"] is not None
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
    for mode in M.MODES:
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
                return M.naive_clip(a, b, f.scale)
            raise RuntimeError("boom in forward")

        return M.Step(fwd, [a, b])

    orig = M.peer_impls

    def peers(*args, **kw):
        return [
            M.Impl("brokenA", "clip", "torch", broken_build, M.flops_two_pass),
            M.Impl("brokenB", "clip", "torch", broken_mode, M.flops_two_pass),
        ] + orig(*args, **kw)

    monkeypatch.setattr(M, "peer_impls", peers)
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip", "--impl", "naive")
    assert rc == 0
    st = {(r["impl"], r["mode"]): (r["status"], r["error"]) for r in js["rows"]}
    for mode in M.MODES:
        assert st[("brokenA", mode)] == ("error", "ValueError: boom at build")
        assert st[("brokenB", mode)] == ("error", "RuntimeError: boom in forward")
        assert st[("naive", mode)] == ("ok", None)


def test_check_mismatch_is_loud_and_fails(tmp_path, monkeypatch, capsys):
    def wrong(f):
        a, b = f.feat(0), f.feat(1)
        return M.Step(lambda: 1.01 * M.naive_clip(a, b, f.scale), [a, b, f.scale])

    orig = M.peer_impls
    monkeypatch.setattr(
        M,
        "peer_impls",
        lambda *a, **k: (
            orig(*a, **k)
            + [M.Impl("wrongpeer", "clip", "torch", wrong, M.flops_two_pass, reference=M._ref_clip)]
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
    png = tmp_path / "run1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run1.csv").exists() and (tmp_path / "run1.json").exists()


def test_no_matplotlib_no_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "pyplot", lambda: None)
    rc = _plot_run(tmp_path, "--n", "64", "--impl", "gammacl", "--mode", "fwd")
    assert rc == 0
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_import_does_not_load_matplotlib():
    code = "import sys, gammacl.bench, gammacl.profile; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_quantiles_interpolate():
    assert M._quantiles([4.0, 1.0, 3.0, 2.0, 5.0], (0.2, 0.5, 0.8)) == [1.8, 3.0, 4.2]
    assert M._quantiles([7.0], (0.2, 0.5, 0.8)) == [7.0, 7.0, 7.0]


def test_inject_spec():
    inj = M.InjectOOM("naive:100")
    inj.check("naive/clip/torch", 99)
    inj.check("gammacl/clip/torch", 500)
    with pytest.raises(torch.OutOfMemoryError, match="injected OOM"):
        inj.check("naive/clip/torch", 100)
    assert M.classify_error(torch.OutOfMemoryError("CUDA out of memory. Tried ..."))[0] == "OOM"
    assert M.classify_error(RuntimeError("DefaultCPUAllocator: can't allocate memory"))[0] == "OOM"
    assert M.classify_error(ValueError("x")) == ("error", "ValueError: x")


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
    assert all(r["status"] == "ok" and r["check"] == "ok" for r in by.values())
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
    monkeypatch.setattr(M, "CHECK_MATERIALISED_MAX_N", 32)  # as if N=64 were a huge first shape
    rc, js, _ = _run(tmp_path, "--n", "64", *FAST, "--loss", "clip,infonce", "--backend",
                     "reference", "--impl", "gammacl,naive", "--mode", "fwd")  # fmt: skip
    assert rc == 0
    for c in js["checks"]:
        assert c["check"] == "ok" and c["reference_impl"] == "gammacl torch backend, float64"
        assert c["abs_diff"] < 1e-4
