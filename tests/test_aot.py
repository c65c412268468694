"""`python -m gammacl.aot`: the ahead-of-time compile check (real Triton compiler, sm_90, no
GPU). It runs in a subprocess without TRITON_INTERPRET (the kernels must be real JITFunctions).

* a deliberately broken kernel (tl.dot with K = 8, which the interpreter runs and the compiler
  rejects) is reported as an error with a non-zero exit, next to a good kernel reported ok;
* over the AOT table: every kernel has fp16, bf16, fp32 and fp64 rows, every row compiled, and
  the default 16-bit configs of every matmul kernel use wgmma with zero spills on sm_90, none
  serialised (ptxas C7515), the CLIP W kernel at >= 2 CTAs per SM. The table is the JSON of
  CI's own AOT steps (triton 3.9 and 3.6.0) when GAMMACL_AOT_JSON names them, else computed
  here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the AOT check needs triton")

NO_MMA = {"_simlse_col_merge_kernel"}  # kernels without a matrix product
BROKEN = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def _good_kernel(X, OUT, K: tl.constexpr):
        offs = tl.arange(0, 16)
        x = tl.load(X + offs[:, None] * K + tl.arange(0, K)[None, :])
        tl.store(OUT + offs, tl.sum(x.to(tl.float32), axis=1))


    @triton.jit
    def _broken_kernel(X, OUT, K: tl.constexpr):
        offs = tl.arange(0, 16)
        x = tl.load(X + offs[:, None] * K + tl.arange(0, K)[None, :])
        s = tl.dot(x, tl.trans(x))  # K = 8 < 16: no tensor-core shape takes it
        tl.store(OUT + offs[:, None] * 16 + offs[None, :], s)


    def aot_launches(dtype: torch.dtype, d: int) -> None:
        x = torch.zeros(16, 8, dtype=dtype)
        out = torch.zeros(16, 16, dtype=torch.float32)
        _good_kernel[(1,)](x, out, K=8)
        _broken_kernel[(1,)](x, out, K=8)
    """
)


def _aot(*args: str, tmp_path: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "gammacl.aot", "--jobs", "2", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_a_broken_kernel_is_reported_as_an_error(tmp_path):
    (tmp_path / "aot_broken.py").write_text(BROKEN)
    out = tmp_path / "rows.json"
    res = _aot(
        "--op", "aot_broken", "--extra", "aot_broken", "--dtype", "fp16", "--d", "64",
        "--json", str(out), tmp_path=tmp_path, extra_path=str(tmp_path),
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"_good_kernel", "_broken_kernel"}, rows
    assert rows["_good_kernel"]["ok"] and rows["_good_kernel"]["registers"] > 0
    bad = rows["_broken_kernel"]
    assert not bad["ok"] and bad["error"], bad
    assert "ERROR _broken_kernel" in res.stdout and "1 errors" in res.stdout, res.stdout


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> list[dict]:
    given = os.environ.get("GAMMACL_AOT_JSON")  # one table, or several joined by os.pathsep
    if given:
        return [r for f in given.split(os.pathsep) for r in json.loads(Path(f).read_text())]
    tmp = tmp_path_factory.mktemp("aot")
    res = _aot("--quiet", "--json", str(tmp / "aot.json"), tmp_path=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads((tmp / "aot.json").read_text())


@pytest.mark.slow
def test_aot_table_every_kernel_every_dtype_compiles(table):
    assert table and all(r["arch"] == 90 for r in table)
    bad = [(r["kernel"], r["dtype"], r["config"], r["error"]) for r in table if not r["ok"]]
    assert not bad, bad
    kernels = {r["kernel"] for r in table}
    assert {"_simlse_fwd_kernel", "_simlse_bwd_kernel", "_gamma_onepass_fwd_kernel"} <= kernels
    every = {"fp16", "bf16", "fp32", "fp64"}
    # the fused (small-D) kernels take every dtype; the large-D GEMM-tiled kernels of simlse /
    # gamma_onepass only the dtypes the launchers route to them (16-bit and fp32; fp64 and fp16
    # one-pass gamma stay fused), so those are held to exactly that set: a new dtype there must
    # show up here
    large_d = {
        "_simlse_fwd_tile_kernel": {"fp16", "bf16", "fp32"},
        "_simlse_bwd_w_kernel": {"fp16", "bf16", "fp32"},
        "_gamma_onepass_tile_kernel": {"bf16", "fp32"},
        # the shared GEMM also serves siglip's chunked path, which takes every dtype above D 64
        "_gemm_kernel": every,
    }
    for k in kernels:
        assert {r["dtype"] for r in table if r["kernel"] == k} == large_d.get(k, every), k
    for op in {r.get("op") for r in table if r.get("op")}:
        assert {r["dtype"] for r in table if r.get("op") == op} == every, op


@pytest.mark.slow
def test_aot_default_16bit_configs_use_wgmma_without_spills(table):
    rows = [r for r in table if r["dtype"] in ("fp16", "bf16") and not r.get("autotune")]
    assert rows
    assert NO_MMA <= {r["kernel"] for r in rows}
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} D={r['D']} {r['config']}"
        assert r["spills"] == 0, f"{where}: {r['spill_stores']}/{r['spill_loads']} B spilled"
        if r["kernel"] not in NO_MMA:
            assert r["mma"] == "wgmma", f"{where}: {r['mma']}"


def test_ctas_per_sm_arithmetic():
    from gammacl.aot import ctas_per_sm

    # sm_90: registers in 256-register units per warp; 65536 per SM
    assert ctas_per_sm(128, 98304, 8) == 2  # 8 * 4096 = 32768 registers per CTA
    assert ctas_per_sm(129, 98304, 8) == 1  # 136 * 32 = 4352 per warp: 34816 per CTA
    assert ctas_per_sm(255, 98304, 8) == 1
    assert ctas_per_sm(167, 73728, 4) == 3  # 168 * 32 * 4 = 21504: 3; smem 3 * 73 KiB fits
    assert ctas_per_sm(64, 73728, 4) == 3  # shared memory: 233472 // (73728 + 1024)
    assert ctas_per_sm(32, 2048, 4) == 16  # threads: 2048 // 128
    assert ctas_per_sm(16, 0, 1) == 32  # the CTA cap
    assert ctas_per_sm(64, 167936 - 1024, 4, arch=80) == 1


def test_wgmma_serialized_read_from_the_ptxas_log():
    from gammacl.aot import wgmma_serialized

    warn = (
        "ptxas /tmp/x.ptx, line 512; warning : Potential Performance Loss: wgmma.mma_async "
        "instructions are serialized due to insufficient register resources for the wgmma "
        "pipeline in the function '_gemm_kernel'"
    )
    assert wgmma_serialized(warn)
    assert wgmma_serialized("ptxas warning (C7515): ...")
    assert not wgmma_serialized("ptxas info    : Used 106 registers, used 1 barriers")


@pytest.mark.slow
def test_aot_default_16bit_configs_async_and_occupancy(table):
    """Every row says whether ptxas serialised its wgmma (C7515) and how many CTAs fit an SM;
    no default 16-bit config serialises; the CLIP W kernel (HAS_Y=1) keeps >= 2 CTAs per SM at
    D = 1024; the accumulating dB GEMM of the chunked backward (ACCUM=1) is compiled."""
    ok = [r for r in table if r["ok"]]
    assert ok and all("wgmma_serialized" in r and r["ctas_per_sm"] >= 1 for r in ok)
    default16 = [r for r in ok if r["dtype"] in ("fp16", "bf16") and not r.get("autotune")]
    serial = [(r["kernel"], r["dtype"], r["D"], r["config"]) for r in default16
              if r["wgmma_serialized"]]  # fmt: skip
    assert not serial, serial
    for dt in ("bf16", "fp16"):
        w = [r for r in default16 if r["kernel"] == "_simlse_bwd_w_kernel" and r["dtype"] == dt
             and r["D"] == 1024 and "EXCLUDE=0 HAS_Y=1" in r["config"]]  # fmt: skip
        assert w and all(r["ctas_per_sm"] >= 2 for r in w), w
    accum = [r for r in ok if r["kernel"] == "_gemm_kernel" and "ACCUM=1" in r["config"]]
    chunked = {(r["op"], r["dtype"]) for r in accum if r.get("multi_chunk")}
    assert {("simlse", "bf16"), ("simlse", "fp16")} <= chunked, chunked
