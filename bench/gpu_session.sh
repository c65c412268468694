#!/usr/bin/env bash
# One prepared command for a lent GPU (an H200 with python3 3.12, torch 2.11.0+cu130, triton
# 3.6.0, nvcc 13.0, compute-sanitizer, numpy, pytest, nvidia-ml-py; no network):
#
#   bash bench/gpu_session.sh             # on the GPU machine: <= 8 minutes of wall time
#   bash bench/gpu_session.sh --dry-run   # the same steps on CPU (interpreter, tiny sizes)
#
# Steps, each under its own time budget (`timeout`), cut to what is left of the session's
# deadline (470 s; 170 s dry run); a step that cannot run says why and is reported "skipped":
#   env        nvidia-smi, versions
#   install    pip install --no-deps --no-build-isolation -e .
#   peers      wheels present in .whl/ (bench/README.md: how to download and carry them)
#   build      python -m gammacl.build_ext --cuda  (TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   pytest     python -m pytest -m gpu  (tests/test_gpu.py; junit XML)
#   memcheck   compute-sanitizer --tool memcheck on a small cuda-backend run (N=300, D=64)
#   racecheck  compute-sanitizer --tool racecheck on the same run
#   bench      python -m gammacl.bench, N=32768,65536 D=1024 bf16, clip + gamma_onepass,
#              backends triton,cuda,torch and the peers found
#   profile    python -m gammacl.profile: largest N that fits (cap 262144: one fwd+bwd at
#              2^18 x 1024 is 5.6e14 FLOPs, ~1 s), clip, D=1024 bf16, triton / cuda / naive
# Everything goes under $OUT when set (else bench/out/gpu_session[-dry]/), flat, at most 8 files:
# session.log, summary.txt, pytest-gpu.xml, bench.{csv,json}, profile.{csv,json}.
# The summary table (step, status, seconds, note) is printed last. Exit 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY=${PYTHON:-python3}
if ((DRY)); then
  DEADLINE=170
  OUTDIR=${OUT:-$ROOT/bench/out/gpu_session-dry}
  export TRITON_INTERPRET=1
else
  DEADLINE=470
  OUTDIR=${OUT:-$ROOT/bench/out/gpu_session}
  unset TRITON_INTERPRET
fi
mkdir -p "$OUTDIR"
LOG=$OUTDIR/session.log
: >"$LOG"
export PY OUTDIR PYTHONUNBUFFERED=1
T0=$(date +%s)
ROWS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME BUDGET NOTE CMD: runs CMD (a bash string) under min(BUDGET, time left) seconds.
step() {
  local name=$1 budget=$2 note=$3 cmd=$4
  local left=$((DEADLINE - ($(date +%s) - T0)))
  local t=$((budget < left ? budget : left))
  if ((t < 5)); then
    skip "$name" "session deadline (${DEADLINE} s) reached"
    return
  fi
  say "=== [$name] budget ${t} s: $cmd"
  local s0=$(date +%s)
  timeout -k 5 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local sec=$(($(date +%s) - s0))
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT
    note="$note; killed at ${t} s"
    FAILED=1
  elif ((rc != 0)); then
    status="FAIL($rc)"
    FAILED=1
  fi
  ROWS+=("$name|$status|$sec|$note")
}

skip() {
  say "=== [$1] skipped: $2"
  ROWS+=("$1|skipped|0|$2")
}

have_gpu() { ((!DRY)) && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# ------------------------------------------------------------------------------------------
step env 45 "versions" "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo 'nvidia-smi: none'; \"\$PY\" -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available()); import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -1; command -v compute-sanitizer || echo 'compute-sanitizer: none'"

GPU=0
if have_gpu; then GPU=1; fi
if ((!DRY && !GPU)); then say "no CUDA device visible: the GPU steps are skipped (use --dry-run on CPU)"; fi

if ((DRY)) && "$PY" -c "import gammacl, sys; sys.exit(0 if gammacl.__file__.startswith('$ROOT') else 1)" 2>/dev/null; then
  skip install "dry run: gammacl already importable from this checkout"
else
  step install 60 "editable, no deps, no build isolation" "\"\$PY\" -m pip install -q --no-deps --no-build-isolation -e ."
fi

shopt -s nullglob
WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]})); then
  step peers 30 "${#WHEELS[@]} wheels from .whl/" "\"\$PY\" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gammacl-peers .whl/*.whl"
  export PYTHONPATH=/tmp/gammacl-peers${PYTHONPATH:+:$PYTHONPATH}
else
  skip peers "no wheels in .whl/ (bench/README.md says how to carry them)"
fi
IMPLS=gammacl,naive,gemm_floor
for mod in open_clip:open_clip memeff:memeff inf_cl:inf_cl siglip_kernel:siglip_kernel; do
  if "$PY" -c "import ${mod%%:*}" 2>/dev/null; then IMPLS+=",${mod##*:}"; fi
done
say "implementations: $IMPLS"

if ((GPU)); then
  step build 150 "CUDA + C++ extension" "TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=\${MAX_JOBS:-16} \"\$PY\" -m gammacl.build_ext --cuda"
else
  skip build "no CUDA device: the CUDA extension needs nvcc and a GPU to load"
fi

# pytest -m gpu runs on CPU too: every test skips with its reason (-rs prints them)
step pytest 150 "pytest -m gpu" "\"\$PY\" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml=\"\$OUTDIR/pytest-gpu.xml\" tests/test_gpu.py"

SANITIZE='import sys, math, torch, gammacl
from gammacl.ops.gamma_onepass import gamma_onepass
dev, backend = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
n, d = 300, 64  # not a multiple of any tile: tail blocks run
for dt in (torch.bfloat16, torch.float32):
    a = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dt).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dt).requires_grad_()
    s = torch.tensor(14.3, device=dev, requires_grad=True)
    loss = gammacl.clip_loss(a, b, s, backend=backend)
    ga = torch.autograd.grad(loss, (a, b, s))
    al = torch.full((n,), -math.log(n), device=dev)
    neg = gamma_onepass(a, b, s, al, al, w_row=0.5, w_col=0.5, backend=backend)[0]
    gb = torch.autograd.grad(neg.sum(), (a, b, s))
    ok = all(bool(torch.isfinite(g).all()) for g in (*ga, *gb))
    print(dt, "clip", float(loss.detach()), "onepass", float(neg.detach().sum()), "grads finite", ok)
    assert ok
if dev == "cuda":
    torch.cuda.synchronize()
print("sanitizer run done")'
export SANITIZE
if ((GPU)) && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "$tool" 60 "cuda backend, N=300 D=64 bf16+fp32" "compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \"\$PY\" -c \"\$SANITIZE\" cuda cuda"
  done
else
  why="no CUDA device"
  ((GPU)) && why="compute-sanitizer not on PATH"
  skip memcheck "$why; the same small run on CPU (torch backend) below"
  skip racecheck "$why"
  step sanitize-cpu 60 "the sanitizer run, CPU torch backend" "\"\$PY\" -c \"\$SANITIZE\" cpu torch"
fi

if ((GPU)); then
  step bench 120 "clip,gamma_onepass,siglip N=32768,65536 D=1024 bf16; $IMPLS" "\"\$PY\" -m gammacl.bench --device cuda --n 32768,65536 --d 1024 --dtype bf16 --loss clip,gamma_onepass,siglip --backend triton,cuda --impl $IMPLS --mode fwd+bwd --rep-ms 50 --no-plot --out \"\$OUTDIR\" --name bench --note gpu_session"
  step profile 75 "largest N, clip D=1024 bf16" "\"\$PY\" -m gammacl.profile --device cuda --loss clip --backend triton,cuda --impl gammacl,naive --d 1024 --dtype bf16 --n 16384 --n-max 262144 --no-plot --out \"\$OUTDIR\" --name profile --note gpu_session"
else
  step bench 60 "dry run: CPU, tiny sizes; $IMPLS" "\"\$PY\" -m gammacl.bench --device cpu --n 128 --d 32 --dtype fp32 --loss clip,gamma_onepass --backend torch --impl gammacl,naive --mode fwd+bwd --min-time 0.02 --threads 1 --no-plot --out \"\$OUTDIR\" --name bench --note gpu_session-dry-run"
  step profile 45 "dry run: CPU, tiny sizes" "\"\$PY\" -m gammacl.profile --device cpu --loss clip --backend torch --impl gammacl --d 32 --dtype fp32 --n 128 --n-max 512 --budget-mib 64 --threads 1 --no-plot --out \"\$OUTDIR\" --name profile --note gpu_session-dry-run"
fi

# ------------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - T0))
{
  echo
  echo "gpu_session$( ((DRY)) && echo ' --dry-run') summary: ${TOTAL} s of ${DEADLINE} s; files in $OUTDIR"
  printf '%-12s | %-12s | %7s | %s\n' step status seconds note
  for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    printf '%-12s | %-12s | %7s | %s\n' "$a" "$b" "$c" "$d"
  done
} | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
exit $FAILED
