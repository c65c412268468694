"""The GPU self-check scripts' building blocks (bench/_gpucheck.py, used by
bench/check_cuda_gpu.py and bench/check_triton_gpu.py) run here on CPU tensors: with DEV set to
"cpu" and backend "cuda" routed to the CPU emulator (tests/cuda_emu), each parity case must pass
and each timing entry must come back without an error, so a GPU session's short device time is
not lost to a broken script. The scripts themselves refuse to run without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emu.routing import available, routed

BENCH = Path(__file__).resolve().parent.parent / "bench"
OK, WHY = available()


@pytest.fixture
def gpucheck(monkeypatch):
    if not OK:
        pytest.skip(f"CUDA emulation unavailable: {WHY}")
    monkeypatch.syspath_prepend(str(BENCH))
    import _gpucheck as G

    monkeypatch.setattr(G, "DEV", "cpu")
    with routed():
        yield G


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gpucheck_parity_cases_pass_on_the_emulated_cuda_backend(gpucheck, dtype):
    G = gpucheck
    cases = {
        "simlse": G.simlse_case("cuda", dtype, 37, 16, offset=1, exclude=True, nan_free=True),
        "simlse strided": G.simlse_case("cuda", dtype, 20, 8, strided=True, cols=False),
        "onepass": G.onepass_case("cuda", dtype, 37, 16),
        "onepass cap": G.onepass_case("cuda", dtype, 21, 8, clamp=-2.0, offset=1),
    }
    if dtype != torch.float64:
        cases["clip"] = G.clip_case("cuda", dtype, 33, 16)
    results: list = []
    for name, fn in cases.items():
        G.record(results, name, fn)
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert all(r["detail"].startswith("max|err|") or r["detail"] for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpucheck_onepass_case_passes_on_triton_interpreter(gpucheck, dtype):
    from gammacl.dispatch import interpreter_on, triton_importable

    if not (triton_importable() and interpreter_on()):
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    results: list = []
    gpucheck.record(results, "onepass", gpucheck.onepass_case("triton", dtype, 21, 8, offset=1))
    assert results[0]["ok"], results


def test_gpucheck_timing_entries_on_cpu(gpucheck):
    G = gpucheck
    flops = {"fwd_bwd_tflops_8N2D": ("fwd_bwd_ms", 8 * 64 * 64 * 16)}
    for entry in (G.time_clip_loss(64, 16, "cuda", flops), G.time_onepass(64, 16, "cuda")):
        assert "error" not in entry, entry
        assert len(entry["fwd_bwd_ms"]) == 3 and entry["fwd_bwd_ms"][0] > 0, entry
        assert entry["backend"] == "cuda" and entry["N"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("script", ["check_cuda_gpu.py", "check_triton_gpu.py"])
def test_gpu_check_scripts_refuse_without_a_gpu(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(BENCH / script), "--no-time"], capture_output=True, text=True,
        timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device visible" in res.stdout + res.stderr
