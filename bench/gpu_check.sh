#!/usr/bin/env bash
# On a machine with a CUDA GPU: the test suite (tests that need CUDA run, the rest as on a CPU) and the throughput
# bench on the GPU in bf16-mixed, then one summary line each. Meant to fit in 10 minutes.
#
#     bash bench/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY"; exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
timeout 420 "$PY" -m pytest -q -n 4 -p no:cacheprovider > "$OUT/gpu_check_tests.log" 2>&1
tests_rc=$?
timeout 150 "$PY" bench/throughput.py --quick --device cuda > "$OUT/gpu_check_bench.log" 2>&1
bench_rc=$?
echo "tests (rc $tests_rc): $(tail -n 1 "$OUT/gpu_check_tests.log")"
echo "bench (rc $bench_rc): $(grep -E 'tokens/s|OPD step' "$OUT/gpu_check_bench.log" | tr -s ' ' | paste -sd ';' -)"
exit $(( tests_rc || bench_rc ))
