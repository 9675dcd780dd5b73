"""NumPy's BLAS threads on a quiet and on a busy machine: ``--threads 1`` against the default.

OpenBLAS (NumPy's BLAS on pip) starts one thread per core, and a thread with no work spins
for a while before it sleeps. A small network's matrix products are short, so its threads
spin between every pair of them, and when another program holds a core they compete with it:
the step slows down several-fold instead of by half. This benchmark measures the main job's
training (SwAV on digits, the demo's recipe, 2 epochs, no evaluation) with the BLAS default
and with ``--threads 1``, on the machine as it is and with one core kept busy by a spinning
process (as a browser tab or a second job would), in alternating rounds so that the
machine's slow phases hit both settings alike. Each run is a fresh ``swav-ref train``; the
time is the sum of its epochs' ``seconds`` in ``metrics.jsonl`` (training only, no start-up).

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_threads.py [--rounds 3]
Writes benchmarks/results/bench_threads.json and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EPOCHS = 2


def default_blas_threads() -> int:
    import numpy  # noqa: F401  (threadpoolctl sees the libraries loaded so far)
    from threadpoolctl import threadpool_info

    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return counts[0] if counts else 0


def training_seconds(threads: int) -> float:
    """One ``swav-ref train`` of the digits recipe; the seconds its epochs took."""
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as out:
        subprocess.run([sys.executable, "-m", "swav_ref", "train", "--epochs", str(EPOCHS), "--no-evaluate",
                        "--no-progress", "--threads", str(threads), "--out-dir", out],
                       check=True, capture_output=True, text=True, timeout=600)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return sum(r["seconds"] for r in records if r.get("kind") == "epoch")


@contextlib.contextmanager
def one_core_busy(busy: bool):
    """A process spinning on one core for the duration (nothing when ``busy`` is False)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each setting per condition")
    args = parser.parse_args(argv)
    cores, default = os.cpu_count(), default_blas_threads()
    conditions = {}
    for name, busy in (("quiet", False), ("one core busy", True)):
        times = {"one": [], "default": []}
        with one_core_busy(busy):
            for _ in range(args.rounds):
                times["one"].append(training_seconds(1))
                times["default"].append(training_seconds(0))
        one, dflt = statistics.median(times["one"]), statistics.median(times["default"])
        conditions[name] = {"one_thread_s": one, "default_s": dflt, "ratio_one_over_default": one / dflt,
                            "one_thread_s_all": times["one"], "default_s_all": times["default"]}
    result = {
        "benchmark": "bench_threads",
        "what": f"SwAV on digits, the demo's recipe, {EPOCHS} epochs of training (no evaluation)",
        "cores": cores, "default_blas_threads": default,
        "load_average_1min_at_end": os.getloadavg()[0],
        "machine": f"{platform.machine()} ({cores} cores)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_threads.py",
        "conditions": conditions,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_threads.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
