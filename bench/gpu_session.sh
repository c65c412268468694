#!/usr/bin/env bash
# One prepared command for a lent GPU (an H100/H200 with python3 3.12, torch 2.11.0+cu130, triton
# 3.6.0, nvcc 13.0, compute-sanitizer, numpy, pytest, nvidia-ml-py; no network):
#
#   bash bench/gpu_session.sh             # on the GPU machine: <= 470 s (one command, <= 480 s)
#   bash bench/gpu_session.sh --dry-run   # the same steps on CPU (interpreter, tiny sizes)
#
# Timing first, every row written as it is measured (a step killed by its timeout keeps what it
# measured), each step under its own budget (`timeout`) cut to what is left of the deadline. The
# plan (below, printed first) sums to <= DEADLINE; a step that cannot run says why ("skipped").
#   env        nvidia-smi, versions                                                    15 s
#   install    pip install --no-deps --no-build-isolation -e .                          20 s
#   peers      wheels in .whl/ (bench/README.md: which, and how to carry them)          10 s
#   build      python -m gammacl.build_ext --cuda IN THE BACKGROUND during M1-M2 (own cap 150 s)
#   M1         CLIP fwd and fwd+bwd, N=32768,65536 D=1024 bf16, triton vs gemm_floor    60 s
#   M2         bench/kernel_split.py: per-kernel times of one Triton fwd+bwd at N=65536
#              (torch.profiler), the backward GEMMs per candidate config and cuBLAS       50 s
#   build-wait the background build, at most this long more; killed after it            15 s
#   M3         cuda backend, same sizes, chunk sweep GAMMACL_CHUNK_MIB=32,128,512        45 s
#   M4         Triton chunk budget sweep GAMMACL_TRITON_CHUNK_MIB=64,256,1024            40 s
#   M5         gamma_onepass and siglip (triton, cuda) vs the siglip-kernel peer, floor  40 s
#   M6         bench/grad_check.py: triton and cuda gradients vs torch at N=65536        35 s
#   pytest     python -m pytest -m gpu (tests/test_gpu.py; junit XML)                   60 s
#   memcheck   compute-sanitizer memcheck on a small run (cuda backend, else triton)    25 s
#   racecheck  the same with racecheck                                                  25 s
#   profile    python -m gammacl.profile: largest N that fits, clip D=1024 bf16         25 s
# A failed or killed cuda build is attempted once (gammacl._ext records it; its stale lock is
# removed by the next build-lock holder) and every later step runs with triton only.
# Files, flat under $OUT when set (else bench/out/gpu_session[-dry]/): session.log, summary.txt,
# build.log, m1.csv/json, m2-split.csv, m3-chunk*.csv/json, m4-chunk*.csv/json, m5.csv/json,
# m6-grads.csv, pytest-gpu.xml, profile.csv/json. The summary table is printed last. Exit 1 when
# a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY=${PYTHON:-python3}
DEADLINE=470
# the dry run keeps the plan and the order; on a (shared, 2-core) CPU every step's imports alone
# can take 30-40 s, so its timeouts and deadline are the GPU budgets times SCALE
SCALE=1
if ((DRY)); then
  SCALE=${GPU_SESSION_DRY_SCALE:-4}
  OUTDIR=${OUT:-$ROOT/bench/out/gpu_session-dry}
  export TRITON_INTERPRET=1
else
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

# the plan: step budget (seconds), in order; the background build's own cap is BUILD_CAP
PLAN=(env:15 install:20 peers:10 M1:60 M2:50 build-wait:15 M3:45 M4:40 M5:40 M6:35 pytest:60
  memcheck:25 racecheck:25 profile:25)
BUILD_CAP=150
budget() { local p; for p in "${PLAN[@]}"; do [[ ${p%%:*} == "$1" ]] && echo "${p##*:}"; done; }

say() { echo "$*" | tee -a "$LOG"; }

plan_sum=0
say "plan (deadline ${DEADLINE} s; timing steps M1-M6 before pytest -m gpu and the sanitizers):"
for p in "${PLAN[@]}"; do
  plan_sum=$((plan_sum + ${p##*:}))
  say "  $(printf '%-10s %4s s  (cumulative %4s s)' "${p%%:*}" "${p##*:}" "$plan_sum")"
done
say "  build      in the background from after 'peers', capped at ${BUILD_CAP} s"
say "  sum of the step budgets: ${plan_sum} s <= deadline ${DEADLINE} s"
if ((plan_sum > DEADLINE)); then say "plan exceeds the deadline"; exit 2; fi
if ((SCALE > 1)); then say "dry run on CPU: timeouts and deadline are the budgets above x ${SCALE}"; fi
DEADLINE=$((DEADLINE * SCALE))

# step NAME NOTE CMD: runs CMD (a bash string) under min(budget, time left) seconds.
step() {
  local name=$1 note=$2 cmd=$3 budget
  budget=$(($(budget "$name") * SCALE))
  local left=$((DEADLINE - ($(date +%s) - T0)))
  local t=$((budget < left ? budget : left))
  if ((t < 5)); then
    skip "$name" "session deadline (${DEADLINE} s) reached"
    return
  fi
  say "=== [$name] budget ${t} s (planned ${budget} s, ${left} s left): $cmd"
  local s0=$(date +%s)
  timeout -k 5 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local sec=$(($(date +%s) - s0))
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT
    note="$note; killed at ${t} s (rows measured before are in the files)"
    FAILED=1
  elif ((rc != 0)); then
    status="FAIL($rc)"
    FAILED=1
  fi
  ROWS+=("$name|$status|$sec/$budget|$note")
}

skip() {
  say "=== [$1] skipped: $2"
  ROWS+=("$1|skipped|0/$(budget "$1")|$2")
}

have_gpu() { ((!DRY)) && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# ------------------------------------------------------------------------------------------
step env "versions" "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo 'nvidia-smi: none'; \"\$PY\" -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available()); import triton, numpy; print(\"triton\", triton.__version__, \"numpy\", numpy.__version__)'; command -v nvcc && nvcc --version | tail -1; command -v compute-sanitizer || echo 'compute-sanitizer: none'"

GPU=0
if have_gpu; then GPU=1; fi
if ((!DRY && !GPU)); then say "no CUDA device visible: the GPU steps are skipped (use --dry-run on CPU)"; fi

if ((DRY)) && "$PY" -c "import gammacl, sys; sys.exit(0 if gammacl.__file__.startswith('$ROOT') else 1)" 2>/dev/null; then
  skip install "dry run: gammacl already importable from this checkout"
else
  step install "editable, no deps, no build isolation" "\"\$PY\" -m pip install -q --no-deps --no-build-isolation -e ."
fi

shopt -s nullglob
WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]})); then
  step peers "${#WHEELS[@]} wheels from .whl/" "\"\$PY\" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gammacl-peers .whl/*.whl"
  export PYTHONPATH=/tmp/gammacl-peers${PYTHONPATH:+:$PYTHONPATH}
else
  skip peers "no wheels in .whl/ (bench/README.md says which and how to carry them)"
fi
PEERS=""
for mod in open_clip:open_clip memeff:memeff inf_cl:inf_cl siglip_kernel:siglip_kernel; do
  if "$PY" -c "import ${mod%%:*}" 2>/dev/null; then PEERS+=",${mod##*:}"; fi
done
say "peers importable: ${PEERS#,}"

# the CUDA build, in the background (its own process group, so a timeout kills the compilers)
BUILD_PID=""
if ((GPU)); then
  say "=== [build] started in the background, cap ${BUILD_CAP} s: log in $OUTDIR/build.log"
  rm -f "$OUTDIR/build.rc"
  setsid bash -c "TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=\${MAX_JOBS:-16} timeout -k 5 $BUILD_CAP \"\$PY\" -m gammacl.build_ext --cuda >\"\$OUTDIR/build.log\" 2>&1; echo \$? >\"\$OUTDIR/build.rc\"" &
  BUILD_PID=$!
  BUILD_T0=$(date +%s)
else
  skip build "no CUDA device: the CUDA extension needs nvcc and a GPU to load"
fi

if ((DRY)); then
  # CPU, tiny sizes, the torch backend; "cuda" is asked for where the GPU run asks for it, so
  # its rows say "unavailable" and the others run (as after a failed cuda build)
  DEV="--device cpu --d 32 --dtype fp32 --min-time 0.02 --threads 1 --no-plot"
  BIG="--n 128"
  TRI=torch
  SWEEP_CUDA="32" SWEEP_TRITON="64"  # one point each: the sweep loop runs, not the sweep
else
  DEV="--device cuda --d 1024 --dtype bf16 --rep-ms 50 --no-plot"
  BIG="--n 32768,65536"
  TRI=triton
  SWEEP_CUDA="32 128 512" SWEEP_TRITON="64 256 1024"
fi
BENCH="\"\$PY\" -m gammacl.bench $DEV --out \"\$OUTDIR\" --note gpu_session"

step M1 "clip fwd, fwd+bwd vs the 4-GEMM floor" "$BENCH $BIG --loss clip --backend $TRI --impl gammacl,gemm_floor --mode fwd,fwd+bwd --name m1"
if ((DRY)); then
  step M2 "kernel split (dry: torch profiler on CPU)" "\"\$PY\" bench/kernel_split.py --dry-run --out \"\$OUTDIR/m2-split.csv\""
else
  step M2 "kernel split N=65536 D=1024 bf16" "\"\$PY\" bench/kernel_split.py --n 65536 --d 1024 --dtype bf16 --out \"\$OUTDIR/m2-split.csv\""
fi

CUDA_OK=0
if [[ -n "$BUILD_PID" ]]; then
  step build-wait "the background CUDA build" "for i in \$(seq 1 600); do [[ -f \"\$OUTDIR/build.rc\" ]] && exit \$(cat \"\$OUTDIR/build.rc\"); sleep 0.5; done; exit 124"
  if [[ -f "$OUTDIR/build.rc" && "$(cat "$OUTDIR/build.rc")" == 0 ]]; then
    CUDA_OK=1
  else
    kill -- -"$BUILD_PID" 2>/dev/null
    say "cuda build failed or unfinished after $(($(date +%s) - BUILD_T0)) s: the rest runs with triton only (build.log)"
    tail -5 "$OUTDIR/build.log" 2>/dev/null | tee -a "$LOG"
  fi
else
  skip build-wait "no background build"
fi
if ((CUDA_OK || DRY)); then BACKENDS="$TRI,cuda"; else BACKENDS=$TRI; fi

if ((CUDA_OK || DRY)); then
  step M3 "cuda backend, chunk sweep" "for c in $SWEEP_CUDA; do GAMMACL_CHUNK_MIB=\$c $BENCH $BIG --loss clip --backend cuda$( ((DRY)) && echo ,torch) --impl gammacl --mode fwd+bwd --name m3-chunk\$c || exit \$?; done"
else
  skip M3 "the cuda backend is unavailable (build.log)"
fi
step M4 "triton chunk budget sweep" "for c in $SWEEP_TRITON; do GAMMACL_TRITON_CHUNK_MIB=\$c $BENCH $BIG --loss clip --backend $TRI --impl gammacl --mode fwd+bwd --name m4-chunk\$c || exit \$?; done"
step M5 "gamma_onepass, siglip vs siglip-kernel" "$BENCH $BIG --loss gamma_onepass,siglip --backend $BACKENDS --impl gammacl,gemm_floor$PEERS --mode fwd,fwd+bwd --name m5"
if ((DRY)); then
  step M6 "gradients vs torch (dry: reference, N=300)" "\"\$PY\" bench/grad_check.py --dry-run --out \"\$OUTDIR/m6-grads.csv\""
else
  step M6 "gradients vs torch, N=65536" "\"\$PY\" bench/grad_check.py --n 65536 --d 1024 --dtype bf16 --backend $BACKENDS --out \"\$OUTDIR/m6-grads.csv\""
fi

# pytest -m gpu runs on CPU too: every test skips with its reason (-rs prints them)
step pytest "pytest -m gpu" "\"\$PY\" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml=\"\$OUTDIR/pytest-gpu.xml\" tests/test_gpu.py"

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
  SAN_BACKEND=triton
  ((CUDA_OK)) && SAN_BACKEND=cuda
  for tool in memcheck racecheck; do
    step "$tool" "$SAN_BACKEND backend, N=300 D=64 bf16+fp32" "compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \"\$PY\" -c \"\$SANITIZE\" cuda $SAN_BACKEND"
  done
else
  why="no CUDA device"
  ((GPU)) && why="compute-sanitizer not on PATH"
  skip memcheck "$why; the same small run on CPU (torch backend) instead"
  PLAN+=(sanitize-cpu:25)
  step sanitize-cpu "the sanitizer run, CPU torch backend" "\"\$PY\" -c \"\$SANITIZE\" cpu torch"
  skip racecheck "$why"
fi

if ((DRY)); then
  step profile "dry run: CPU, tiny sizes" "\"\$PY\" -m gammacl.profile --device cpu --loss clip --backend torch,cuda --impl gammacl --d 32 --dtype fp32 --n 128 --n-max 512 --budget-mib 64 --threads 1 --no-plot --out \"\$OUTDIR\" --name profile --note gpu_session-dry-run"
else
  step profile "largest N, clip D=1024 bf16" "\"\$PY\" -m gammacl.profile --device cuda --loss clip --backend $BACKENDS --impl gammacl,naive --d 1024 --dtype bf16 --n 16384 --n-max 262144 --no-plot --out \"\$OUTDIR\" --name profile --note gpu_session"
fi

# ------------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - T0))
{
  echo
  echo "gpu_session$( ((DRY)) && echo ' --dry-run') summary: ${TOTAL} s of ${DEADLINE} s; files in $OUTDIR"
  printf '%-12s | %-12s | %9s | %s\n' step status "s/budget" note
  for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    printf '%-12s | %-12s | %9s | %s\n' "$a" "$b" "$c" "$d"
  done
} | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
exit $FAILED
