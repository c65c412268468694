"""Compile checks of the CUDA sources, runnable without a GPU or a CUDA build of torch.

* every csrc/*.cu is compiled by the machine's nvcc for sm_80 and sm_90 (one invocation, two
  -gencode targets) with no torch include path: the kernels must not depend on torch headers. The
  half/bf16 guard macros torch.utils.cpp_extension passes are set too, so the real build agrees.
* every csrc/*_cuda.cpp (the torch side) is syntax-checked by the host compiler against this torch's
  headers and the CUDA toolkit's. CPU wheels of torch ship the ATen/c10 CUDA headers but not
  c10/cuda/impl/cuda_cmake_macros.h, and a bare toolkit may lack the cuBLAS / cuSPARSE / cuSOLVER
  headers ATen/cuda/CUDAContext.h includes: missing ones are replaced by the minimal stubs below
  (declarations copied from the cuBLAS documentation). If a new *_cuda.cpp needs more of those
  libraries' API on such a machine, extend the stubs.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
BINDING_FILES = sorted(CSRC.glob("*_cuda.cpp"))
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

# nvcc and host-compiler builds take ~10-15 s each: CI's slow step
pytestmark = pytest.mark.slow


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH)")


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm80_and_sm90(src, tmp_path):
    cmd = [
        NVCC, "-std=c++17", "-O3", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")),
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-I", str(CSRC), "-I", str(CSRC / "platform"), "-Xcompiler", "-fPIC",
        "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def test_cu_files_exist():
    assert CU_FILES, f"no .cu files in {CSRC}"


_STUBS = {
    "cublas_v2.h": """
        #pragma once
        #include <cuda_runtime_api.h>
        #include <library_types.h>
        typedef struct cublasContext* cublasHandle_t;
        typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1 }
            cublasStatus_t;
        typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
        typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 }
            cublasPointerMode_t;
        typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
        typedef enum { CUBLAS_COMPUTE_16F = 64, CUBLAS_COMPUTE_32F = 68,
                       CUBLAS_COMPUTE_32F_FAST_TF32 = 77, CUBLAS_COMPUTE_64F = 70 }
            cublasComputeType_t;
        extern "C" {
        cublasStatus_t cublasGetPointerMode(cublasHandle_t, cublasPointerMode_t*);
        cublasStatus_t cublasSetPointerMode(cublasHandle_t, cublasPointerMode_t);
        const char* cublasGetStatusString(cublasStatus_t);
        cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
            cublasOperation_t transb, int m, int n, int k, const void* alpha, const void* A,
            cudaDataType_t Atype, int lda, const void* B, cudaDataType_t Btype, int ldb,
            const void* beta, void* C, cudaDataType_t Ctype, int ldc,
            cublasComputeType_t computeType, cublasGemmAlgo_t algo);
        }
    """,
    "cublasLt.h": "#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": """
        #pragma once
        typedef struct cusparseContext* cusparseHandle_t;
        typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;
        extern "C" const char* cusparseGetErrorString(cusparseStatus_t);
    """,
    "cusolver_common.h": """
        #pragma once
        typedef enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 }
            cusolverStatus_t;
    """,
    "cusolverDn.h": """
        #pragma once
        #include "cusolver_common.h"
        typedef struct cusolverDnContext* cusolverDnHandle_t;
    """,
}


def _cuda_include() -> Path | None:
    if NVCC is None:
        return None
    inc = Path(NVCC).resolve().parent.parent / "include"
    return inc if (inc / "cuda_runtime_api.h").exists() else None


@pytest.mark.parametrize("src", BINDING_FILES, ids=lambda p: p.name)
def test_cuda_binding_compiles_against_torch_headers(src, tmp_path):
    import textwrap

    from torch.utils import cpp_extension

    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h next to nvcc)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx!r})")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in _STUBS.items():
        if not (inc / name).exists():
            (stubs / name).write_text(textwrap.dedent(text))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-I", str(CSRC), "-I", str(CSRC / "platform")]
    torch_inc = cpp_extension.include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in torch_inc):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for p in [*torch_inc, str(stubs), str(inc)]:
        cmd += ["-isystem", p]
    cmd.append(str(src))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-6000:]}"
