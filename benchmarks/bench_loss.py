"""Forward + backward of swav_loss against PyTorch autograd on the CPU (float32, same inputs).

What is timed, per size (B images, K prototypes, 2 + 6 crops):

- ``ours``: :func:`swav_ref.swav.swav_loss` -- Sinkhorn codes of the two assignment crops,
  the loss and the hand-derived gradient d loss / d scores.
- ``torch_official``: main_swav.py's loss written literally (Sinkhorn under ``no_grad``,
  ``log_softmax`` recomputed for every (assignment crop, other crop) pair), then
  ``loss.backward()``.
- ``torch_once``: the same with each crop's ``log_softmax`` computed once and reused by both
  assignment crops, a fairer peer for our shared-softmax formulation.

Also measured in the same run: the copy bandwidth of one scores-sized array (the memory
"peak" for a loss that is all element-wise work), so each result carries the fraction of
that bandwidth it reaches (reading the scores and writing the gradient, the minimum traffic).
Torch runs with one intra-op thread on the CPU by default (NumPy's element-wise work is
single-threaded); ``--torch-threads`` changes that.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_loss.py [--quick]
    python benchmarks/bench_loss.py --backend cupy     # ours on CuPy vs torch on CUDA

Writes benchmarks/results/bench_loss.json (bench_loss_gpu.json for cupy) and prints it.
Ratios are ours / torch: below 1.0 we are faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from swav_ref import fused
from swav_ref.backend import asarray, get_backend, synchronize, to_numpy
from swav_ref.swav import swav_loss

N_CROPS, CROPS_FOR_ASSIGN = 8, (0, 1)  # 2 large + 6 small crops
TEMPERATURE, EPSILON, ITERS = 0.1, 0.05, 3
RESULTS = Path(__file__).parent / "results" / "bench_loss.json"


def median_times(fns: dict, repeats: int, sync=lambda: None, min_seconds: float = 0.5) -> dict:
    """Median wall time of each function, timed in interleaved rounds.

    Every round runs each function once, so a burst of load from other processes hits all
    of them alike; rounds continue until ``repeats`` of them and at least ``min_seconds``
    in total have passed (at most 50 rounds).
    """
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
        sync()
    start_all = time.perf_counter()
    while True:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()  # on a GPU, wait for the queued kernels before reading the clock
            times[name].append(time.perf_counter() - start)
        rounds = len(times[name])
        if rounds >= 50 or (rounds >= repeats and time.perf_counter() - start_all >= min_seconds):
            break
    return {name: statistics.median(t) for name, t in times.items()}


def make_scores(batch: int, n_prototypes: int, seed: int = 0) -> np.ndarray:
    """Cosines of random unit embeddings (d = 32) with random unit prototypes, float32."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N_CROPS * batch, 32), dtype=np.float32)
    c = rng.standard_normal((n_prototypes, 32), dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return z @ c.T


def torch_sinkhorn(torch, out, epsilon=EPSILON, n_iters=ITERS):
    """main_swav.py's ``distributed_sinkhorn`` on one process, literally: codes (B, K) for the
    scores ``out`` (B, K). Also the oracle of tests/test_swav_loss.py."""
    q = torch.exp(out / epsilon).t()
    q /= torch.sum(q)
    k, b = q.shape
    for _ in range(n_iters):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def torch_loss(torch, scores, batch: int, once: bool):
    """Loss and gradient by autograd; ``once`` shares each crop's log_softmax."""
    import torch.nn.functional as F

    output = scores.detach().requires_grad_(True)  # a fresh leaf: its own .grad
    log_p = None
    if once:
        log_p = [F.log_softmax(output[batch * v : batch * (v + 1)] / TEMPERATURE, dim=1) for v in range(N_CROPS)]
    loss = 0
    for crop_id in CROPS_FOR_ASSIGN:
        with torch.no_grad():
            q = torch_sinkhorn(torch, output[batch * crop_id : batch * (crop_id + 1)].detach())
        subloss = 0
        for v in range(N_CROPS):
            if v == crop_id:
                continue
            lp = log_p[v] if once else F.log_softmax(output[batch * v : batch * (v + 1)] / TEMPERATURE, dim=1)
            subloss -= torch.mean(torch.sum(q * lp, dim=1))
        loss += subloss / (N_CROPS - 1)
    loss /= len(CROPS_FOR_ASSIGN)
    loss.backward()
    return loss.detach(), output.grad


def run(sizes, repeats: int, backend: str = "numpy", torch_threads: int = 1) -> dict:
    import torch

    xp = get_backend(backend)
    device = "cuda" if backend == "cupy" else "cpu"
    if device == "cpu":
        torch.set_num_threads(torch_threads)  # NumPy's element-wise work is single-threaded

    def sync():
        synchronize(xp)
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for batch, n_prototypes in sizes:
        host = make_scores(batch, n_prototypes)
        scores, scores_t = asarray(host, xp), torch.from_numpy(host).to(device)
        ours_loss, ours_grad = swav_loss(scores, batch, crops_for_assign=CROPS_FOR_ASSIGN,
                                         temperature=TEMPERATURE, epsilon=EPSILON, sinkhorn_iterations=ITERS)
        ref_loss, ref_grad = torch_loss(torch, scores_t, batch, once=True)
        ref_grad = ref_grad.cpu().numpy()
        agreement = float(np.max(np.abs(to_numpy(ours_grad) - ref_grad)) / np.max(np.abs(ref_grad)))
        del ours_grad, ref_grad

        medians = median_times(
            {
                "ours": lambda: swav_loss(scores, batch, crops_for_assign=CROPS_FOR_ASSIGN,
                                          temperature=TEMPERATURE, epsilon=EPSILON, sinkhorn_iterations=ITERS),
                "torch_official": lambda: torch_loss(torch, scores_t, batch, once=False),
                "torch_once": lambda: torch_loss(torch, scores_t, batch, once=True),
                "copy": lambda: scores_t.clone(),
            },
            repeats,
            sync,
        )
        t_ours, t_official, t_once, t_copy = (
            medians[k] for k in ("ours", "torch_official", "torch_once", "copy")
        )
        min_bytes = 2 * host.nbytes  # read the scores, write the gradient
        row = {
            "batch_size": batch,
            "n_prototypes": n_prototypes,
            "n_crops": N_CROPS,
            "ours_s": t_ours,
            "torch_official_s": t_official,
            "torch_once_s": t_once,
            "ratio_ours_over_torch_official": t_ours / t_official,
            "ratio_ours_over_torch_once": t_ours / t_once,
            "copy_bandwidth_GBps": min_bytes / t_copy / 1e9,
            "ours_fraction_of_copy_bandwidth": t_copy / t_ours,
            "loss_difference": abs(float(ours_loss) - float(ref_loss)),
            "grad_max_rel_difference": agreement,
        }
        rows.append(row)
        print(
            f"B={batch:5d} K={n_prototypes:5d}  ours {t_ours * 1e3:8.1f} ms  torch official "
            f"{t_official * 1e3:8.1f} ms  torch once {t_once * 1e3:8.1f} ms  ratio "
            f"{row['ratio_ours_over_torch_official']:.2f} / {row['ratio_ours_over_torch_once']:.2f}",
            flush=True,
        )
    return {
        "benchmark": f"swav_loss forward + backward vs PyTorch autograd ({backend} vs torch {device}, float32)",
        "backend": backend,
        "fused_kernels": fused.applies(xp, xp.float32),  # CuPy: Sinkhorn's kernels of swav_ref.fused
        "n_crops": N_CROPS,
        "crops_for_assign": list(CROPS_FOR_ASSIGN),
        "repeats": f"at least {repeats} interleaved rounds and 0.5 s per case",
        "statistic": "median seconds",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads() if device == "cpu" else None,
        "numpy_version": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in {256, 1024}, K in {30, 300}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 3)")
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                        help="cupy: ours on the GPU against torch on CUDA")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads for torch on the CPU (default 1, like NumPy's element-wise ops)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default benchmarks/results/bench_loss.json (bench_loss_gpu.json for cupy)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS if args.backend == "numpy" else RESULTS.with_name("bench_loss_gpu.json")
    batches, prototypes = ((256, 1024), (30, 300)) if args.quick else ((256, 1024, 4096), (30, 300, 3000))
    repeats = args.repeats or (3 if args.quick else 5)
    report = run([(b, k) for b in batches for k in prototypes], repeats, args.backend, args.torch_threads)
    report["quick"] = args.quick
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
