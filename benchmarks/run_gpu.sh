#!/usr/bin/env bash
# One command for a GPU session: install the carried wheels, run the Triton kernel tests at full
# shapes, run the benchmark suite, and leave logs + results + the table under $OUT.
#
# Prepare (CPU side, once, from the repo root): ../shared/gpu/wheels.sh   -> .whl/ (git-ignored)
# Run (GPU side, repo root, with .whl carried):
#     OUT=$OUT LORAFUSE_COMMIT=<git short hash> bash benchmarks/run_gpu.sh [all|tests|bench|aot] [pytest args]
#   all   (default) tests then bench; about 10-15 min cold (Triton compiles dominate): under a
#         10-minute-per-command limit run `tests` and `bench` as two calls on the same warm machine
#         (Triton's cache in ~/.triton/cache then carries the compiled kernels over).
#   tests kernel correctness at full shapes (tests/kernels -k triton), one config per kernel
#         (LORAFUSE_AUTOTUNE=0) plus the sweep tests that run every autotune config.
#   bench benchmarks (pytest-benchmark), autotuned; extra args go to pytest, e.g. -k "K4096-N4096".
#   aot   compile every kernel/config for sm_90 and print registers/spills/shared memory.
# Files in $OUT (<= 8, flat): versions.txt, kernel_tests.log, bench.log, table.md, results.json,
# pytest_benchmark.json. Then paste table.md into benchmarks/RESULTS.md (see there).
set -uo pipefail
phase=${1:-all}
[ $# -gt 0 ] && shift
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "note: no .whl/ carried; using whatever bitsandbytes/peft the machine has" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
unset TRITON_INTERPRET  # real kernels
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  "$PY" - <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
for m in ("bitsandbytes", "peft", "transformers"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, "unavailable:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PYEOF
  echo "commit ${LORAFUSE_COMMIT:-unknown}"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

rc=0
if [ "$phase" = aot ]; then
  "$PY" benchmarks/aot_compile.py "$@" 2>&1 | tee "$OUT/aot.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "$phase" = all ] || [ "$phase" = tests ]; then
  echo "== kernel tests (full shapes) =="
  LORAFUSE_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -k triton -ra \
    --durations=10 > "$OUT/kernel_tests.log" 2>&1 || rc=1
  tail -n 30 "$OUT/kernel_tests.log"
fi
if [ "$phase" = all ] || [ "$phase" = bench ]; then
  echo "== benchmarks =="
  LORAFUSE_BENCH_OUT=$OUT "$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
    --benchmark-json="$OUT/pytest_benchmark.json" --benchmark-columns=median,iqr,rounds "$@" \
    > "$OUT/bench.log" 2>&1 || rc=1
  grep -A 200 "lorafuse LoRA layer benchmark" "$OUT/bench.log" | head -n 80
  tail -n 5 "$OUT/bench.log"
fi
echo "results in $OUT; record them: paste $OUT/table.md into benchmarks/RESULTS.md (section 'Results')"
exit $rc
