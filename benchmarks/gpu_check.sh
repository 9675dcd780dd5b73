#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on a machine with an NVIDIA GPU and
# CuPy + PyTorch installed:  bash benchmarks/gpu_check.sh
# 1. the test suite's cupy lane; 2. NumPy-vs-CuPy equivalence of the first 20 training
# steps; 3. the GPU benchmarks against PyTorch. Results go to $OUT when it is set (the
# device tool), otherwise to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu_machine.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$RESULTS/gpu_machine.txt"

echo "=== 1. cupy test lane"
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -x -p no:cacheprovider -k cupy -m "not slow" tests \
    2>&1 | tail -n 40 | tee "$RESULTS/gpu_tests.log"

echo "=== 2. NumPy vs CuPy: first 20 training steps"
timeout "${EQUIV_SECONDS:-120}" python3 benchmarks/gpu_equivalence.py --out "$RESULTS/gpu_equivalence.json"

echo "=== 3. GPU benchmarks"
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/bench_gpu.py --out "$RESULTS/bench_gpu.json"
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/bench_resnet.py --backend cupy --out "$RESULTS/bench_resnet_cupy.json"
echo "=== done"
