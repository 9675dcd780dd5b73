#!/usr/bin/env bash
# The GPU check, prepared to run in under 8 minutes on a machine with an NVIDIA GPU and
# CuPy + PyTorch installed:  bash benchmarks/gpu_check.sh
# 1. the test suite's cupy lane (every backend test on CuPy, and the fused CUDA kernels of
#    swav_ref/fused against the plain code, compiled by NVRTC);
# 2. NumPy-vs-CuPy equivalence of the first 20 training steps, with the fused kernels (the
#    default) and with the plain CuPy code (SWAV_REF_FUSED=0);
# 3. the GPU benchmarks against PyTorch (bench_gpu.py: Sinkhorn, loss, resnet18 step with
#    TF32 off and on in both libraries, fused and plain; the SwAV step), bench_resnet.py and
#    bench_loss.py on CuPy.
# Results go to $OUT when it is set (the device tool), otherwise to benchmarks/results/.
# A failing step does not stop the later ones: each writes its own file.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu_machine.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$RESULTS/gpu_machine.txt"

echo "=== 1. cupy test lane ($SECONDS s)"
timeout "${TEST_SECONDS:-180}" python3 -m pytest -q -p no:cacheprovider -k cupy -m "not slow" tests \
    2>&1 | tail -n 60 | tee "$RESULTS/gpu_tests.log"

echo "=== 2. NumPy vs CuPy: first 20 training steps ($SECONDS s)"
timeout "${EQUIV_SECONDS:-120}" python3 benchmarks/gpu_equivalence.py --out "$RESULTS/gpu_equivalence.json"
SWAV_REF_FUSED=0 timeout "${EQUIV_SECONDS:-120}" python3 benchmarks/gpu_equivalence.py \
    --out "$RESULTS/gpu_equivalence_plain.json"

echo "=== 3. GPU benchmarks ($SECONDS s)"
timeout "${BENCH_SECONDS:-180}" python3 benchmarks/bench_gpu.py --out "$RESULTS/bench_gpu.json"
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/bench_resnet.py --backend cupy --out "$RESULTS/bench_resnet_cupy.json"
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/bench_loss.py --backend cupy --output "$RESULTS/bench_loss_gpu.json"
echo "=== done ($SECONDS s)"
