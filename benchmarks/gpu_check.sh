#!/usr/bin/env bash
# The GPU check: one run on a machine with an NVIDIA GPU, CuPy and PyTorch, within an overall
# budget of TOTAL_SECONDS (default 450 s, under the 8 minutes a device session allows it):
#     bash benchmarks/gpu_check.sh     (on the device tool, which sets $OUT itself)
# Without $OUT the results go to benchmarks/results/. With $OUT (the device tool brings back
# at most 8 files from it) they are written to a folder of their own (GPU_CHECK_WORK, default
# a fresh /tmp/gpu_check.XXXXXX) and, after every step, packed into $OUT/gpu_check.tgz
# (checkpoints left out) beside copies of gpu_check.json, bench_gpu.json,
# gpu_equivalence.json and gpu_tests.log; the console ends with the numbers that answer
# the question. Unpack: tar -xzf gpu_check.tgz -C <folder>.
#
# Order: what the GPU check exists for first. Every step runs under `timeout` with the
# smaller of its own cap and the time left in the budget; a step that fails or hangs is
# recorded and the next one runs. The caps of steps 0-4 add up to 405 s, inside the
# default budget, so (a)-(e) come back even if every one of them runs to its cap; steps 5-7
# get what is left and are skipped (and recorded as skipped) once fewer than
# MIN_STEP_SECONDS (20) remain.
#   step               cap   what
#   0 machine           30   nvidia-smi and the library versions -> gpu_machine.txt
#   1 bench_required   120   bench_gpu.py --cases required: (a) the resnet18 CIFAR step,
#                            batch 256, float32, ours vs PyTorch; (b) images/s of a full SwAV
#                            step (2x32 + 6x16 crops, CIFAR-10 augmentation); (c) Sinkhorn
#                            B=4096 K=3000 and the loss vs PyTorch; then the step with TF32.
#                            The file is rewritten after each case, so a kill keeps the first.
#   2 equivalence       60   (d) NumPy vs CuPy, the first 20 training steps' losses (1e-3)
#   3 equivalence_plain 45   the same with the plain CuPy code (SWAV_REF_FUSED=0)
#   4 tests            150   (e) the test suite's cupy lane (NVRTC-compiled fused kernels too)
#   5 e2e_train         60   the CLI end to end on the digits: train 2 epochs, stop after 1,
#     e2e_resume        45   --resume to the end, then eval the checkpoint (each skipped when
#     e2e_eval          45   the one before failed)
#   6 bench_probes      60   bench_gpu.py --cases probes: profile, CUDA graphs, host floor, ...
#   7 bench_loss_cupy   45   the README's older GPU tables (bench_loss.py, bench_resnet.py;
#     bench_resnet_cupy 180  the slower one last: six PyTorch processes, each starting CUDA;
#                            it ran into a 90 s cap once, and took 83.5 s next, on the H200)
# The benchmarks come before the equivalence because their numbers are the question; the
# order within 0-4 does not decide what comes back, the caps do.
#
# Records: $RESULTS/gpu_check.json, rewritten when the run starts, when each step starts
# ("running") and ends, and at the end ("finished": true), so a run killed from outside
# still says which steps ran and which one was running. Per step: the command, its cap,
# seconds, exit code, status (ok, failed, timeout, skipped) and its log, the full output in
# $RESULTS/gpu_check/NAME.log (the console shows each log's last lines); for the test lane
# also the passed/failed/skipped counts of pytest's summary line. The script exits 1 when a
# step failed or timed out.
#
# Rehearsal on a CPU (no CuPy): GPU_CHECK_BACKEND=numpy OUT=/tmp/gc bash benchmarks/gpu_check.sh
# runs every step with --backend numpy at toy sizes (and needs OUT: rehearsal numbers must
# not land in benchmarks/results/). It checks the plumbing, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL_SECONDS="${TOTAL_SECONDS:-450}"
MIN_STEP_SECONDS="${MIN_STEP_SECONDS:-20}"
BACKEND="${GPU_CHECK_BACKEND:-cupy}"
if [[ $BACKEND != cupy && -z ${OUT:-} ]]; then
    echo "gpu_check: GPU_CHECK_BACKEND=$BACKEND is a rehearsal; set OUT=/tmp/somewhere" >&2
    exit 2
fi
if [[ -n ${OUT:-} ]]; then
    RESULTS="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
else
    RESULTS=benchmarks/results
fi
LOGS="$RESULTS/gpu_check"
CHECK_JSON="$RESULTS/gpu_check.json"
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [[ $BACKEND == cupy ]]; then
    BENCH=(--backend cupy)
    EQUIV=(--backend cupy)
    OLDER=(--backend cupy)
else  # toy sizes; gpu_equivalence.py's NumPy-vs-NumPy is trivially equal
    BENCH=(--backend numpy --small --repeats 1)
    EQUIV=(--backend numpy --steps 3)
    OLDER=(--backend numpy --quick)
fi

# record MODE ARGS...: update $CHECK_JSON. Modes: start BACKEND BUDGET; running NAME;
# step NAME RC SECONDS CAP LOG REASON COMMAND... (RC empty: skipped, for REASON); finish.
record() {
    python3 - "$CHECK_JSON" "$@" <<'PY' || echo "gpu_check: could not update $CHECK_JSON" >&2
import json, re, shlex, sys, time
from pathlib import Path

path, mode, *args = sys.argv[1:]
path = Path(path)
now = time.strftime("%Y-%m-%dT%H:%M:%S")


def pytest_counts(log: Path) -> dict:
    """The counts of pytest's last summary line ("3 failed, 198 passed, 4 skipped ... in 60.1s")."""
    lines = [l for l in log.read_text(errors="replace").splitlines()
             if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)\b", l) and re.search(r" in [\d.]+s", l)]
    if not lines:
        return {"summary": None}  # killed before pytest could sum up
    counts = {("errors" if k == "error" else "warnings" if k == "warning" else k): int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)",
                                     lines[-1])}
    return {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, **counts, "summary": lines[-1].strip("= ")}


if mode == "start":
    data = {"script": "benchmarks/gpu_check.sh", "backend": args[0], "total_seconds": int(args[1]),
            "started": now, "finished": False, "running": None, "steps": []}
else:
    data = json.loads(path.read_text())
if mode == "running":
    data["running"] = args[0]
elif mode == "step":
    name, rc, seconds, cap, log, reason, *command = args
    status = ("skipped" if rc == "" else "ok" if rc == "0" else "timeout" if rc in ("124", "137") else "failed")
    entry = {"name": name, "command": shlex.join(command), "cap_s": int(cap), "status": status,
             "exit_code": None if rc == "" else int(rc), "seconds": None if seconds == "" else round(float(seconds), 1),
             "log": str(Path(log).relative_to(path.parent)) if Path(log).exists() else None}
    if reason:
        entry["reason"] = reason
    if name == "tests" and Path(log).exists():
        entry["tests"] = pytest_counts(Path(log))
    data["steps"].append(entry)
    data["running"] = None
elif mode == "finish":
    data["finished"] = True
    data["elapsed_s"] = int(args[0])
    for s in data["steps"]:
        print(f"{s['name']:18} {s['status']:8} rc={s['exit_code']!s:4} {s['seconds']!s:>6} s  {s.get('tests', '')}")
data["updated"] = now
path.write_text(json.dumps(data, indent=2))
PY
}

# publish: with $OUT, pack the results into $OUT/gpu_check.tgz (written aside, then moved, so
# a kill leaves the last whole one) and copy the main records beside it: at most 6 files.
publish() {
    [[ -n ${OUT:-} ]] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/.gpu_check.tgz.part" --exclude='*.npz' -C "$RESULTS" . &&
        mv "$OUT/.gpu_check.tgz.part" "$OUT/gpu_check.tgz"
    local f
    for f in gpu_check.json bench_gpu.json gpu_equivalence.json gpu_tests.log; do
        [[ -f $RESULTS/$f ]] && cp "$RESULTS/$f" "$OUT/$f"
    done
    return 0
}

FAILED=0
# step NAME CAP COMMAND...: run COMMAND under min(CAP, time left), its output in $LOGS/NAME.log;
# returns its exit code (1 when skipped). Skipped when under MIN_STEP_SECONDS of budget remain.
step() {
    local name=$1 cap=$2
    shift 2
    local log="$LOGS/$name.log" left=$((TOTAL_SECONDS - SECONDS))
    ((cap > left)) && cap=$left
    if ((cap < MIN_STEP_SECONDS)); then
        echo "=== $name: skipped (${left} s of the ${TOTAL_SECONDS} s budget left)"
        record step "$name" "" "" "$cap" "$log" "budget spent (${left} s left)" "$@"
        publish
        return 1
    fi
    echo "=== $name (cap $cap s, at $SECONDS s): $*"
    record running "$name"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 5 "$cap" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n "${TAIL_LINES:-12}" "$log"
    ((rc == 0)) || { FAILED=1; echo "=== $name: exit code $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"; }
    record step "$name" "$rc" "$(python3 -c "print($t1 - $t0)")" "$cap" "$log" "" "$@"
    publish
    return "$rc"
}

# skip NAME REASON COMMAND...: record a step that is not run, and why.
skip() {
    local name=$1 reason=$2
    shift 2
    echo "=== $name: skipped ($reason)"
    record step "$name" "" "" 0 "$LOGS/$name.log" "$reason" "$@"
}

record start "$BACKEND" "$TOTAL_SECONDS"

# 0. the machine
if [[ $BACKEND == cupy ]]; then
    step machine 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader &&
        python3 -c "import cupy, torch; print(\"cupy\", cupy.__version__, \"torch\", torch.__version__)"' &&
        cp "$LOGS/machine.log" "$RESULTS/gpu_machine.txt"
else
    step machine 30 python3 -c "import numpy, torch; print('CPU rehearsal: numpy', numpy.__version__,
        'torch', torch.__version__)"
fi

# 1. (a), (b), (c): the benchmarks the issue asks for
step bench_required 120 python3 benchmarks/bench_gpu.py --cases required "${BENCH[@]}" --out "$RESULTS/bench_gpu.json"

# 2., 3. (d): NumPy vs CuPy, fused kernels and plain code
step equivalence 60 python3 benchmarks/gpu_equivalence.py "${EQUIV[@]}" --out "$RESULTS/gpu_equivalence.json"
step equivalence_plain 45 env SWAV_REF_FUSED=0 python3 benchmarks/gpu_equivalence.py "${EQUIV[@]}" \
    --out "$RESULTS/gpu_equivalence_plain.json"

# 4. (e): the cupy test lane (the full output in gpu_check/tests.log, its end in gpu_tests.log)
# -v: each test's outcome by name as it finishes, so a lane cut short still says how far it got
step tests 150 python3 -m pytest -v -p no:cacheprovider --durations=15 -k cupy -m "not slow" tests
[[ -f $LOGS/tests.log ]] && tail -n 80 "$LOGS/tests.log" >"$RESULTS/gpu_tests.log"

# 5. the command line end to end: train, stop after epoch 1 of 2, resume, evaluate
E2E="$LOGS/e2e"
if step e2e_train 60 python3 -m swav_ref train --backend "$BACKEND" --epochs 2 --stop-after 1 --warmup-epochs 0 \
    --batch-size 128 --n-prototypes 30 --hidden-dim 64 --feat-dim 32 --no-progress --no-evaluate --out-dir "$E2E"; then
    # every other option, the backend and the folder included, comes from the checkpoint
    if step e2e_resume 45 python3 -m swav_ref train --resume "$E2E/checkpoint.npz" --no-progress --no-evaluate; then
        step e2e_eval 45 python3 -m swav_ref eval "$E2E/checkpoint.npz" --out "$E2E/eval.json"
    else
        skip e2e_eval "e2e_resume did not succeed"
    fi
else
    skip e2e_resume "e2e_train did not succeed"
    skip e2e_eval "e2e_train did not succeed"
fi

# 6. the probes: where the step's time goes, and what might pay next
step bench_probes 60 python3 benchmarks/bench_gpu.py --cases probes "${BENCH[@]}" --out "$RESULTS/bench_gpu_probes.json"

# 7. the README's older GPU tables
step bench_loss_cupy 45 python3 benchmarks/bench_loss.py "${OLDER[@]}" --output "$RESULTS/bench_loss_gpu.json"
step bench_resnet_cupy 180 python3 benchmarks/bench_resnet.py "${OLDER[@]}" --out "$RESULTS/bench_resnet_cupy.json"

echo "=== done ($SECONDS s of $TOTAL_SECONDS)"
record finish "$SECONDS"
# The numbers the check exists for, last on the console (the device tool returns its end).
python3 - "$RESULTS" <<'PY' || true
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
for name in ("bench_gpu.json", "gpu_equivalence.json", "gpu_equivalence_plain.json"):
    path = results / name
    if not path.exists():
        print(f"{name}: missing")
        continue
    data = json.loads(path.read_text())
    for key, case in data.get("cases", {}).items():
        if "error" in case:
            print(f"{key}: ERROR {case['error']}")
            continue
        ratio = f"ratio {case['ratio']:.3g}" if "ratio" in case else ""
        rate = f"{case['images_per_s']:.0f} images/s" if "images_per_s" in case else ""
        print(f"{key}: ours {case.get('ours_ms', float('nan')):.3g} ms {ratio} {rate}".rstrip())
    if "max_relative_difference" in data:
        print(f"{name}: largest relative loss difference {data['max_relative_difference']:.2e} "
              f"(rtol {data.get('rtol')}), passed={data.get('passed')}")
PY
publish
exit "$FAILED"
