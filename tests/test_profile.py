"""`python -m gammacl.profile` on CPU: the no-CUDA / no-NVML paths (null GPU columns, a plain
message, exit code 0), files and columns, OOM rows and the largest-N search (doubling then
bisection), the NVML UUID matching, and, on a GPU only, a known allocation read back."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import types

import pytest
import torch

from gammacl import profile
from gammacl.measure import inputs, memory, select
from gammacl.measure import nvml as nv

# the GPU memory columns: null on CPU (never a misleading 0)
GPU_COLS = tuple(c for c in profile.COLUMNS if c.startswith(("torch_", "nvml_")))
TINY = ["--d", "16", "--no-plot", "--loss", "clip", "--backend", "torch"]


def _run(tmp_path, *args: str) -> tuple[int, dict]:
    rc = profile.main([*args, "--out", str(tmp_path)])
    return rc, json.loads((tmp_path / "profile.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path")
def test_cpu_only_run(tmp_path, capsys):
    rc, js = _run(
        tmp_path,
        "--n", "64,128",
        "--d", "16",
        "--loss", "clip",
        "--backend", "torch,reference",
        "--impl", "gammacl,naive",
        "--n-max", "256",
        "--budget-mib", "64",
        "--snapshot",
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "process peak RSS" in err
    assert "--snapshot needs a CUDA device" in err
    with open(tmp_path / "profile.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == list(profile.COLUMNS) == js["columns"]
    assert js["views"]["torch_allocator"] == {"available": False, "reason": "no CUDA device"}
    assert js["views"]["nvml"]["available"] is False and js["views"]["nvml"]["error"]
    assert js["snapshots"] == []
    for r, c in zip(js["rows"], rows, strict=True):
        assert r["status"] == "ok" and r["fits"] is True and r["memory_view"] == "rss"
        assert r["rss_delta_mib"] >= 0  # clamped: never a negative size
        for col in GPU_COLS:  # null, never a misleading 0
            assert r[col] is None and c[col] == ""
        assert r["rss_peak_mib"] > 0 and r["rss_delta_mib"] is not None
        assert r["expected_extra_mib"] > 0 and r["expected_formula"]
        assert r["grads_mib"] == pytest.approx(2 * r["N"] * 16 * 4 / 2**20)
    summ = {s["label"]: s for s in js["summary"]}
    assert set(summ) == {"gammacl/clip/torch", "gammacl/clip/reference", "naive/clip/torch"}
    for s in summ.values():  # nothing fails at these sizes: the search stops at --n-max
        assert s["max_n_fits"] == 256 and s["search_capped"] is True and s["first_fail_n"] is None
    assert {r["N"] for r in js["rows"]} == {64, 128, 256}
    assert (tmp_path / "profile.csv").exists()


def test_cli_subprocess_memory_matches_analytic(tmp_path):
    """`python -m gammacl.profile` as users run it: the reference backend's N x N buffers show up
    in the RSS delta as the analytic model says (CPU; the CLI pins glibc's mmap threshold)."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU RSS view")
    cmd = [sys.executable, "-m", "gammacl.profile", "--n", "1024", "--d", "16", "--loss", "clip",
           "--backend", "reference", "--impl", "gammacl", "--no-search", "--budget-mib", "10",
           "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    js = json.loads((tmp_path / "profile.json").read_text())
    assert js["views"]["rss"]["malloc_mmap_threshold_pinned"] is True
    (r,) = js["rows"]
    assert r["expected_extra_mib"] == pytest.approx(3 * 1024**2 * 4 / 2**20)
    assert 0.8 * r["expected_extra_mib"] < r["rss_delta_mib"] < 1.2 * r["expected_extra_mib"]
    assert "largest N fits" in res.stdout
    # ~12 MiB measured against --budget-mib 10: one status says so, never "ok" beside fits=False
    assert (r["status"], r["fits"]) == ("over budget", False) and "> --budget-mib 10" in r["error"]
    assert " ok " not in next(ln for ln in res.stdout.splitlines() if " 1024 " in ln)


def test_nvml_not_installed(tmp_path, monkeypatch, capsys):
    def no_pynvml():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(nv, "_import_pynvml", no_pynvml)
    rc, js = _run(tmp_path, "--n", "64", *TINY, "--impl", "gammacl", "--no-search")
    assert rc == 0
    msg = "nvidia-ml-py (module pynvml) is not installed"
    assert msg in capsys.readouterr().err
    assert msg in js["views"]["nvml"]["error"] and js["views"]["nvml"]["available"] is False
    for r in js["rows"]:
        assert all(r[c] is None for c in GPU_COLS if c.startswith("nvml"))


def test_nvml_library_not_found(tmp_path, monkeypatch, capsys):
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    rc, js = _run(tmp_path, "--n", "64", *TINY, "--impl", "gammacl", "--no-search")
    assert rc == 0
    assert js["views"]["nvml"]["error"].startswith("NVMLError_LibraryNotFound")
    assert "no NVML device view: NVMLError_LibraryNotFound" in capsys.readouterr().err
    assert js["metadata"]["driver"] is None


def test_injected_oom_and_largest_n_search(tmp_path):
    rc, js = _run(tmp_path, "--n", "64,128,256", *TINY, "--impl", "gammacl,naive",
                  "--n-max", "1024", "--inject-oom", "gammacl/clip/torch:300")  # fmt: skip
    assert rc == 0
    rows = [r for r in js["rows"] if r["impl"] == "gammacl"]
    assert all(r["status"] == "ok" for r in rows if r["N"] < 300)
    assert all(r["fits"] == (r["status"] == "ok") for r in js["rows"])  # one consistent status
    ooms = [r for r in rows if r["N"] >= 300]
    assert ooms and all(r["status"] == "OOM" and r["fits"] is False for r in ooms)
    assert all(r["phase"] == "search" for r in ooms)
    summ = {s["label"]: s for s in js["summary"]}
    s = summ["gammacl/clip/torch"]
    assert 256 <= s["max_n_fits"] < 300 <= s["first_fail_n"]
    assert s["first_fail_n"] - s["max_n_fits"] <= 8
    assert s["search_capped"] is False and s["fail_reason"].startswith("OOM: injected OOM")
    # the sweep went on: naive is unaffected and reaches the cap
    n = summ["naive/clip/torch"]
    assert n["max_n_fits"] == 1024 and n["search_capped"] is True
    # "largest N" in words: a measured limit vs the search cap only
    assert s["largest_n"] == f"{s['max_n_fits']} (measured limit: fails at {s['first_fail_n']})"
    assert n["largest_n"] == "fits up to the search cap (1024); limit not reached"


def test_cpu_budget_precheck_skips_large_points(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU budget applies only on CPU")
    # reference at N=128: analytic 3 * 128^2 * 4 B = 0.1875 MiB > 2 x 0.08 MiB -> not run
    rc, js = _run(tmp_path, "--n", "32,128", *TINY[:-1], "reference", "--impl", "gammacl",
                  "--no-search", "--budget-mib", "0.08")  # fmt: skip
    assert rc == 0
    big = next(r for r in js["rows"] if r["N"] == 128)
    assert big["status"] == "skipped" and big["fits"] is False and "budget" in big["error"]
    assert big["rss_delta_mib"] is None


def test_search_max_n():
    calls = []

    def fits(n):
        calls.append(n)
        return n < 1000

    lo, hi, capped = profile.search_max_n(
        fits, known_ok=None, known_fail=None, start=64, cap=1 << 20
    )
    assert lo < 1000 <= hi and hi - lo <= max(8, lo // 32) and not capped
    assert calls[:5] == [64, 128, 256, 512, 1024]  # doubling, then bisection
    search = profile.search_max_n
    assert search(lambda n: True, known_ok=64, known_fail=None, start=64, cap=200) == (
        200,
        None,
        True,
    )
    assert search(lambda n: False, known_ok=None, known_fail=None, start=64, cap=512) == (
        None,
        1,
        False,
    )
    lo, hi, _ = profile.search_max_n(lambda n: n <= 37, known_ok=None, known_fail=64, start=64,
                                     cap=512)  # fmt: skip
    assert lo <= 37 < hi


def _fake_nvml(uuids, mig=None):
    """A stand-in pynvml: devices by index with UUIDs, optional MIG children on device 0."""
    mig = mig or []

    class H:
        def __init__(self, uuid):
            self.uuid = uuid

    devs = [H(u) for u in uuids]
    migs = [H(u) for u in mig]
    return (
        types.SimpleNamespace(
            nvmlDeviceGetCount=lambda: len(devs),
            nvmlDeviceGetHandleByIndex=lambda i: devs[i],
            nvmlDeviceGetUUID=lambda h: h.uuid.encode(),
            nvmlDeviceGetMigMode=lambda h: (1, 1) if (h is devs[0] and migs) else (0, 0),
            nvmlDeviceGetMaxMigDeviceCount=lambda h: len(migs),
            nvmlDeviceGetMigDeviceHandleByIndex=lambda h, j: migs[j],
        ),
        devs,
        migs,
    )


def test_nvml_handle_matched_by_uuid_not_index():
    # CUDA_VISIBLE_DEVICES=1: torch's device 0 is NVML's device 1; the UUID decides
    nvml, devs, _ = _fake_nvml(["GPU-aaaa-0000", "GPU-bbbb-1111"])
    h, where = nv.nvml_handle_for_uuid(nvml, "bbbb-1111")
    assert h is devs[1] and where == "NVML device 1"
    nvml, _, migs = _fake_nvml(["GPU-aaaa-0000"], mig=["MIG-cccc-2222", "MIG-dddd-3333"])
    h, where = nv.nvml_handle_for_uuid(nvml, "MIG-dddd-3333")
    assert h is migs[1] and where == "NVML device 0 MIG 1"
    with pytest.raises(LookupError, match="no NVML device has the UUID"):
        nv.nvml_handle_for_uuid(nvml, "eeee")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_known_allocation_is_reported():
    """A 256 MiB tensor is seen within 1 MiB by the torch view; NVML's delta is at least that."""
    dev = torch.device("cuda", torch.cuda.current_device())
    nvml = nv.open_nvml(dev)
    step = inputs.Step(lambda: None, [])
    mem = memory.measure_memory(lambda: torch.empty(256 * 2**20, dtype=torch.uint8, device=dev),
                                step, dev, nvml=nvml, sample_ms=1.0)  # fmt: skip
    extra = (mem["peak_allocated"] - mem["base_allocated"]) / 2**20
    assert abs(extra - 256) <= 1
    if nvml.ok:
        assert (mem["nvml_peak"] - mem["nvml_before"]) / 2**20 >= 256 - 1


def test_memory_deltas_clamped_at_zero():
    assert memory.delta_mib(100, 100 + 2**20) == 0.0  # RSS below what it was: 0, not -1 MiB
    assert memory.delta_mib(2**20, 0, 2**21) == 0.0  # grads not visible in RSS: 0, not -1 MiB
    assert memory.delta_mib(3 * 2**20, 2**20) == 2.0
    assert memory.delta_mib(None, 0) is None


def test_summary_first_unavailable_backend_and_error_exit(tmp_path, capsys, monkeypatch):
    """The summary is printed first (gammacl's largest N against the naive loss's, the cap told
    from a measured limit); --backend torch,cuda without cuda records a cuda row 'unavailable'
    and runs torch; a gammacl row with status=error makes the exit code 1."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where the cuda backend is unavailable")
    rc, js = _run(tmp_path, "--n", "64", "--d", "16", "--no-plot", "--loss", "clip",
                  "--backend", "torch,cuda", "--impl", "gammacl,naive", "--n-max", "256",
                  "--inject-oom", "naive:200")  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "summary (largest N that fits; against the naive materialised loss):"
    naive = next(s for s in js["summary"] if s["impl"] == "naive")
    lim = f"naive {naive['max_n_fits']} (measured limit: fails at {naive['first_fail_n']})"
    assert out[1] == (
        "  gammacl/clip/torch D=16 fp32: fits up to the search cap (256); limit not reached; "
        f"{lim}; >= {256 / naive['max_n_fits']:.3g}x the naive N"
    )
    assert out[2].startswith("  gammacl/clip/cuda D=16 fp32: unavailable (backend cuda is")
    cuda = [r for r in js["rows"] if r["backend"] == "cuda"]
    assert len(cuda) == 1 and cuda[0]["status"] == "unavailable" and cuda[0]["fits"] is False

    def broken(f):
        raise RuntimeError("boom")

    from gammacl.measure import registry

    orig = registry.our_impls
    monkeypatch.setattr(
        select,
        "our_impls",
        lambda *a, **k: [dataclasses.replace(i, build=broken) for i in orig(*a, **k)],
    )
    rc, js = _run(tmp_path, "--n", "64", *TINY, "--impl", "gammacl", "--no-search")
    assert rc == 1 and js["rows"][0]["status"] == "error"
    assert "gammacl rows failed with an error" in capsys.readouterr().err
