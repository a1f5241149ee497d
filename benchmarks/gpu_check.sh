#!/usr/bin/env bash
# The project's one script for a CUDA machine with torch preinstalled and no network
# (the lent H100/H200: Python 3.12, torch 2.11).  Within GPU_CHECK_SECONDS (default 480 s: issue
# 2's 8 minutes, under the device tool's 10-minute limit per command; in session 12 the full run
# took 377 s on an H200 without the TF32 step; since then the gate-product probe, the max-pool
# profile and round 5's A/B runs came in and the A/B runs of switches measured before went behind
# GPU_CHECK_OLD_AB=1: about 420 s expected, never timed) it:
#   1. builds the extension in place with all cores, for the GPU that is present;
#   2. runs the CUDA tests;
#   3. runs compute-sanitizer memcheck over a small CUDA test subset;
#   4. runs the benchmark on cuda (float32 with TF32 off, float16, bfloat16), A/B runs of the
#      runtime switches (max-pool round 5; with GPU_CHECK_OLD_AB=1 also the persistent recurrence's
#      barriers and conv2d rounds 3 and 5), the persistent
#      recurrence's time a step, the cells' GPU-vs-host time and their gate products' cuBLAS host
#      time by dtype and width, conv2d's and max_pool2d's time by kernel, then
#      conv2d float32 with TF32 on;
#   5. leaves logs and the JSON in OUTDIR, and prints a short summary last.
# Usage: benchmarks/gpu_check.sh OUTDIR   (GPU_CHECK_SECONDS, GPU_CHECK_EXAMPLES=1, GPU_CHECK_TF32=0,
# GPU_CHECK_OLD_AB=1, GPU_CHECK_FOCUS=conv2d,max_pool2d, BENCH_SECONDS: see below)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
step() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-480} ))
examples=${GPU_CHECK_EXAMPLES:-0}  # 1: also the examples/ecosystem step (about 75 s; then give GPU_CHECK_SECONDS=560)
tf32=${GPU_CHECK_TF32:-1}          # 0: skip the conv2d TF32 run (about 30 s)
old_ab=${GPU_CHECK_OLD_AB:-0}      # 1: also the A/B runs of switches measured before (the persistent recurrence's
# barriers and stack, sessions 4-12; conv2d rounds 3 and 5, sessions 7 and 12): about 80 s more
focus=${GPU_CHECK_FOCUS:-}         # ops (comma list, e.g. conv2d or conv2d,max_pool2d): after the tests,
# benchmark, A/B and profile those alone (a rerun after a change; conv2d alone takes about 330 s
# with a 120 s build)
has() { [[ -z $focus || ",$focus," == *",$1,"* ]]; }  # is op $1 benchmarked in this run
# seconds a step may take: its cap, less what the later steps are promised (reserve: their
# usual times on the H200, not their caps, so that the tests are not starved by a slow build)
budget() { local cap=$1 reserve=$2 left=$(( deadline - $(date +%s) - $2 ));
           (( left < cap )) && cap=$left; (( cap < 10 )) && cap=10; echo $cap; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >> "$out/summary.txt" 2>&1
cap=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")

# The build's reserve is what the later steps usually take: ~300 s for the full run, ~200 s for a
# focused one.  (A reserve larger than GPU_CHECK_SECONDS less the build's ~100-120 s kills the
# build: session 12's first focused call, GPU_CHECK_SECONDS=370 against a fixed 300, lost 70 s.)
if [[ -n $focus ]]; then build_reserve=200; else build_reserve=300; fi
step "build (CONVRNN_CUDA_ARCHS=$cap, MAX_JOBS=$(nproc))"
if ! CONVRNN_CUDA_ARCHS="$cap" MAX_JOBS=$(nproc) timeout $(budget 300 $build_reserve) $py setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  step "BUILD FAILED"; tail -40 "$out/build.log"; exit 1
fi
$py -c "import convrnn_kernels as ck; print(ck.build_info())" 2>&1 | tee -a "$out/summary.txt"

# Toolchain probe.  A C++ error message that formats an integer runs ostream code that g++
# emitted into our .so from its own headers; when that g++ is newer than the libstdc++ the
# Python process loads (the lent machine's /opt/gcc against the system's), it segfaults
# (seen 2026-11-25).  Then preload the compiler's own libstdc++, which is backward compatible.
probe() { $py -c "
import torch, convrnn_kernels
try:
    torch.ops.convrnn.avg_pool2d(torch.randn(1, 1, 2, 2), [3, 3], [3, 3], [0, 0], False, True, None)
except RuntimeError as e:
    assert 'too small' in str(e), e
" > /dev/null 2>&1; }
cxx=${CXX:-g++}
echo "compiler: $($cxx --version 2>/dev/null | head -1) ($(command -v $cxx))" | tee -a "$out/summary.txt"
if ! probe; then
  libcxx=$($cxx -print-file-name=libstdc++.so.6)
  echo "error-message probe crashed; loaded: $($py -c "import torch; print([l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l][0])" 2>&1); preloading $libcxx" | tee -a "$out/summary.txt"
  export LD_PRELOAD="$libcxx${LD_PRELOAD:+:$LD_PRELOAD}"
  probe && echo "probe passes with the preload" | tee -a "$out/summary.txt" || echo "PROBE STILL CRASHES" | tee -a "$out/summary.txt"
fi

step "CUDA tests"
# pytest-xdist, where present: a test that crashes its worker is reported, the rest still run
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
# usual seconds of what follows the tests, the sanitizer run and the benchmark (the full run's
# tests are promised a little less than what follows them: the later steps shrink first)
if [[ -n $focus ]]; then after_tests=90 after_san=65 after_bench=40; else after_tests=200 after_san=225 after_bench=130; fi
timeout $(budget 180 $(( after_tests + 90 * examples + 30 * tf32 ))) $py -m pytest tests -q -k cuda -p no:cacheprovider $xdist --maxfail=200 -rf \
  --durations=15 > "$out/tests.log" 2>&1 || status=1
grep -E "^FAILED|^ERROR" "$out/tests.log" | head -40 | tee -a "$out/summary.txt"
tail -1 "$out/tests.log" | tee -a "$out/summary.txt"

if (( examples )); then
  step "examples, convert() and the ecosystem tests (CUDA where present)"
  timeout $(budget 100 $(( after_tests + 30 * tf32 ))) $py -m pytest tests/test_examples.py tests/test_ecosystem.py -q \
    -p no:cacheprovider $xdist -rf > "$out/tests-examples.log" 2>&1 || status=1
  grep -E "^FAILED|^ERROR" "$out/tests-examples.log" | head -20 | tee -a "$out/summary.txt"
  tail -1 "$out/tests-examples.log" | tee -a "$out/summary.txt"
fi

step "compute-sanitizer memcheck (small CUDA subset)"
if command -v compute-sanitizer > /dev/null; then
  timeout $(budget 60 $(( after_san + 30 * tf32 ))) compute-sanitizer --tool memcheck --error-exitcode 9 \
    $py -m pytest tests -q -p no:cacheprovider -k "cuda and sanitizer" > "$out/sanitizer.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|passed|failed" "$out/sanitizer.log" | tail -3 | tee -a "$out/summary.txt"
else
  echo "compute-sanitizer not found" | tee -a "$out/summary.txt"
fi

step "benchmark on cuda${focus:+ ($focus)}"
timeout $(budget 150 $(( after_bench + 30 * tf32 ))) $py -m convrnn_kernels.bench --devices cuda ${focus:+--ops $focus} --dtypes float32,float16,bfloat16 --no-progress \
  --seconds ${BENCH_SECONDS:-0.25} --out "$out/bench.json" > "$out/bench.txt" 2>&1 || status=1
tail -45 "$out/bench.txt"
# A/B of runtime switches, each against the main run's default (bench.json): the sequences'
# inference without the stacked kernel (CONVRNN_PERSISTENT_STACK=0: layer by layer), and with
# the grid barrier only (CONVRNN_PERSISTENT_CLUSTER=0, which also declines the stack); conv2d float32 with
# round 2's kernels instead of round 3's (CONVRNN_CONV_R3=0: fixed SIMT tiles, GEMM backward data for C = 3).
# (The max-pool forward without its round-3 kernels, CONVRNN_MAXPOOL_R3=0, was measured in sessions 7
# and 12 and is no longer run.)
ab() { local name=$1 env=$2 ops=$3 dtypes=$4 reserve=$5 formats=${6:-nchw,channels_last} directions=${7:-forward,forward+backward}
  step "A/B $name: $env ($ops, $dtypes, $formats, $directions)"
  env $env timeout $(budget 35 $(( reserve + 30 * tf32 ))) $py -m convrnn_kernels.bench --devices cuda --ops $ops --dtypes $dtypes \
    --formats $formats --directions $directions --no-progress --no-chart --seconds ${BENCH_SECONDS:-0.25} --out "$out/ab-$name.json" > "$out/ab-$name.txt" 2>&1 \
    || status=1
  grep -A6 "^Geomean" "$out/ab-$name.txt" | tail -6
}
if [[ -z $focus ]] && (( old_ab )); then
  ab seq-nostack CONVRNN_PERSISTENT_STACK=0 lstm_seq,gru_seq float32,bfloat16 110
  ab seq-grid CONVRNN_PERSISTENT_CLUSTER=0 lstm_seq,gru_seq float32,bfloat16 95
fi
# session 12: max_pool2d round 4, the NCHW 2x2/2 forward from 16-byte row pieces and 4-channel items in
# channels_last (CONVRNN_MAXPOOL_R4=0: round 3's kernels), and conv2d round 5, the depthwise channels_last vector kernel
# (CONVRNN_DW_VEC=0: the shared-memory tile; =2, 8 outputs a thread, measured no faster in session 12)
if [[ -z $focus ]]; then reserve=60; else reserve=16; fi
# session 16: max_pool2d round 5 (the inference forward values only, by a NaN-propagating max, in the
# unrolled, pair and row4 kernels; in channels_last 8 channels an item in the 2-byte types' forward, 4 a
# backward cell of 3x3/2 and 2x2/2):
# CONVRNN_MAXPOOL_R5=0 round 4's kernels, =2 the values-only form with round 4's 4 channels and 2-channel
# cells (round 4 itself was A/B'd in session 12)
has max_pool2d && ab maxpool-r5-off-cl CONVRNN_MAXPOOL_R5=0 max_pool2d float32,float16,bfloat16 $(( reserve + 52 )) channels_last
has max_pool2d && ab maxpool-r5-off-nchw CONVRNN_MAXPOOL_R5=0 max_pool2d float32,float16,bfloat16 $(( reserve + 32 )) nchw
has max_pool2d && ab maxpool-r5-lanes4 CONVRNN_MAXPOOL_R5=2 max_pool2d float16,bfloat16 $(( reserve + 20 )) channels_last forward
(( old_ab )) && has conv2d && ab dw-vec CONVRNN_DW_VEC=0 conv2d float32,float16 $(( reserve + 10 )) channels_last
(( old_ab )) && [[ -z $focus || $focus == conv2d ]] && ab conv-r2 CONVRNN_CONV_R3=0 conv2d float32 $reserve

if [[ -z $focus ]]; then
  step "persistent recurrence at batch 1: us a step by barrier (benchmarks/rnn_persistent_profile.py)"
  timeout $(budget 55 $(( 50 + 30 * tf32 ))) $py benchmarks/rnn_persistent_profile.py --reps 3 --stack > "$out/rnn-steps.txt" 2>&1 \
    || status=1
  grep "per step" "$out/rnn-steps.txt"

  step "cell forward: GPU kernel time against host time per call (benchmarks/cells_profile.py)"
  timeout $(budget 40 $(( 20 + 30 * tf32 ))) $py benchmarks/cells_profile.py --device cuda -n 100 > "$out/cells-profile.txt" 2>&1 \
    || status=1
  tail -3 "$out/cells-profile.txt"

  step "gate products: cuBLAS host time by dtype and gate width (benchmarks/cells_gemm_probe.py)"
  timeout $(budget 25 $(( 20 + 30 * tf32 ))) $py benchmarks/cells_gemm_probe.py -n 200 > "$out/cells-gemm-probe.txt" 2>&1 \
    || status=1
  grep -E "^float16 +1 " "$out/cells-gemm-probe.txt"
fi

if has conv2d; then
  step "conv2d forward+backward by kernel, ours against cuDNN (benchmarks/conv_profile.py)"
  timeout $(budget 40 $(( 25 * $(has max_pool2d && echo 1 || echo 0) + 30 * tf32 ))) $py benchmarks/conv_profile.py -n 10 \
    > "$out/conv-profile.txt" 2>&1 || status=1
  grep -E "^[A-Za-z0-9].*: ours" "$out/conv-profile.txt"
fi

# session 16 (never run yet): max_pool2d by kernel, inference forward and forward+backward, ours and torch's
if has max_pool2d; then
  step "max_pool2d by kernel, ours against torch (benchmarks/pool_profile.py)"
  timeout $(budget 30 $(( 30 * tf32 ))) $py benchmarks/pool_profile.py -n 10 > "$out/pool-profile.txt" 2>&1 || status=1
  grep -c "us (" "$out/pool-profile.txt"
fi

if (( tf32 )); then
  step "benchmark on cuda: conv2d float32 with TF32 on (both sides)"
  timeout $(budget 40 0) $py -m convrnn_kernels.bench --devices cuda --ops conv2d --dtypes float32 --tf32 on \
    --no-progress --no-chart --seconds ${BENCH_SECONDS:-0.25} --out "$out/bench-tf32.json" >> "$out/bench.txt" 2>&1 \
    || status=1
  grep -A4 "^Geomean" "$out/bench.txt" | tail -5
fi
step "done (status $status)"
exit $status
