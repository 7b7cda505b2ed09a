#!/usr/bin/env bash
# The GPU run in one call: environment, correctness on the device, then the side-by-side
# benchmarks. Run from anywhere on a CUDA machine:
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]          # default: $OUT, else benchmarks/results/gpu-run
#   STAGES="cuda bench" BENCH_ARGS="--only logits" bash benchmarks/gpu/run.sh   # a subset
#
# It runs from the source tree (PYTHONPATH) on the torch and Triton the machine has, so the
# package's own torch pin never triggers a reinstall. The C++ CPU extension is not built: CUDA
# tensors never use it, and the CPU tests that need it run in CI. Wheels carried in .whl/
# (Liger-Kernel, TRL and the few needs of theirs the machine lacks, bm25s for the trainer
# tests; benchmarks/gpu/fetch_wheels.sh downloads them) are installed into /tmp/site first;
# nothing is fetched on the GPU machine.
#
# Stages (each bounded by a timeout; one failing never stops the next):
#   env    device, driver, versions                          -> env.txt
#   cuda   tests marked `cuda`, Triton compiled for the GPU  -> cuda-tests.log
#   suite  (opt-in: STAGES="env cuda suite bench tune") every other test, Triton in the
#          interpreter as CI runs them, on 4 workers in parallel with `cuda` -> suite.log.
#          The one device call that ran it with 10 workers lost the machine (no output came
#          back; the cause is not known), so it is not in the default stages.
#   bench  python -m benchmarks.gpu.bench                     -> bench.log, ratios-<device>.json,
#                                                                <device>.md
#   tune   python -m benchmarks.gpu.tune (block-size sweeps)  -> tune.log, tune.json
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu-run}}
mkdir -p "$OUT_DIR"
STAGES=${STAGES:-"env cuda bench tune"}
BENCH_ARGS=${BENCH_ARGS:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
export TAPO_DISABLE_NATIVE=1  # no C++ build there (CPU kernels only; CI tests them)
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "[$(date +%H:%M:%S) +$((SECONDS))s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if has env; then
  {
    stamp env
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
      --format=csv 2>&1
    "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
for name in ("transformers", "liger_kernel", "trl", "bm25s", "pytest_benchmark", "xdist"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "unavailable:", type(err).__name__, err)
import tapo_kernels
print("tapo_kernels", tapo_kernels.__version__, "cpu backends", tapo_kernels.CPU_BACKEND)
EOF
    git log -1 --format='commit %h %s' 2>/dev/null
  } >"$OUT_DIR/env.txt" 2>&1
  cat "$OUT_DIR/env.txt"
fi

suite_pid=""
if has suite; then
  stamp "suite (background)"
  (TRITON_INTERPRET=1 timeout 150 "$PY" -m pytest -q -m "not cuda" -n 4 -p no:cacheprovider \
     --durations=15 tests >"$OUT_DIR/suite.log" 2>&1; echo "exit $?" >>"$OUT_DIR/suite.log") &
  suite_pid=$!
fi

if has cuda; then
  stamp cuda
  TRITON_INTERPRET=0 timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider --durations=15 \
    tests 2>&1 | tee "$OUT_DIR/cuda-tests.log" | tail -n 40
  stamp "cuda exit ${PIPESTATUS[0]}"
fi

if [[ -n "$suite_pid" ]]; then
  wait "$suite_pid"
  stamp "suite: $(tail -n 2 "$OUT_DIR/suite.log" | tr '\n' ' ')"
fi

if has bench; then
  stamp bench
  # shellcheck disable=SC2086
  TRITON_INTERPRET=0 timeout 270 "$PY" -m benchmarks.gpu.bench --out "$OUT_DIR" $BENCH_ARGS \
    2>&1 | tee "$OUT_DIR/bench.log" | tail -n 60
  stamp "bench exit ${PIPESTATUS[0]}"
fi
if has tune; then
  stamp tune
  TRITON_INTERPRET=0 timeout 110 "$PY" -m benchmarks.gpu.tune --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/tune.log" | tail -n 8
  stamp "tune exit ${PIPESTATUS[0]}"
fi
ls -la "$OUT_DIR"
