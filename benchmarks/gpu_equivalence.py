"""NumPy against CuPy: the same seed, the same augmentations, the same first training steps.

Trains SwAV on digits for ``--steps`` steps on each backend in float32 (same
initialisation, same crops: random parameters are drawn on the host by one generator) and
reports the per-step losses and their largest relative difference. Passes when every step
agrees to ``--rtol`` (1e-3). CuPy runs with the fused kernels unless ``SWAV_REF_FUSED=0``
(recorded as ``fused_kernels``).

Run:  python benchmarks/gpu_equivalence.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from swav_ref import fused
from swav_ref.train import TrainConfig, Trainer


def losses(backend: str, steps: int) -> tuple[list[float], float]:
    cfg = TrainConfig(backend=backend, epochs=2, progress=False, log_every=1, out_dir=tempfile.mkdtemp())
    trainer = Trainer(cfg)
    out, t0 = [], time.perf_counter()
    while len(out) < steps:
        epoch, s = divmod(trainer.step, trainer.steps_per_epoch)
        if s == 0:
            trainer._start_epoch(epoch)
        idx = trainer.batch_indices(epoch, s)
        loss, _ = trainer.train_step(trainer.make_crops(idx), idx)
        out.append(float(loss))
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_equivalence.json")
    args = p.parse_args(argv)
    a, ta = losses("numpy", args.steps)
    b, tb = losses("cupy", args.steps)
    rel = (np.abs(np.array(a) - np.array(b)) / np.abs(np.array(a))).tolist()
    result = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "numpy": a, "cupy": b, "relative_difference": rel, "max_relative_difference": max(rel),
              "rtol": args.rtol, "passed": max(rel) <= args.rtol, "numpy_seconds": ta, "cupy_seconds": tb,
              "fused_kernels": fused.enabled()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("numpy", "cupy", "relative_difference")}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
